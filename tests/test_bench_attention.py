"""The attention suite's FlexAttention rows (benchmarks/suites/attention.py) on a tiny CPU case: the
mask_mod of each layout, the forward rows and their agreement with the reference, and the CPU
backward's absence reported with torch's own reason."""
import pytest
import torch

from benchmarks.suites import attention as suite
from iwm_kernels.attention.reference import varlen_attention as reference

CPU = torch.device("cpu")
pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture()
def eager_flex(monkeypatch):
    """Eager FlexAttention (unfused, same math): compiling takes tens of seconds on a busy CPU."""
    monkeypatch.setattr(suite, "FLEX_COMPILE", False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("mode", ["repeated", "shared"])
def test_flex_block_mask_expresses_the_layout(eager_flex, mode, seed):
    """FlexAttention with the suite's BlockMask equals the reference varlen kernel (same-sequence rule;
    plus the segment rule for the shared layout) on the packed tokens."""
    case = suite.make_case(suite.PredictorShape("p", 2, 16, "test"), 2, torch.float32, CPU)
    pk = case.repeated if mode == "repeated" else case.shared
    make, why, info = suite.implementations(case, CPU)[f"FlexAttention {mode}"]
    assert make is not None, why
    fwd, (q, k, v) = make(grad=False)
    with torch.no_grad():
        got = fwd()
        want = reference(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), pk.cu_seqlens,
                         pk.segment_ids, 16 ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flex_rows_forward_on_cpu_backward_reported(eager_flex, monkeypatch):
    monkeypatch.setattr(suite, "configs", lambda device, quick: [(suite.PredictorShape("p", 2, 16, "t"), 2,
                                                                  torch.float32)])
    rows = suite.run(CPU, True, lambda msg: None)
    flex = {(r.case.rsplit(" ", 1)[1], r.impl): r for r in rows if r.impl.startswith("FlexAttention")}
    for mode in ("repeated", "shared"):
        fwd = flex[("fwd", f"FlexAttention {mode}")]
        assert fwd.ms and fwd.ms > 0 and fwd.extra["block mask build ms"] > 0, fwd.note
        bwd = flex[("fwd+bwd", f"FlexAttention {mode}")]
        assert bwd.ms is None and "backward on cpu" in bwd.note and torch.__version__ in bwd.note
    assert flex[("fwd", "FlexAttention shared")].same_work is False
    assert not [r for r in rows if r.note.startswith("MISMATCH")]  # every forward matched its reference


def test_a_wrong_flex_output_is_a_mismatch(eager_flex, monkeypatch):
    """check_outputs catches an implementation whose packed output is wrong."""
    case = suite.make_case(suite.PredictorShape("p", 2, 16, "t"), 2, torch.float32, CPU)
    impls = suite.implementations(case, CPU)
    rep = case.repeated
    from iwm_kernels.attention import prepare
    rep_layout = prepare(rep.cu_seqlens, None, rep.num_tokens, rep.max_seqlen)
    sh_layout = prepare(case.shared.cu_seqlens, case.shared.segment_ids, case.shared.num_tokens,
                        case.shared.max_seqlen)
    outputs = {}
    with torch.no_grad():
        for name in (suite.BASELINE, "FlexAttention repeated", "FlexAttention shared"):
            make, _, info = impls[name]
            fwd, _ = make(grad=False) if info.get("flex") else make()
            outputs[name] = fwd()
    assert suite.check_outputs(case, outputs, rep_layout, sh_layout, CPU) == []
    outputs["FlexAttention shared"] = outputs["FlexAttention shared"] + 1e-2
    (row,) = suite.check_outputs(case, outputs, rep_layout, sh_layout, CPU)
    assert row.impl == "FlexAttention shared" and row.note.startswith("MISMATCH vs the reference kernel")


def test_flex_mask_mod_rules():
    seq = torch.tensor([0, 0, 0, 1, 1])
    seg = torch.tensor([0, 1, 2, 0, 1])
    same = suite.flex_mask_mod(seq)
    shared = suite.flex_mask_mod(seq, seg)
    q, k = torch.tensor(1), torch.tensor(2)
    assert bool(same(0, 0, q, k)) and not bool(shared(0, 0, q, k))   # block 1 does not see block 2
    assert bool(shared(0, 0, q, torch.tensor(0)))                     # every block sees the context
    assert not bool(shared(0, 0, torch.tensor(0), q))                 # the context sees only itself
    assert not bool(same(0, 0, torch.tensor(4), torch.tensor(0)))     # never across sequences


@pytest.mark.slow
def test_compiled_flex_serves_a_second_shape(monkeypatch, seed):
    """The compiled FlexAttention runs a second shape too (static recompiles): with torch's automatic
    dynamic shapes the second compile (here the shared layout's token count after the repeated one's)
    emitted C++ that Inductor's CPU template could not build (torch 2.13)."""
    monkeypatch.setattr(suite, "_compiled_flex", {})
    case = suite.make_case(suite.PredictorShape("p", 12, 32, "test"), 2, torch.float32, CPU)
    impls = suite.implementations(case, CPU)
    with suite.flex_recompiles():
        for mode, pk in (("repeated", case.repeated), ("shared", case.shared)):
            fwd, (q, k, v) = impls[f"FlexAttention {mode}"][0](grad=False)
            with torch.no_grad():
                got = fwd()
                want = reference(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                 pk.cu_seqlens, pk.segment_ids, 32 ** -0.5)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

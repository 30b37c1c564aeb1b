"""The end-to-end step benchmark (benchmarks/suites/step.py) in a very quick CPU mode: a tiny model,
batch 4, one warm-up and two timed steps per variant."""
import time

import pytest
import torch

from benchmarks import common, ijepa_baseline, report
from benchmarks.suites import step as suite
from iwm.masks import MultiBlockMaskSampler
from iwm.models import IWM
from iwm_kernels.gemm import onednn_available
from tests.helpers import OpNames as _Ops

CPU = torch.device("cpu")
TINY = suite.StepCase("tiny", 4, False, warmup=1, iters=2, compile_limit_s=60)
EAGER = [v for v in suite.VARIANTS if not v.compiled]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a machine whose cores are busy, a parallel region waiting for a
    descheduled thread makes these tiny steps tens of times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def bench():
    return suite.StepBench(TINY, CPU)


@pytest.mark.parametrize("variant", EAGER, ids=[v.name for v in EAGER])
def test_eager_variants_time_every_phase(bench, variant):
    row = bench.run_variant(variant, lambda msg: None)
    assert row.ms is not None and row.ms > 0, row.note
    assert row.flops > 0 and row.baseline == suite.BASELINE and row.headline
    split = row.extra["breakdown_ms"]
    # ours is iwm.step.TrainStep: its breakdown has exactly the phases of its profiler ranges (iwm/<phase>);
    # the baseline marks the same boundaries around its own code (no gradient norm, no device row)
    if variant.impl == "ours":
        assert list(split) == list(suite.PHASES)
    else:
        assert list(split) == ["views", "masks", "forward", "backward", "adamw", "ema"]
    assert all(v >= 0 for v in split.values())
    # the phases tile the step: their mean total is close to the median step (2 steps)
    assert sum(split.values()) == pytest.approx(row.ms, rel=0.5)
    assert row.extra["img/s"] == pytest.approx(TINY.batch / row.ms * 1e3)
    assert row.extra["model GFLOP/step"] == pytest.approx(row.flops / 1e9)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear")
def test_the_baseline_runs_torchs_linears_and_ours_onednns(bench):
    """The baseline is I-JEPA's step as torch runs it by default (F.linear, MKL on the CPU); the oneDNN
    baseline row and ours route the linears through iwm_kernels.linear."""
    want = {suite.BASELINE: False, suite.ONEDNN_BASELINE: True, suite.EQUAL_WORK: True,
            "eager reference kernels (equal work)": False}
    for name, onednn in want.items():
        v = suite.variant(name)
        bench.model.load_state_dict(bench.initial_state)
        step, cleanup = bench.make_step(v, bench.optimizer_for(v), suite.Marks(CPU))
        ops = _Ops()
        try:
            with ops:
                step(0)
        finally:
            cleanup()
        assert any("mkldnn._linear_pointwise" in n for n in ops.names) == onednn, name
        assert any(n in ("aten.addmm", "aten.mm") for n in ops.names) or onednn, name


def test_variants_count_their_own_work(bench):
    steps = range(1, 3)
    base, equal = bench.work(suite.variant(suite.BASELINE), steps), bench.work(suite.variant(suite.EQUAL_WORK), steps)
    ragged = bench.work(suite.variant("ours, ragged masks"), steps)
    shared = bench.work(suite.variant("ours, shared context"), steps)
    # equal work: the same tokens; FLOPs differ only by the baseline's algorithm: its unsplit action MLP
    # (tiny: feature) and its last predictor block's projection and MLP on the context rows nothing reads
    assert (base.context_tokens, base.target_tokens, base.predictor_tokens) == \
        (equal.context_tokens, equal.target_tokens, equal.predictor_tokens)
    assert 0 < equal.flops < base.flops < 1.06 * equal.flops
    assert ragged.context_tokens > equal.context_tokens and ragged.flops > equal.flops  # no truncation
    assert shared.context_tokens == equal.context_tokens and shared.flops < equal.flops
    assert shared.predictor_tokens < equal.predictor_tokens


def test_rows_state_their_work_and_what_they_change(bench):
    row = bench.run_variant(suite.variant("ours, ragged masks"), lambda msg: None)
    assert not row.same_work and "ragged masks" in row.differs and row.held_equal == suite.HELD_EQUAL
    assert row.extra["context tokens"] == row.config["context_tokens"] > 0
    assert row.extra["target tokens"] > 0 and row.config["model_flops"] == row.flops
    equal = bench.run_variant(suite.variant(suite.EQUAL_WORK), lambda msg: None)
    assert equal.same_work and equal.differs == "" and equal.config["masks"] == "truncated"
    assert equal.config["predictor_layout"] == "repeated"


def test_checks_pass_ours_vs_reference_and_equal_work_vs_baseline(bench):
    assert bench.check() is None
    losses = bench.losses_at_step0()
    assert losses["equal work (fused)"] == pytest.approx(losses["baseline"], rel=1e-5)
    assert losses["ragged (fused)"] != losses["baseline"]  # the ragged masks are other tokens


def test_check_reports_a_baseline_that_computes_something_else(bench, monkeypatch):
    class Off(suite.IJEPAForward):
        def forward(self, *args):
            return super().forward(*args) * 1.01
    monkeypatch.setattr(suite, "IJEPAForward", Off)
    problem = bench.check()
    assert problem is not None and problem.startswith("MISMATCH") and "(baseline)" in problem


@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
def test_faithful_baseline_equals_our_model_on_truncated_masks(seed, conditioning):
    """Same weights, same (truncated) masks, repeated layout: I-JEPA's loss (smooth-L1) equals our
    model's with loss=smooth_l1, and differs from the L2 one (so it is the smooth-L1)."""
    model = IWM.from_preset("tiny", shared_context=False, conditioning=conditioning, loss="smooth_l1")
    model.check_inputs = False
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(3, 0)
    enc, pred = masks.to_ijepa()
    x, y, a = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.randn(3, 7)
    with torch.no_grad():
        want, _ = model(x, y, masks.truncated(), a, backend="reference")
        got = ijepa_baseline.IJEPAForward(model)(x, y, enc, pred, a)
        model.loss_name = "l2"
        l2, _ = model(x, y, masks.truncated(), a, backend="reference")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, l2)


def test_faithful_baseline_writes_its_attention_by_hand(monkeypatch, seed):
    """No SDPA anywhere in the baseline's forward (I-JEPA's q @ k^T, softmax, @ v)."""
    model = IWM.from_preset("tiny", conditioning="none")
    enc, pred = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(2, 0).to_ijepa()

    def refuse(*args, **kwargs):
        raise AssertionError("SDPA called")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    loss = ijepa_baseline.IJEPAForward(model)(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), enc, pred)
    assert torch.isfinite(loss)


def test_apply_masks_and_repeat_interleave_batch_by_hand(seed):
    x = torch.randn(2, 5, 3)
    m0, m1 = torch.tensor([[0, 2], [1, 4]]), torch.tensor([[3, 3], [0, 1]])
    out = ijepa_baseline.apply_masks(x, [m0, m1])
    assert out.shape == (4, 2, 3)
    torch.testing.assert_close(out[1], x[1, [1, 4]])  # mask-major: row j*B + b
    torch.testing.assert_close(out[2], x[0, [3, 3]])
    rows = torch.arange(4.0)[:, None]                  # two groups of B=2
    got = ijepa_baseline.repeat_interleave_batch(rows, 2, repeat=3)
    assert got.flatten().tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]


def test_ijepa_param_groups_and_default_adamw():
    model = IWM.from_preset("tiny")
    groups = ijepa_baseline.param_groups(model)
    assert len(groups) == 4 and [g.get("weight_decay") for g in groups] == [None, None, 0, 0]
    ours = suite.param_groups(model)
    assert {id(p) for g in groups[:2] for p in g["params"]} == {id(p) for p in ours[0]["params"]}
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in ours[1]["params"]}
    opt = ijepa_baseline.build_optimizer(model, 1e-4, 0.04)
    assert not opt.defaults.get("fused") and opt.defaults.get("foreach") is None


def test_ijepa_ema_matches_ours(seed):
    model = IWM.from_preset("tiny")
    for p in model.encoder.parameters():
        p.data.add_(torch.randn_like(p))
    want = [p.clone() for p in model.target_encoder.parameters()]
    for w, o in zip(want, model.encoder.parameters()):
        w.mul_(0.9).add_(0.1 * o)
    ijepa_baseline.ema_(model.target_encoder, model.encoder, 0.9)
    for w, p in zip(want, model.target_encoder.parameters()):
        torch.testing.assert_close(p, w)


def test_ijepa_vitt16_case_is_ijepas_configuration():
    """I-JEPA's own configuration: ViT-Ti/16 at 224 px, a 6x96 predictor, no conditioning, block masks
    (min_keep 4), fp32, batch 32; one baseline and one equal-work step at batch 2 agree on the work."""
    cases = {c.preset: c for c in suite.configs(CPU, quick=False)}
    assert cases["ijepa_vitt16"].batch == 32 and not cases["ijepa_vitt16"].bf16
    quick = {c.preset: c for c in suite.configs(CPU, quick=True)}["ijepa_vitt16"]
    assert set(quick.only) == {suite.BASELINE, suite.EQUAL_WORK}
    bench = suite.StepBench(suite.StepCase("ijepa_vitt16", 2, False, warmup=0, iters=1, compile_limit_s=0,
                                           only=quick.only), CPU)
    enc, pred = bench.model.encoder, bench.model.predictor
    assert (enc.img_size, enc.patch_size, enc.embed_dim, len(enc.blocks)) == (224, 16, 192, 12)
    assert (pred.dim, len(pred.predictor_blocks), pred.conditioning) == (96, 6, "none")
    assert bench.sampler.context_mode == "block" and bench.sampler.min_keep == 4
    assert bench.sampler.num_targets == 4 and bench.sampler.target_scale == (0.15, 0.2)
    assert bench.sampler.context_scale == (0.85, 1.0)
    assert bench.check() is None
    base = bench.run_variant(suite.variant(suite.BASELINE), lambda msg: None)
    ours = bench.run_variant(suite.variant(suite.EQUAL_WORK), lambda msg: None)
    assert base.ms and ours.ms, (base.note, ours.note)
    # no conditioning: the same FLOPs but for the baseline's last predictor block on unread context rows
    assert 1 < base.flops / ours.flops < 1.03
    assert base.extra["context tokens"] == ours.extra["context tokens"]
    skipped = bench.run_variant(suite.variant("ours, ragged masks"), lambda msg: None)
    assert skipped.ms is None and "--quick" in skipped.note


def test_shared_layout_is_restored_after_its_row(bench):
    bench.run_variant(suite.variant("ours, shared context"), lambda msg: None)
    assert bench.model.predictor.shared_context is False


def test_compiled_variant_is_skipped_when_the_budget_is_short(bench):
    compiled = next(v for v in suite.VARIANTS if v.compiled)
    common.set_deadline(1.0)
    try:
        row = bench.run_variant(compiled, lambda msg: None)
    finally:
        common.set_deadline(None)
    assert row.ms is None and "time budget" in row.note
    common.set_deadline(-1.0)  # spent: the optional variants are skipped, the baseline and ours still run
    try:
        skipped = bench.run_variant(suite.variant("eager reference kernels (equal work)"), lambda msg: None)
        ours = bench.run_variant(suite.variant(suite.EQUAL_WORK), lambda msg: None)
    finally:
        common.set_deadline(None)
    assert skipped.ms is None and "time budget" in skipped.note
    assert ours.ms is not None


def test_quick_cpu_skips_compile():
    quick = suite.configs(CPU, quick=True)[0]
    row = suite.StepBench(quick, CPU).run_variant(suite.VARIANTS[1], lambda msg: None)
    assert row.ms is None and "--quick" in row.note


def test_presets_from_the_environment(monkeypatch):
    monkeypatch.setenv("IWM_BENCH_STEP_PRESETS", "tiny")
    assert [c.preset for c in suite.configs(CPU, quick=False)] == ["tiny"]
    monkeypatch.setenv("IWM_BENCH_STEP_PRESETS", "ijepa_vitt16")
    assert [c.preset for c in suite.configs(CPU, quick=False)] == ["ijepa_vitt16"]
    monkeypatch.setenv("IWM_BENCH_STEP_PRESETS", "vit_nope")
    with pytest.raises(ValueError, match="IWM_BENCH_STEP_PRESETS"):
        suite.configs(CPU, quick=True)


def test_time_limit_interrupts():
    t0 = time.perf_counter()
    with pytest.raises(common.TimeLimitExceeded, match="spinning"):
        with common.time_limit(0.2, "spinning"):
            while time.perf_counter() - t0 < 5:
                pass
    assert time.perf_counter() - t0 < 2
    with common.time_limit(5, "fast"):  # a block that finishes in time is untouched
        pass


def test_report_runs_the_step_suite(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.report --suites step` end to end: report.md, report.json, the breakdown plot."""
    monkeypatch.setattr(suite, "configs", lambda device, quick: [suite.replace(TINY, compile_limit_s=0)])
    monkeypatch.setattr(suite, "VARIANTS", tuple(suite.variant(n) for n in (
        suite.BASELINE, "I-JEPA (faithful) + torch.compile", suite.EQUAL_WORK, "ours, shared context")))
    monkeypatch.setattr(common, "measure_ceilings", lambda device, quick: common.Ceilings(10.0, 0.1, "float32"))
    monkeypatch.setattr(report, "measure_ceilings", lambda device, quick: common.Ceilings(10.0, 0.1, "float32"))
    assert report.main(["--device", "cpu", "--quick", "--suites", "step", "--out", str(tmp_path),
                        "--time-budget", "300"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Headline" in md and "| step | tiny b4 fp32 | ours, equal work |" in md
    line = next(x for x in md.splitlines() if x.startswith("| step | tiny b4 fp32 | ours, equal work |"))
    assert suite.HELD_EQUAL in line and "I-JEPA (faithful, eager)" in line
    assert "ours, shared context (shared-context predictor" in line  # a model option, with what it changes
    assert "× vs I-JEPA (faithful, eager) taking turns step by step" in line
    assert "### step breakdown — tiny b4 fp32" in md
    assert "skipped in --quick on the CPU" in md  # the compiled variant, listed with its reason
    assert (tmp_path / "step-breakdown.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| step | tiny b4 fp32 | ours, equal work |" in out


@pytest.mark.gpu
def test_step_on_cuda():
    """The CUDA paths of the suite (events, peak memory, bf16 autocast, Triton kernels in the model):
    ours agrees with the reference kernels, and the baseline and ours time every phase."""
    cuda = torch.device("cuda")
    case = suite.StepCase("tiny", 16, True, warmup=1, iters=2, compile_limit_s=0)
    bench = suite.StepBench(case, cuda)
    assert bench.check() is None
    for variant in (suite.variant(suite.BASELINE), suite.variant(suite.EQUAL_WORK)):
        row = bench.run_variant(variant, lambda msg: None)
        assert row.ms is not None and row.ms > 0, row.note
        assert row.extra["peak MB (allocated)"] > 0
        assert set(row.extra["breakdown_ms"]) >= {"data/augment", "encoder", "predictor", "backward", "EMA"}


def test_every_variant_starts_from_the_same_weights(bench):
    """Each variant trains the shared model while it is timed; the next must not inherit that."""
    seen = []
    original = bench.optimizer_for

    def spy(variant):  # called by run_variant after it restores the weights
        seen.append({k: v.clone() for k, v in bench.model.state_dict().items()})
        return original(variant)

    bench.optimizer_for = spy
    try:
        for variant in (suite.variant(suite.BASELINE), suite.variant(suite.EQUAL_WORK)):
            bench.run_variant(variant, lambda msg: None)
    finally:
        del bench.optimizer_for
    # it did train (the weights left behind are not the initial ones) ...
    assert any(not torch.equal(bench.initial_state[k], v) for k, v in bench.model.state_dict().items())
    # ... and yet each variant began from them
    for state in seen:
        for k, v in bench.initial_state.items():
            assert torch.equal(state[k], v), k


def test_taking_turns_times_both_on_the_same_steps(bench, monkeypatch):
    """The alternating measurement: each variant's steps 1..5 in turns, the order swapped every step; the
    ratio is the median of baseline / ours per step, here with a clock that makes ours twice as fast."""
    calls = []
    real = bench.make_step

    def make_step(variant, optimizer, marks):
        step, cleanup = real(variant, optimizer, marks)

        def timed(i):
            calls.append((variant.name, i))
            clock["t"] += 2.0 if variant.impl == "ijepa" else 1.0
        return timed, cleanup
    clock = {"t": 0.0}
    monkeypatch.setattr(bench, "make_step", make_step)
    monkeypatch.setattr(suite.time, "perf_counter", lambda: clock["t"])
    out = bench.paired_speedup(suite.variant(suite.BASELINE), suite.variant(suite.EQUAL_WORK))
    assert out["speedup"] == 2.0 and out["steps"] == 5 and out["spread"] == (2.0, 2.0)
    timed = calls[2:]   # after one warm-up step each
    assert [i for _, i in timed] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [n for n, _ in timed[:4]] == [suite.BASELINE, suite.EQUAL_WORK, suite.EQUAL_WORK, suite.BASELINE]
    assert bench.model.predictor.shared_context is False


def test_taking_turns_sets_each_variants_layout_on_every_step(bench, monkeypatch):
    """Ours on the shared layout taking turns with the baseline: every step runs with its own variant's
    predictor layout, whichever step ran before it, and the layout is restored afterwards."""
    seen = []
    monkeypatch.setattr(bench, "_our_step", lambda v, o, m: lambda i: seen.append(
        ("ours", bench.model.predictor.shared_context)))
    monkeypatch.setattr(bench, "_ijepa_step", lambda v, o, m: lambda i: seen.append(
        ("ijepa", bench.model.predictor.shared_context)))
    bench.paired_speedup(suite.variant(suite.BASELINE), suite.variant("ours, shared context"))
    assert {impl for impl, _ in seen} == {"ours", "ijepa"} and len(seen) >= 12
    assert all(shared == (impl == "ours") for impl, shared in seen)
    assert bench.model.predictor.shared_context is False


def test_take_turns_covers_equal_work_and_the_model_options(bench, monkeypatch):
    """Each of ours that ran gets the taking-turns figure; one that did not run is left alone, and a failed
    pairing is a note on its row, not a crash."""
    label = bench.case.label
    rows = [common.Row(suite.SUITE, label, name, ms) for name, ms in (
        (suite.BASELINE, 2.0), (suite.EQUAL_WORK, 1.0), ("ours, ragged masks", 1.5), ("ours, shared context", None))]
    paired = []

    def fake(base, ours):
        paired.append(ours.name)
        if ours.name == "ours, ragged masks":
            raise RuntimeError("out of memory")
        return {"speedup": 1.25, "steps": 5, "spread": (1.2, 1.3)}
    monkeypatch.setattr(bench, "paired_speedup", fake)
    suite.take_turns(bench, rows, lambda msg: None)
    assert paired == [suite.EQUAL_WORK, "ours, ragged masks"]
    equal, ragged, shared = rows[1:]
    assert equal.extra[common.TAKING_TURNS] == 1.25
    assert equal.extra[common.TAKING_TURNS + " (steps, range)"] == "5, 1.20-1.30"
    assert common.TAKING_TURNS not in ragged.extra and "taking turns failed: RuntimeError" in ragged.note
    assert shared.extra == {} and shared.note == ""
    rows[0].ms = None  # no baseline: nothing to take turns with
    paired.clear()
    suite.take_turns(bench, rows, lambda msg: None)
    assert paired == []

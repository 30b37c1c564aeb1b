"""The end-to-end step benchmark (benchmarks/suites/step.py) in a very quick CPU mode: a tiny model,
batch 4, one warm-up and two timed steps per variant."""
import time

import pytest
import torch

from benchmarks import common, report
from benchmarks.suites import step as suite
from iwm.masks import MaskBatch
from iwm.models import IWM

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
    assert list(split) == ["data/augment", "masks", "target encoder", "encoder", "predictor", "loss", "backward",
                           "optimizer", "EMA"]
    assert all(v >= 0 for v in split.values())
    # the phases tile the step: their mean total is close to the median step (2 steps)
    assert sum(split.values()) == pytest.approx(row.ms, rel=0.5)
    assert row.extra["img/s"] == pytest.approx(TINY.batch / row.ms * 1e3)
    assert row.extra["model GFLOP/step"] == pytest.approx(row.flops / 1e9)


def test_variants_count_their_own_flops(bench):
    steps = range(1, 3)
    ijepa = bench.flops(suite.VARIANTS[0], steps)
    ours = bench.flops(suite.VARIANTS[3], steps)
    assert ijepa > 0 and ours > 0 and ijepa != ours  # truncated + repeated context vs ragged + shared


def test_ours_agrees_with_the_reference_kernels(bench):
    assert bench.check() is None


def test_ijepa_style_loss_equals_the_model_on_ijepa_masks(seed):
    """The baseline computes what our model computes on I-JEPA's (truncated) masks and layout."""
    model = IWM.from_preset("tiny", shared_context=False)
    model.check_inputs = False
    sampler = suite.MultiBlockMaskSampler(8, min_keep=4, seed=seed)
    enc, pred = sampler.sample(3, 0).to_ijepa()
    masks = MaskBatch.from_ijepa(enc, pred, grid=8)
    x, y, a = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.randn(3, 7)
    with torch.no_grad():
        want, _ = model(x, y, masks, a, backend="reference")
        got = suite.IJEPAStyleForward(model)(x, y, enc, pred, a)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ijepa_ema_matches_ours(seed):
    model = IWM.from_preset("tiny")
    for p in model.encoder.parameters():
        p.data.add_(torch.randn_like(p))
    want = [p.clone() for p in model.target_encoder.parameters()]
    for w, o in zip(want, model.encoder.parameters()):
        w.mul_(0.9).add_(0.1 * o)
    suite.ijepa_ema_(model.target_encoder, model.encoder, 0.9)
    for w, p in zip(want, model.target_encoder.parameters()):
        torch.testing.assert_close(p, w)


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
        skipped = bench.run_variant(suite.VARIANTS[2], lambda msg: None)
        ours = bench.run_variant(suite.VARIANTS[3], lambda msg: None)
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
    monkeypatch.setattr(suite, "VARIANTS", (suite.VARIANTS[0], suite.VARIANTS[1], suite.VARIANTS[3]))
    monkeypatch.setattr(common, "measure_ceilings", lambda device, quick: common.Ceilings(10.0, 0.1, "float32"))
    monkeypatch.setattr(report, "measure_ceilings", lambda device, quick: common.Ceilings(10.0, 0.1, "float32"))
    assert report.main(["--device", "cpu", "--quick", "--suites", "step", "--out", str(tmp_path),
                        "--time-budget", "300"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Headline" in md and "| step | tiny b4 fp32 | ours (fused) |" in md
    assert "### step breakdown — tiny b4 fp32" in md
    assert "skipped in --quick on the CPU" in md  # the compiled variant, listed with its reason
    assert (tmp_path / "step-breakdown.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| step | tiny b4 fp32 | ours (fused) |" in out


@pytest.mark.gpu
def test_step_on_cuda():
    """The CUDA paths of the suite (events, peak memory, bf16 autocast, Triton kernels in the model):
    ours agrees with the reference kernels, and the baseline and ours time every phase."""
    cuda = torch.device("cuda")
    case = suite.StepCase("tiny", 16, True, warmup=1, iters=2, compile_limit_s=0)
    bench = suite.StepBench(case, cuda)
    assert bench.check() is None
    for variant in (suite.VARIANTS[0], suite.VARIANTS[3]):
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
        for variant in (suite.VARIANTS[0], suite.VARIANTS[3]):
            bench.run_variant(variant, lambda msg: None)
    finally:
        del bench.optimizer_for
    # it did train (the weights left behind are not the initial ones) ...
    assert any(not torch.equal(bench.initial_state[k], v) for k, v in bench.model.state_dict().items())
    # ... and yet each variant began from them
    for state in seen:
        for k, v in bench.initial_state.items():
            assert torch.equal(state[k], v), k

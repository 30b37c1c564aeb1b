"""pytest-benchmark cases for the whole IWM training step (run: pytest benchmarks/ --benchmark-only):
the `tiny` preset at batch 32 on the CPU (iwm_equi_vitb16 at batch 128, bf16, on a GPU), eager variants;
the compiled ones are in `python -m benchmarks.report --suites step`."""
import itertools

import pytest
import torch

from benchmarks.suites import step as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE = (suite.StepCase("iwm_equi_vitb16", 128, True, warmup=2, iters=5, compile_limit_s=0) if DEVICE.type == "cuda"
        else suite.StepCase("tiny", 32, False, warmup=1, iters=5, compile_limit_s=0))
VARIANTS = [v for v, why in suite.variants_for(DEVICE, quick=DEVICE.type == "cuda") if not v.compiled and not why]


@pytest.fixture(scope="module")
def bench():
    return suite.StepBench(CASE, DEVICE)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_training_step(benchmark, bench, variant):
    optimizer = bench.optimizer_for(variant)
    marks = suite.Marks(DEVICE)
    step, cleanup = bench.make_step(variant, optimizer, marks)
    steps = itertools.count()
    benchmark.extra_info.update(preset=CASE.preset, batch=CASE.batch,
                                flops=bench.flops(variant, range(CASE.warmup, CASE.warmup + CASE.iters)))

    def run():
        marks.reset()
        step(next(steps))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    try:
        benchmark.pedantic(run, rounds=CASE.iters, warmup_rounds=CASE.warmup)
    finally:
        cleanup()

"""pytest-benchmark cases for the EMA (run: pytest benchmarks/ --benchmark-only)."""
import pytest
import torch

from benchmarks.shapes import VITS, vit_params
from benchmarks.suites import ema as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = suite.implementations(DEVICE)


@pytest.mark.parametrize("vit", ["vit_small", "vit_base", "vit_large"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_ema(benchmark, vit, impl):
    fn, why = IMPLS[impl]
    if fn is None:
        pytest.skip(why)
    targets = vit_params(VITS[vit], device=DEVICE, seed=0)
    onlines = vit_params(VITS[vit], device=DEVICE, seed=1)
    benchmark.extra_info["bytes"] = sum(t.numel() for t in targets) * 12

    def step():
        with torch.no_grad():
            fn(targets, onlines, suite.MOMENTUM)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)

"""pytest-benchmark cases for the linear layers (run: pytest benchmarks/ --benchmark-only)."""
import pytest
import torch

from benchmarks.suites import linear as suite
from iwm_kernels.gemm import onednn_available


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear")
@pytest.mark.parametrize("case", suite.CASES, ids=[c[0].split(" [")[0] for c in suite.CASES])
@pytest.mark.parametrize("impl", list(suite.implementations()))
def test_linear(benchmark, case, impl):
    _, m, k, n = case
    fn = suite.implementations()[impl]
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    grad = torch.randn(m, n)
    benchmark.extra_info["flops"] = 6 * m * k * n
    benchmark(lambda: fn(x, w, b).backward(grad))

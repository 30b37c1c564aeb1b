"""pytest-benchmark cases for varlen attention (run: pytest benchmarks/ --benchmark-only).

One predictor attention layer, forward+backward, at the ViT-B predictor shape (12 heads of 32);
batch 64 on CUDA, 4 on CPU.
"""
import pytest
import torch

from benchmarks.suites import attention as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 64 if DEVICE.type == "cuda" else 4
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASE = suite.make_case(suite.SHAPES["pred384"], BATCH, DTYPE, DEVICE)
IMPLS = suite.implementations(CASE, DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_fwd_bwd(benchmark, impl):
    make, why, _ = IMPLS[impl]
    if make is None:
        pytest.skip(why)
    fwd, inputs = make()
    try:
        grad = torch.randn_like(fwd())
    except RuntimeError as exc:  # an SDPA backend that refuses the key-padding mask
        pytest.skip(str(exc).splitlines()[0][:120])
    benchmark.extra_info["tokens_repeated"] = CASE.repeated.num_tokens
    benchmark.extra_info["tokens_shared"] = CASE.shared.num_tokens

    def step():
        torch.autograd.grad(fwd(), inputs, grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)

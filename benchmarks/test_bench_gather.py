"""pytest-benchmark cases for the gather and the mask sampler (run: pytest benchmarks/ --benchmark-only)."""
import pytest
import torch

import iwm_kernels
from benchmarks.ijepa_collator import IJEPAMaskCollator
from benchmarks.shapes import VITS
from benchmarks.suites import gather as suite
from iwm.masks import MultiBlockMaskSampler

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
OURS = suite.our_backends(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", params=["vit_base", "vit_large"])
def inputs(request):
    cfg = VITS[request.param]
    masks = MultiBlockMaskSampler(cfg.grid, context_mode="block", seed=0).sample(128, 0).to(DEVICE)
    x = torch.randn(128, cfg.num_patches, cfg.dim, device=DEVICE)
    pos = torch.randn(cfg.num_patches, cfg.dim, device=DEVICE)
    return x, pos, masks


IMPLS = ["I-JEPA apply_masks", "advanced indexing"] + [f"ours ({b})" for b in OURS]


@pytest.mark.parametrize("impl", IMPLS)
def test_context_gather(benchmark, inputs, impl):
    x, _, masks = inputs
    masks_enc, _ = masks.to_ijepa()
    enc = masks_enc[0]
    b_idx = torch.arange(x.shape[0], device=DEVICE)[:, None]
    if impl.startswith("ours"):
        backend = impl[6:-1]
        if OURS[backend]:
            pytest.skip(OURS[backend])
        fn = lambda: iwm_kernels.gather_tokens(x, enc, backend=backend)  # noqa: E731
    elif impl == "advanced indexing":
        fn = lambda: x[b_idx, enc]  # noqa: E731
    else:
        fn = lambda: suite.ijepa_apply_masks(x, masks_enc)  # noqa: E731
    benchmark.extra_info["bytes"] = 2 * enc.numel() * x.shape[-1] * x.element_size()
    benchmark(lambda: (fn(), _sync()))


@pytest.mark.parametrize("impl", ["eager sequence"] + [f"ours ({b})" for b in OURS])
def test_fused_targets(benchmark, inputs, impl):
    x, pos, masks = inputs
    cu = masks.target_cu_per_sample
    bias = torch.randn(x.shape[0], x.shape[-1], device=DEVICE)
    if impl.startswith("ours"):
        backend = impl[6:-1]
        if OURS[backend]:
            pytest.skip(OURS[backend])
        fn = lambda: iwm_kernels.gather_tokens(x, masks.target_index, cu, pos=pos, bias=bias,  # noqa: E731
                                               normalize=True, backend=backend)
    else:
        rows = torch.repeat_interleave(torch.arange(x.shape[0], device=DEVICE), (cu[1:] - cu[:-1]).long())
        tokens = masks.target_index.long()
        fn = lambda: suite.eager_sequence(x, rows, tokens, pos, bias)  # noqa: E731
    benchmark(lambda: (fn(), _sync()))


@pytest.mark.parametrize("impl", ["I-JEPA collator", "ours block", "ours complement"])
def test_mask_sampler(benchmark, impl):
    steps = iter(range(10**9))
    if impl == "I-JEPA collator":
        collator = IJEPAMaskCollator(14)
        benchmark(lambda: collator.sample(256, next(steps)))
    else:
        sampler = MultiBlockMaskSampler(14, context_mode=impl.split()[1])
        benchmark(lambda: sampler.sample(256, next(steps)))

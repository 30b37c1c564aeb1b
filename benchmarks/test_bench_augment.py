"""pytest-benchmark cases for the two-view photometric augmentation (run: pytest benchmarks/ --benchmark-only)."""
import pytest
import torch

from benchmarks.suites import augment as suite

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = suite.implementations(DEVICE, quick=False)
BATCH = 64 if DEVICE.type == "cuda" else 16


@pytest.mark.parametrize("impl", list(IMPLS))
def test_two_views(benchmark, impl):
    images, table, cfg = suite.batch(DEVICE, BATCH)
    n = images.shape[0] * images.shape[2] * images.shape[3] * 3
    benchmark.extra_info["bytes"] = n * (1 + 2 * 4)
    benchmark.extra_info["images"] = BATCH
    if impl.startswith("PIL"):
        hwc = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        src, tgt = table[0].numpy(), table[1].numpy()
        benchmark(lambda: suite.pil_two_views(hwc, src, tgt, cfg.mean, cfg.std))
        return
    fn, why = IMPLS[impl]
    if fn is None:
        pytest.skip(why)

    fn(images, table, cfg.mean, cfg.std, torch.float32)  # warm-up (and compile, for the compiled chain)

    def step():
        fn(images, table, cfg.mean, cfg.std, torch.float32)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)

"""Augment suite: the two photometric views of a batch of 224 x 224 uint8 images (IWM's source and target
views: jitter on both, grayscale / blur / solarise on the source, normalised output).

Bytes per image: read the uint8 image once, write both views: 3 * H * W * (1 + 2 * out bytes). (The fused
path also re-reads the image once for the contrast means; that read is not counted as useful.)
Implementations: the per-transform chain (the reference, one full-tensor pass per transform; baseline),
that chain under torch.compile, a typical CPU DataLoader pipeline with PIL per image (ImageEnhance,
HSV hue shift, GaussianBlur, ImageOps.solarize, then to a normalised tensor; one process), and ours.
Parameters are drawn from the paper's configuration (about 20 % of sources blurred).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from iwm import augment as aug
from iwm_kernels._backend import runs_on
from iwm_kernels.photometric import reference, run_backend

from ..common import Row, quiet_compile, time_fn, try_compile

SUITE = "augment"
BASELINE = "per-transform chain (reference)"
PIL_IMAGES = 16  # PIL runs on this many images and is scaled to the batch (it is per image anyway)


def pil_two_views(images: np.ndarray, source: np.ndarray, target: np.ndarray, mean, std) -> list[torch.Tensor]:
    """images uint8 [N, H, W, 3]; source/target [N, 8] packed parameters -> [2, N, 3, H, W] float32."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    views = []
    for table in (source, target):
        out = []
        for arr, p in zip(images, table):
            im = Image.fromarray(arr)
            im = ImageEnhance.Brightness(im).enhance(float(p[0]))
            im = ImageEnhance.Contrast(im).enhance(float(p[1]))
            im = ImageEnhance.Color(im).enhance(float(p[2]))
            if p[3] != 0:  # torchvision's PIL hue path: shift the H channel of the HSV image, uint8 wrap-around
                h, s, v = im.convert("HSV").split()
                hh = np.asarray(h, dtype=np.uint8) + np.uint8(int(p[3] * 255) % 256)
                im = Image.merge("HSV", (Image.fromarray(hh, "L"), s, v)).convert("RGB")
            if p[4]:
                im = im.convert("L").convert("RGB")
            if p[5] > 0:
                im = im.filter(ImageFilter.GaussianBlur(radius=float(p[5])))
            if p[6]:
                im = ImageOps.solarize(im, threshold=int(round(float(p[7]) * 255)))
            x = (np.asarray(im, dtype=np.float32) * (1.0 / 255.0) - mean) / std
            out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
        views.append(torch.stack(out))
    return views


def implementations(device: torch.device, quick: bool) -> dict[str, tuple[Optional[Callable], str]]:
    """name -> (fn(images, params[V, B, 8], mean, std, out_dtype), why not available)."""
    impls: dict[str, tuple[Optional[Callable], str]] = {
        BASELINE: (lambda x, p, m, s, d: run_backend("reference", x, p, m, s, d), ""),
    }
    if device.type == "cpu" and quick:
        impls["chain + torch.compile"] = (None, "skipped in --quick on CPU (compiling takes tens of seconds)")
    else:
        compiled, why = try_compile(reference.photometric_views)
        impls["chain + torch.compile"] = ((lambda x, p, m, s, d: compiled(x, p.to(x.device), m, s, d))
                                          if compiled else None, why)
    impls["PIL per image (1 process)"] = (None, "")  # special-cased: runs on the CPU, on PIL_IMAGES images
    for backend in ("native", "triton"):
        status = runs_on(backend, device, "photometric")  # no native CUDA code: the registry says so
        if backend == "triton" and device.type == "cpu":
            status = status._replace(available=False, detail="the Triton interpreter is a correctness tool, not timed")
        fn = (lambda x, p, m, s, d, b=backend: run_backend(b, x, p, m, s, d)) if status.available else None
        impls[f"ours ({backend})"] = (fn, "" if status.available else status.detail)
    return impls


def configs(device: torch.device, quick: bool) -> list[tuple[int, torch.dtype]]:
    if device.type == "cuda":
        return [(256, torch.float32), (256, torch.bfloat16)] if quick else \
            [(128, torch.float32), (256, torch.float32), (256, torch.bfloat16)]
    return [(16, torch.float32)] if quick else [(32, torch.float32), (32, torch.bfloat16)]


def batch(device: torch.device, b: int, size: int = 224, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, size, size), generator=gen, dtype=torch.uint8)
    # smooth the noise a little so hue/saturation see photo-like colours, not only saturated noise
    images = torch.nn.functional.avg_pool2d(images.float(), 5, 1, 2).round().to(torch.uint8).to(device)
    cfg = aug.AugmentConfig(out_size=size)
    params = aug.sample_view_params(b, cfg, aug.generator_for_step(seed, 0))
    table = torch.stack([params.photometric_params("source"), params.photometric_params("target")])
    return images, table, cfg


def _time_pil(images: torch.Tensor, table: torch.Tensor, cfg, budget_s: float) -> float:
    n = min(PIL_IMAGES, images.shape[0])
    hwc = images[:n].permute(0, 2, 3, 1).contiguous().cpu().numpy()
    src, tgt = table[0, :n].numpy(), table[1, :n].numpy()
    ms = time_fn(lambda: pil_two_views(hwc, src, tgt, cfg.mean, cfg.std), torch.device("cpu"), warmup=1,
                 budget_s=budget_s)
    return ms * images.shape[0] / n


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    rows = []
    impls = implementations(device, quick)
    budget = 0.5 if quick else 1.5
    for n_case, (b, out_dtype) in enumerate(configs(device, quick)):
        images, table, cfg = batch(device, b)
        h, w = images.shape[2], images.shape[3]
        out_bytes = torch.empty((), dtype=out_dtype).element_size()
        nbytes = b * 3 * h * w * (1 + 2 * out_bytes)
        dname = str(out_dtype).replace("torch.", "")
        case = f"B={b} 224x224 uint8 -> 2 views {dname}"
        config = {"batch": b, "size": h, "out_dtype": dname, "blurred_sources": int((table[0, :, 5] > 0).sum())}
        want = run_backend("reference", images, table, cfg.mean, cfg.std, out_dtype).float()
        for name, (fn, why) in impls.items():
            progress(f"augment | {case} | {name}")
            if name.startswith("PIL"):
                t0 = time.perf_counter()
                ms = _time_pil(images, table, cfg, budget)
                rows.append(Row(SUITE, case, name, ms, nbytes, baseline=BASELINE, config=config,
                                note=f"CPU, one process, measured on {min(PIL_IMAGES, b)} images and scaled",
                                extra={"img/s": b / ms * 1e3}, headline=n_case == 0))
                progress(f"  PIL took {time.perf_counter() - t0:.1f}s")
                continue
            if fn is not None and quick and n_case > 0 and "compile" in name:
                fn, why = None, "--quick: timed on the first case only (each output dtype recompiles)"
            if fn is None:
                rows.append(Row(SUITE, case, name, None, nbytes, note=why, config=config))
                continue
            try:
                with quiet_compile():
                    got = fn(images, table, cfg.mean, cfg.std, out_dtype)  # also compiles
                    ms = time_fn(lambda: fn(images, table, cfg.mean, cfg.std, out_dtype), device, budget_s=budget)
            except Exception as exc:
                rows.append(Row(SUITE, case, name, None, nbytes, note=f"failed: {exc.__class__.__name__}: {exc}"[:200],
                                config=config))
                continue
            # Correctness on the benchmark's own inputs: pixels off by more than the dtype's rounding
            # (a solarise threshold crossed by an ulp can flip a rare pixel).
            tol = 2e-2 if out_dtype != torch.float32 else 1e-3
            bad = float(((got.float() - want).abs() > tol).float().mean())
            note = "" if bad < 1e-4 else f"MISMATCH vs reference: {bad:.2%} of pixels"
            rows.append(Row(SUITE, case, name, ms, nbytes, baseline=BASELINE, config=config, note=note,
                            extra={"img/s": b / ms * 1e3}, headline=n_case == 0))
        del images, want
    return rows

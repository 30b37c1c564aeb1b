"""Linear suite: the model's fp32 linear layers, forward and backward, on ATen's GEMM and on ours.

Cases are the products one training step runs: the `tiny` preset's encoder layers (2048 rows: batch 32 x
64 patches through the target encoder), its predictor layers (5120 rows: 128 repeated sequences of 40
tokens), and ViT-Ti/16 at 224 px (I-JEPA's `ijepa_vitt16`, 6272 rows). Each is timed as one forward and
backward (input, weight and bias gradients), FLOPs 3 x 2MKN.

  F.linear (ATen)       torch's own linear: MKL's sgemm on the CPU, what I-JEPA's code runs
  ours (oneDNN)         `iwm_kernels.linear`: the same products on oneDNN (CPU fp32)

CPU only: on CUDA both are cuBLAS, and `iwm_kernels.linear` is F.linear there.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from iwm_kernels.gemm import linear, onednn_available

from ..common import Row, time_fns

SUITE = "linear"
BASELINE = "F.linear (ATen)"
OURS = "ours (oneDNN)"
# (label, rows, in, out)
CASES = (
    ("tiny encoder fc1 [2048, 192 -> 768]", 2048, 192, 768),
    ("tiny encoder fc2 [2048, 768 -> 192]", 2048, 768, 192),
    ("tiny encoder qkv [2048, 192 -> 576]", 2048, 192, 576),
    ("tiny predictor qkv [5120, 96 -> 288]", 5120, 96, 288),
    ("tiny predictor fc1 [5120, 96 -> 384]", 5120, 96, 384),
    ("ViT-Ti/16 fc1 [6272, 192 -> 768]", 6272, 192, 768),
)
QUICK = CASES[:2] + CASES[4:5]
HEADLINE = CASES[0][0]


def implementations() -> dict[str, Callable]:
    return {BASELINE: F.linear, OURS: linear}


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    rows = []
    why = ("CPU only: on CUDA both are cuBLAS" if device.type != "cpu" else
           "" if onednn_available() else "this PyTorch has no oneDNN linear (or torch.backends.mkldnn is off)")
    for label, m, k, n in (QUICK if quick else CASES):
        flops = 3 * 2 * m * k * n
        config = {"rows": m, "in": k, "out": n, "dtype": "float32", "timed": "forward + backward"}
        if why:
            rows += [Row(SUITE, label, name, None, note=why) for name in implementations()]
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=gen).requires_grad_()
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).requires_grad_()
        b = torch.randn(n, generator=gen).requires_grad_()
        grad = torch.randn(m, n, generator=gen)

        def step(fn):
            x.grad = w.grad = b.grad = None
            fn(x, w, b).backward(grad)
            return x.grad, w.grad, b.grad

        progress(f"linear | {label}")
        want = step(F.linear)
        got = step(linear)
        bad = max(float(((g - e).abs().max() / e.abs().max().clamp_min(1.0))) for g, e in zip(got, want))
        timed = time_fns({name: (lambda f=fn: step(f)) for name, fn in implementations().items()}, device,
                         budget_s=0.6 if quick else 1.5)
        for name in implementations():
            ms = timed.get(name)
            if isinstance(ms, BaseException):
                rows.append(Row(SUITE, label, name, None, note=f"failed: {type(ms).__name__}: {ms}"[:200]))
                continue
            note = f"MISMATCH vs F.linear: {bad:.3g} relative" if name == OURS and bad > 1e-5 else ""
            rows.append(Row(SUITE, label, name, None if note else ms, flops=flops, baseline=BASELINE, note=note,
                            config=config, headline=label == HEADLINE,
                            held_equal="the same fp32 products and gradients (forward, input, weight, bias)"))
    return rows

"""Native photometric augmentation: the C++ CPU op (csrc/photometric.cpp). No CUDA kernel (Triton covers
CUDA tensors)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _native


def photometric_views(images: torch.Tensor, params: torch.Tensor, plan, mean: Sequence[float],
                      std: Sequence[float], out_dtype: torch.dtype) -> torch.Tensor:
    """images [B, 3, H, W] on the CPU, params [V, B, NUM_PARAMS] -> [V, B, 3, H, W]."""
    if images.device.type != "cpu":
        raise RuntimeError("photometric: the native backend runs on CPU tensors only")
    ops = _native.ops()
    params = params.to(device="cpu", dtype=torch.float32).contiguous()
    return ops.photometric(images, params, plan.slot_of, plan.taps.contiguous(), list(mean), list(std), out_dtype)

"""Reference EMA: I-JEPA's per-parameter loop, `t.mul_(m).add_((1 - m) * o)`.

Written for clarity, not speed: one multiply, one scaled copy and one add per tensor. Mixed dtypes
follow the contract of the fast backends (arithmetic in fp32, rounded once into the target's dtype),
so that every backend can be compared to this one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


@torch.no_grad()
def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: float,
                momentum_tensor: Optional[torch.Tensor] = None) -> None:
    for t, o in zip(targets, onlines):
        m = momentum_tensor.to(device=t.device, dtype=torch.float32) if momentum_tensor is not None else momentum
        if t.dtype == torch.float32 and o.dtype == torch.float32:
            t.mul_(m).add_((1 - m) * o)
        else:
            t.copy_(t.float().mul_(m).add_((1 - m) * o.float()))

"""Reference EMA: I-JEPA's per-parameter loop, `t.mul_(m).add_((1 - m) * o)`.

Written for clarity, not speed: one multiply, one scaled copy and one add per tensor. The contract every
fast backend follows and is compared against:
- arithmetic in fp64 when the target or the online tensor is fp64, else fp32, rounded once into the
  target's dtype;
- the form t*m + o*(1-m) (a convex combination: finite inputs give a finite result, even near the fp32
  maximum, where the lerp form o - t overflows), with exact endpoints: m == 1 leaves the target
  bit-identical, m == 0 makes it equal to the online tensor;
- a momentum tensor is used on its device; a value not finite or outside [0, 1] leaves every target
  unchanged and sets the device's momentum error flag (see momentum_flag).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .momentum_flag import momentum_error_flag


def compute_dtype(target: torch.Tensor, online: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (target.dtype, online.dtype) else torch.float32


@torch.no_grad()
def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: float,
                momentum_tensor: Optional[torch.Tensor] = None) -> None:
    if not targets:
        return
    if momentum_tensor is None:
        for t, o in zip(targets, onlines):
            _update_with_number(t, o, momentum)
        return
    m = momentum_tensor.to(device=targets[0].device, dtype=torch.float64)
    valid = (m >= 0) & (m <= 1)  # False for NaN
    flag = momentum_error_flag(m.device)
    flag.copy_(flag | ~valid)
    for t, o in zip(targets, onlines):
        c = compute_dtype(t, o)
        tc, oc, mc = t.to(c), o.to(c), m.to(c)
        blended = torch.where(mc == 1, tc, torch.where(mc == 0, oc, tc * mc + oc * (1 - mc)))
        t.copy_(torch.where(valid, blended, tc))


def _update_with_number(t: torch.Tensor, o: torch.Tensor, m: float) -> None:
    if m == 1.0:
        return
    if m == 0.0:
        t.copy_(o)
    elif t.dtype == o.dtype and t.dtype in (torch.float32, torch.float64):
        t.mul_(m).add_((1 - m) * o)
    else:
        c = compute_dtype(t, o)
        t.copy_(t.to(c).mul_(m).add_((1 - m) * o.to(c)))

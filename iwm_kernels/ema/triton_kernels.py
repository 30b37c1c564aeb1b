"""Triton multi-tensor EMA: one launch per (target dtype, online dtype) group over a pointer table.

Imported only when the triton backend is chosen, so `import iwm_kernels` never needs triton.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .plan import CHUNK, get_plans

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}


@triton.jit
def _ema_multi_tensor_kernel(target_ptrs, online_ptrs, numels, block_tensor, block_start,
                             momentum, momentum_ptr,
                             TARGET_DTYPE: tl.constexpr, ONLINE_DTYPE: tl.constexpr,
                             MOMENTUM_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + tensor)
    t_ptr = tl.load(target_ptrs + tensor).to(tl.pointer_type(TARGET_DTYPE))
    o_ptr = tl.load(online_ptrs + tensor).to(tl.pointer_type(ONLINE_DTYPE))
    if MOMENTUM_FROM_PTR:
        m = tl.load(momentum_ptr).to(tl.float32)
    else:
        m = momentum
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask).to(tl.float32)
    # t*m + o*(1-m) as a two-sided lerp (torch.lerp's form): one FMA, exact at m == 1 and at m == 0.
    w = 1.0 - m
    if w < 0.5:
        t = t + w * (o - t)
    else:
        t = o - m * (o - t)
    tl.store(t_ptr + offs, t.to(TARGET_DTYPE), mask=mask)


def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: float,
                momentum_tensor: Optional[torch.Tensor] = None, key: Optional[tuple] = None) -> None:
    if not targets:
        return
    device = targets[0].device
    if momentum_tensor is not None:
        mom_ptr = momentum_tensor.to(device=device, dtype=torch.float32)
    else:
        mom_ptr = None
    for plan in get_plans(targets, onlines, key):
        _ema_multi_tensor_kernel[(plan.n_blocks,)](
            plan.target_ptrs, plan.online_ptrs, plan.numels, plan.block_tensor, plan.block_start,
            0.0 if mom_ptr is not None else momentum, mom_ptr if mom_ptr is not None else plan.numels,
            TARGET_DTYPE=_TL_DTYPE[plan.target_dtype], ONLINE_DTYPE=_TL_DTYPE[plan.online_dtype],
            MOMENTUM_FROM_PTR=mom_ptr is not None, BLOCK=CHUNK, num_warps=8,
        )

"""Triton multi-tensor EMA: one launch per (target dtype, online dtype) group over a pointer table.

Imported only when the triton backend is chosen, so `import iwm_kernels` never needs triton.
Arithmetic follows reference.py: fp64 when either side is fp64, else fp32; t*m + o*(1-m) with exact
endpoints; a momentum read from memory that is not finite or outside [0, 1] stores nothing and sets
the error flag.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .momentum_flag import momentum_error_flag
from .plan import CHUNK, get_plans

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.float64: tl.float64}


@triton.jit
def _ema_multi_tensor_kernel(target_ptrs, online_ptrs, numels, block_tensor, block_start,
                             momentum, momentum_ptr, error_flag,
                             TARGET_DTYPE: tl.constexpr, ONLINE_DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                             MOMENTUM_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + tensor)
    t_ptr = tl.load(target_ptrs + tensor).to(tl.pointer_type(TARGET_DTYPE))
    o_ptr = tl.load(online_ptrs + tensor).to(tl.pointer_type(ONLINE_DTYPE))
    if MOMENTUM_FROM_PTR:
        m = tl.load(momentum_ptr).to(COMPUTE)
        bad = (m != m) | (m < 0.0) | (m > 1.0)
        tl.store(error_flag, 1, mask=bad & (pid == 0))
        n = tl.where(bad, 0, n)  # an invalid momentum: every tensor looks empty, nothing is stored
    else:
        m = tl.cast(momentum, COMPUTE)  # validated on the host
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask).to(COMPUTE)
    o = tl.load(o_ptr + offs, mask=mask).to(COMPUTE)
    # A convex combination never overflows (the lerp form o - t can); the endpoints are exact.
    out = t * m + o * (1.0 - m)
    out = tl.where(m == 1.0, t, tl.where(m == 0.0, o, out))
    tl.store(t_ptr + offs, out.to(TARGET_DTYPE), mask=mask)


def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: float,
                momentum_tensor: Optional[torch.Tensor] = None, key: Optional[tuple] = None) -> None:
    if not targets:
        return
    device = targets[0].device
    flag = momentum_error_flag(device)
    mom = None
    if momentum_tensor is not None:
        mom = momentum_tensor if momentum_tensor.dtype in (torch.float32, torch.float64) else \
            momentum_tensor.float()
        mom = mom.to(device)
    for plan in get_plans(targets, onlines, key):
        wide = torch.float64 in (plan.target_dtype, plan.online_dtype)
        group_mom = mom
        if group_mom is None and wide:
            # Triton passes Python floats as fp32: an fp64 group reads its momentum from memory instead
            # (torch.full is a fill kernel, no host-to-device copy).
            group_mom = torch.full((), momentum, dtype=torch.float64, device=device)
        _ema_multi_tensor_kernel[(plan.n_blocks,)](
            plan.target_ptrs, plan.online_ptrs, plan.numels, plan.block_tensor, plan.block_start,
            0.0 if group_mom is not None else momentum, group_mom if group_mom is not None else plan.numels,
            flag,
            TARGET_DTYPE=_TL_DTYPE[plan.target_dtype], ONLINE_DTYPE=_TL_DTYPE[plan.online_dtype],
            COMPUTE=tl.float64 if wide else tl.float32,
            MOMENTUM_FROM_PTR=group_mom is not None, BLOCK=CHUNK, num_warps=8,
        )

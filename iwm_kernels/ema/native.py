"""Native EMA: the C++ CPU op, or the CUDA multi-tensor kernel driven by the shared pointer plan."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _native
from .momentum_flag import momentum_error_flag
from .plan import CHUNK, get_plans

# Must match the DType enum in csrc/cuda/ema_kernel.cu.
_CUDA_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def ema_update_(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor], momentum: float,
                momentum_tensor: Optional[torch.Tensor] = None, key: Optional[tuple] = None) -> None:
    if not targets:
        return
    ops = _native.ops()
    device = targets[0].device
    if device.type == "cpu":
        mt = momentum_tensor.to("cpu") if momentum_tensor is not None else None
        ops.ema_update_(list(targets), list(onlines), momentum, mt)
        return
    mt = None
    if momentum_tensor is not None:
        # The kernel reads fp32 or fp64 momentum as is (no cast launch per call).
        mt = momentum_tensor if momentum_tensor.dtype in (torch.float32, torch.float64) else momentum_tensor.float()
        mt = mt.to(device)
    flag = momentum_error_flag(device)
    stream = torch.cuda.current_stream(device).cuda_stream
    for plan in get_plans(targets, onlines, key):
        ops.ema_update_table_(plan.target_ptrs, plan.online_ptrs, plan.numels, plan.block_tensor,
                              plan.block_start, plan.n_blocks, CHUNK, _CUDA_DTYPE_CODE[plan.target_dtype],
                              _CUDA_DTYPE_CODE[plan.online_dtype], momentum, mt, flag, stream)

"""Row-wise pieces the model's layers share: a linear added into a residual stream, and a row gather.

`residual_linear(x, h, linear)` is `x + linear(h)` with the residual added inside the product
(`iwm_kernels.linear`: oneDNN's sum epilogue for fp32 on the CPU, else ATen's addmm accumulating into
residual + bias, one pass over the output less than the two-step form). Same value and gradients.

`gather_rows(x, rows)` is `x.index_select(0, rows)` for rows without repeats, whose backward scatters
(`index_copy`) instead of index_select's accumulating `index_add`, which runs serially on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from .gemm import linear as linear_op


def residual_linear(x: torch.Tensor, h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x + linear(h), for x [..., out] and h [..., in] with the same leading shape."""
    return linear_op(h, linear.weight, linear.bias, residual=x)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:])).index_copy_(0, rows, grad), None


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] along dim 0 for int64 `rows` without repeats (not checked: a repeat would drop gradient)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, rows)
    return x.index_select(0, rows)

"""Row-wise pieces the model's layers share: a linear added into a residual stream, and a row gather.

`residual_linear(x, h, linear)` is `x + linear(h)` in one pass over the output less: ATen's addmm copies
the broadcast bias into a fresh output before the matmul accumulates into it, and the residual add is
another pass; here the bias goes into the residual (one pass) and the matmul accumulates into that in
place (`addmm_`, beta = 1). Same value and gradients; under autocast, with mixed dtypes or a strided
residual it is the plain form.

`gather_rows(x, rows)` is `x.index_select(0, rows)` for rows without repeats, whose backward scatters
(`index_copy`) instead of index_select's accumulating `index_add`, which runs serially on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn


def residual_linear(x: torch.Tensor, h: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x + linear(h), for x [..., out] and h [..., in] with the same leading shape."""
    bias, weight = linear.bias, linear.weight
    if (bias is None or not x.is_contiguous() or x.dtype != h.dtype or h.dtype != weight.dtype
            or x.shape[:-1] != h.shape[:-1] or torch.is_autocast_enabled(x.device.type)):
        return x + linear(h)
    # A fresh tensor, not a view of one: writing into it in place is safe and costs autograd nothing
    # (an in-place write into a view would make the backward copy the gradient back through the view).
    out = x.reshape(-1, x.shape[-1]) + bias
    return out.addmm_(h.reshape(-1, h.shape[-1]), weight.t()).view(x.shape)


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

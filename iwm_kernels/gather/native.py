"""Native gather: the C++ CPU ops in csrc/gather.cpp (there is no native CUDA path: on GPUs the
Triton kernel is the fast path, and a CUDA copy of it would not be faster for a memory-bound gather)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _native
from .reference import accumulate_dtype


def _common(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor], pos, bias):
    dim = x.shape[-1]
    acc = accumulate_dtype(x.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    flat = index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if index.dim() == 2:
        row_len, num_seqs, cu = index.shape[1], index.shape[0], None
    else:
        row_len, num_seqs, cu = 0, cu_seqlens.numel() - 1, cu_seqlens.to(torch.int64).contiguous()
    pos_acc = pos.reshape(-1, dim).to(acc).contiguous() if pos is not None else None
    bias_acc = bias.to(acc).contiguous() if bias is not None else None
    return x, flat, cu, row_len, num_seqs, pos_acc, bias_acc


def gather_tokens(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                  pos: Optional[torch.Tensor], bias: Optional[torch.Tensor], normalize: bool, eps: float
                  ) -> torch.Tensor:
    dim = x.shape[-1]
    if index.numel() == 0:
        return x.new_empty(*index.shape, dim)
    x, flat, cu, row_len, num_seqs, pos_acc, bias_acc = _common(x, index, cu_seqlens, pos, bias)
    out = _native.ops().gather_tokens_fwd(x, flat, cu, row_len, num_seqs, pos_acc, bias_acc, normalize, eps)
    return out.view(*index.shape, dim)


def gather_tokens_backward(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor], pos: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], normalize: bool, eps: float,
                           needs: tuple[bool, bool, bool]) -> tuple[Optional[torch.Tensor], ...]:
    need_x, need_pos, need_bias = needs
    need_pos, need_bias = need_pos and pos is not None, need_bias and bias is not None
    if index.numel() == 0:
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(pos) if need_pos else None,
                torch.zeros_like(bias) if need_bias else None)
    shape_x = x.shape
    # pos and bias are read only to recompute a normalised row; otherwise they are zero-stride stand-ins
    # (see _kept_for_backward) that _common would expand into full copies.
    x, flat, cu, row_len, num_seqs, pos_acc, bias_acc = _common(x, index, cu_seqlens, pos if normalize else None,
                                                                bias if normalize else None)
    dim = x.shape[-1]
    grad = grad_out.reshape(-1, dim)
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    if not grad.is_contiguous():
        grad = grad.contiguous()
    dx, dpos, dbias = _native.ops().gather_tokens_bwd(grad, x, flat, cu, row_len, num_seqs, pos_acc, bias_acc,
                                                      normalize, eps, need_x, need_pos, need_bias)
    return (dx.view(shape_x) if need_x else None,
            dpos.to(pos.dtype).view(pos.shape) if need_pos else None,
            dbias.to(bias.dtype) if need_bias else None)


def output_pool_stats() -> dict[str, int]:
    """The CPU output pool (csrc/cpu_output_pool.h): limit and cached bytes, hits, misses."""
    limit, cached, hits, misses = _native.ops().cpu_output_pool_stats()
    return {"limit_bytes": limit, "cached_bytes": cached, "hits": hits, "misses": misses}


def set_output_pool_limit(limit_bytes: int) -> int:
    """Most bytes of free output blocks kept for reuse (0 disables the pool); returns the old limit."""
    return int(_native.ops().cpu_output_pool_set_limit(int(limit_bytes)))

"""Reference masked-token gather: eager PyTorch written for clarity (tests and benchmarks compare to it).

Each selected row is x[b, i] (+ pos[i]) (+ bias[b]), summed in fp32 (fp64 for fp64 inputs), optionally
layer-normalised without affine parameters, and rounded once into x's dtype. Gradients come from
autograd through these same lines (advanced-indexing backward sums repeated indices).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_samples(index: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """[T] int64: the sample each (flattened) index row belongs to."""
    if index.dim() == 2:
        batch, k = index.shape
        return torch.arange(batch, device=index.device).repeat_interleave(k)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=index.device), lengths,
                                   output_size=index.numel())


def gather_tokens(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *,
                  pos: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  normalize: bool = False, eps: float = 1e-5) -> torch.Tensor:
    dim = x.shape[-1]
    acc = accumulate_dtype(x.dtype)
    tokens = index.reshape(-1).long()
    samples = row_samples(index, cu_seqlens)
    x_rows = samples if x.shape[0] != 1 else torch.zeros_like(samples)  # a [1, N, D] x serves every sample
    # Upcast before indexing, so that the backward also sums repeated indices in the wide type.
    out = x.to(acc)[x_rows, tokens]
    if pos is not None:
        out = out + pos.reshape(-1, dim).to(acc)[tokens]
    if bias is not None:
        out = out + bias.to(acc)[samples]
    if normalize:
        out = F.layer_norm(out, (dim,), eps=eps)
    return out.to(x.dtype).reshape(*index.shape, dim)


def apply_masks(x: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """I-JEPA's apply_masks: x gathered with each [B, K] mask, concatenated along the batch."""
    return torch.cat([torch.gather(x, 1, m.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])) for m in masks])


def gather_tokens_backward(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor], pos: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], normalize: bool, eps: float,
                           needs: tuple[bool, bool, bool]) -> tuple[Optional[torch.Tensor], ...]:
    """(dx, dpos, dbias), None where not needed: the layer-norm backward per row, then scatter-adds.

    Written out rather than taken from autograd so that it also runs inside a custom op (where
    autograd is off); tests check it against autograd through `gather_tokens`. Without `normalize`,
    x, pos and bias are only read for their shapes and dtypes.
    """
    dim = x.shape[-1]
    acc = accumulate_dtype(x.dtype)
    tokens = index.reshape(-1).long()
    samples = row_samples(index, cu_seqlens)
    x_rows = samples if x.shape[0] != 1 else torch.zeros_like(samples)
    g = grad_out.reshape(-1, dim).to(acc)
    if normalize:
        s = x.to(acc)[x_rows, tokens]
        if pos is not None:
            s = s + pos.reshape(-1, dim).to(acc)[tokens]
        if bias is not None:
            s = s + bias.to(acc)[samples]
        mean = s.mean(-1, keepdim=True)
        rstd = torch.rsqrt(((s - mean) ** 2).mean(-1, keepdim=True) + eps)
        xhat = (s - mean) * rstd
        g = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dx = dpos = dbias = None
    if needs[0]:
        dx = torch.zeros(x.shape, dtype=acc, device=x.device).index_put_((x_rows, tokens), g, accumulate=True)
        dx = dx.to(x.dtype)
    if needs[1] and pos is not None:
        dpos = torch.zeros(pos.shape[-2:], dtype=acc, device=g.device).index_put_((tokens,), g, accumulate=True)
        dpos = dpos.to(pos.dtype).view(pos.shape)
    if needs[2] and bias is not None:
        dbias = torch.zeros(bias.shape, dtype=acc, device=g.device).index_put_((samples,), g, accumulate=True)
        dbias = dbias.to(bias.dtype)
    return dx, dpos, dbias

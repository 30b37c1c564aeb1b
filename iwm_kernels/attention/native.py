"""Native varlen attention: the packed sequences padded to [num_seqs, longest] and one
`F.scaled_dot_product_attention` call with a boolean mask built from the layout.

This is pure PyTorch on purpose. On the CPU, SDPA dispatches to ATen's fused flash-attention kernel
(blocked, OpenMP-parallel, fp32 accumulation, fused backward), which accepts the boolean mask. A C++
kernel of ours could save two things: the padding (the benchmark's "padding overhead" figure: about
1.3x the useful pairs at ViT-B predictor shapes) and, in shared-context mode, the fully masked blocks.
The second was tried in PyTorch (one SDPA call over the context groups, one over the target blocks
against [context, own block]: ~1.9x fewer pairs) and measured on the 2-core development machine (B=8,
12 heads of 32, forward+backward): no faster than the padded call, because ATen's kernel works in query
blocks of 64+ rows while the target blocks are ~30 tokens. A hand-written C++ kernel would first have
to match ATen's blocked GEMMs before its savings showed, so the padded call stays; equal-length layouts
(I-JEPA's truncated masks) skip the padding. On CUDA the same code runs through SDPA's CUDA backends
(the Triton kernels are the fast path there). The forward is differentiable through autograd (eager
use); the explicit backward below serves the custom op under torch.compile, where autograd cannot
record.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .layout import Layout


def _padded_rows(layout: Layout) -> torch.Tensor:
    """Row of each packed token in the flattened [S * L] padded buffer."""
    return layout._get("padded_rows", lambda: layout.seq_index * layout.longest + layout.positions)


def _pad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[T, H, Dh] -> [S, H, L, Dh] with zeros in the padding."""
    S, L = layout.num_seqs, layout.longest
    buf = x.new_zeros((S * L,) + tuple(x.shape[1:]))
    buf = buf.index_copy(0, _padded_rows(layout), x)
    return buf.view(S, L, *x.shape[1:]).transpose(1, 2)


class _GatherRows(torch.autograd.Function):
    """x.index_select(0, rows) for rows without repeats. Its backward scatters (index_copy) instead of
    index_select's accumulating index_add, which runs serially on the CPU."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:])).index_copy_(0, rows, grad), None


def _unpad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[S, H, L, Dh] -> [T, H, Dh]."""
    S, H, L, D = x.shape
    flat = x.transpose(1, 2).reshape(S * L, H, D)
    if torch.is_grad_enabled() and flat.requires_grad:
        return _GatherRows.apply(flat, _padded_rows(layout))
    return flat.index_select(0, _padded_rows(layout))


def mask(layout: Layout) -> Optional[torch.Tensor]:
    """Boolean [S, 1, L or 1, L] mask for the padded batch (None when nothing needs masking).

    Padding query rows are allowed every key of their sequence (or, for an empty sequence, every
    padding key) so that no row is fully masked: their outputs are dropped, and a fully masked row
    would put NaN into the backward.
    """
    def make():
        S, L = layout.num_seqs, layout.longest
        device = layout.cu_seqlens.device
        lengths = layout.lengths
        ar = torch.arange(L, device=device)
        valid = ar[None, :] < lengths[:, None]                             # [S, L]
        if layout.segment_ids is None:
            # Every length is <= L and they sum to T, so T == S * L means all equal L (no value read).
            if layout.total == S * L:
                return None
            return (valid | (lengths == 0)[:, None])[:, None, None, :]     # key padding only
        seg = torch.full((S * L,), -1, dtype=torch.long, device=device)
        seg = seg.index_copy(0, _padded_rows(layout), layout.segment_ids.long()).view(S, L)
        allowed = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
        allowed &= valid[:, None, :]
        allowed |= ~valid[:, :, None] & (valid | (lengths == 0)[:, None])[:, None, :]
        return allowed[:, None]
    return layout._get("native_mask", make)


# Autocast is off inside, as in the reference and the Triton kernels: the output has q's dtype and the
# accumulation is fp32 whatever autocast region the call sits in (SDPA alone would run fp32 inputs in
# bf16 under CPU autocast). Inputs that autocast already lowered (the module's qkv projection) stay low.
@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, scale: float,
                     dropout_p: float = 0.0) -> torch.Tensor:
    if layout.total == 0 or layout.longest == 0:
        return q.clone()  # no tokens (T == 0); still part of the autograd graph
    if layout.segment_ids is None and layout.total == layout.num_seqs * layout.longest:
        # Equal lengths (I-JEPA's truncated masks): a view, no padding, no mask.
        S, L = layout.num_seqs, layout.longest
        qp, kp, vp = (x.view(S, L, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qp, kp, vp, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2).reshape(q.shape)
    qp, kp, vp = _pad(q, layout), _pad(k, layout), _pad(v, layout)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask(layout), dropout_p=dropout_p, scale=scale)
    return _unpad(out, layout)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def varlen_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              layout: Layout, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by the textbook formulas on the padded batch, fp32 (float64 kept)."""
    if layout.total == 0 or layout.longest == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qp, kp, vp, dop = (_pad(x.to(ct), layout) for x in (q, k, v, grad_out))
    s = torch.matmul(qp, kp.transpose(-1, -2)) * scale
    m = mask(layout)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vp)
    dp = torch.matmul(dop, vp.transpose(-1, -2))
    ds = p * (dp - (dop * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kp) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qp) * scale
    dv = torch.matmul(p.transpose(-1, -2), dop)
    return (_unpad(dq, layout).to(q.dtype), _unpad(dk, layout).to(k.dtype), _unpad(dv, layout).to(v.dtype))

"""Reference varlen attention: one `F.scaled_dot_product_attention` call per sequence, explicit mask.

Slow and obviously right; every test and benchmark compares to it. Low-precision inputs are computed
in fp32 and rounded once at the end (the accumulation contract of the fast backends); float64 stays
float64 (for gradcheck).

`segment_mask` is the one statement of the segment rule: a query in segment 0 sees only segment-0 keys;
a query in segment g > 0 sees segment-0 keys and the keys of its own segment.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def segment_mask(seg_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """[Lq, Lk] boolean: True where the query may attend to the key (same sequence assumed)."""
    seg_q, seg_k = seg_q[:, None], seg_k[None, :]
    return (seg_k == 0) | (seg_k == seg_q)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sequences(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     segment_ids: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """[T, H, Dh] -> [T, H, Dh]; differentiable through autograd. Autocast is off inside, so the
    fp32 computation stays fp32."""
    ct = _compute_dtype(q.dtype)
    outs = []
    for start, end in _sequences(cu_seqlens):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).to(ct) for x in (q, k, v))  # [H, L, Dh]
        mask = None
        if segment_ids is not None:
            seg = segment_ids[start:end]
            mask = segment_mask(seg, seg)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        outs.append(o.transpose(0, 1).to(q.dtype))
    if not outs:
        return q.clone()  # no tokens (T == 0); still part of the autograd graph
    return torch.cat(outs)


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def varlen_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor, segment_ids: Optional[torch.Tensor], scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) by the textbook formulas, per sequence (used where autograd cannot record: inside
    the custom op's backward under torch.compile)."""
    ct = _compute_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(q.shape, dtype=ct, device=q.device) for _ in range(3))
    for start, end in _sequences(cu_seqlens):
        if end == start:
            continue
        qs, ks, vs, dos = (x[start:end].transpose(0, 1).to(ct) for x in (q, k, v, grad_out))
        s = torch.matmul(qs, ks.transpose(1, 2)) * scale
        if segment_ids is not None:
            seg = segment_ids[start:end]
            s = s.masked_fill(~segment_mask(seg, seg), float("-inf"))
        p = torch.softmax(s, dim=-1)                             # [H, L, L]
        o = torch.matmul(p, vs)
        dp = torch.matmul(dos, vs.transpose(1, 2))
        ds = p * (dp - (dos * o).sum(-1, keepdim=True))
        dq[start:end] = (torch.matmul(ds, ks) * scale).transpose(0, 1)
        dk[start:end] = (torch.matmul(ds.transpose(1, 2), qs) * scale).transpose(0, 1)
        dv[start:end] = torch.matmul(p.transpose(1, 2), dos).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def mask_table(cu_seqlens: torch.Tensor, segment_ids: Optional[torch.Tensor], labels: "list[str]") -> str:
    """Who attends to whom in a packed layout, as a markdown table (■ attends, · does not), from the
    same rule the attention applies: same sequence, and `segment_mask` inside it. Rows are labelled
    with their segment id, or with their sequence index ("seq i") without segment_ids. The layout
    pictures in docs/models.md and docs/design.md are this function's output."""
    total = int(cu_seqlens[-1])
    if len(labels) != total:
        raise ValueError(f"labels: expected {total} (one per packed row), got {len(labels)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.cpu())
    visible = seq[:, None] == seq[None, :]
    if segment_ids is not None:
        visible &= segment_mask(segment_ids.cpu(), segment_ids.cpu())
    notes = segment_ids.tolist() if segment_ids is not None else [f"seq {s}" for s in seq.tolist()]
    lines = ["| query \\ key | " + " | ".join(labels) + " |", "|---" * (total + 1) + "|"]
    for label, note, row in zip(labels, notes, visible.tolist()):
        lines.append(f"| {label} ({note}) | " + " | ".join("■" if v else "·" for v in row) + " |")
    return "\n".join(lines)

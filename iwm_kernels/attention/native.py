"""Native varlen attention: pure PyTorch over `F.scaled_dot_product_attention`, which on the CPU is
ATen's fused flash-attention kernel (blocked, OpenMP-parallel, fp32 accumulation, fused backward), and
for ragged plain layouts the C++ extension's `varlen_sdpa` over the same kernel.

How a layout runs (first that applies):
- equal lengths, no segments (I-JEPA's truncated masks): one call on views of the packed rows;
- lengths known on the host (`Layout.host_lengths`: the model passes a sampler's `MaskBatch.host_sizes`
  as the op's `host_lengths`, a caller may `layout.attach_lengths` Python ints, or a checked layout read
  them), on the CPU: no padding.
  - Plain varlen, float32 / bfloat16, no dropout, the extension built (`_runs_in_native`), and enough
    padding saved per run (NATIVE_MIN_SAVED_PAIRS): `varlen_sdpa` (csrc/varlen_sdpa.cpp) runs the flash
    kernel once per run of consecutive equal-length sequences (the repeated predictor's M blocks of a
    sample share one), the runs spread over the threads in one parallel region, each call on one
    thread: every thread busy, no Python per call. The same kernel on the same rows as SDPA per
    sequence, so the same numbers.
  - Otherwise at most LOOP_MAX_SEQS sequences, from Python. Plain varlen (enough padding saved per call,
    LOOP_MIN_SAVED_PAIRS): one SDPA call per run, on views. Segments with known segment lengths: on the
    shared layout of truncated masks (every sequence [context | M equal blocks]) two batched calls, the
    contexts over themselves and every block over [its context, itself]; otherwise per sequence, the
    context, then each block over [context, block]. Only the visible pairs are computed;
- otherwise: the sequences padded to [num_seqs, longest] and one call with a boolean mask (padded rows
  and masked pairs are computed and thrown away).

Measured on the 2-core development machine, one thread (CPU time, forward+backward, I-JEPA's ViT-Ti/16
masks, B=32), the Python loop: the context encoder's 32 ragged sequences (66-122 tokens, 3 heads of 64)
17 ms per layer against 27 ms padded; the repeated predictor's 128 (102-158, 3 heads of 32) 67 ms
against 109 ms; the shared predictor on truncated masks 27 ms against 37 ms padded and 32 ms per
sequence with a mask. At two threads the loop's calls (3 heads: 3 work items each) leave a thread idle;
`varlen_sdpa` keeps both busy. In the benchmark reports (`python -m benchmarks.report --device cpu`) the
attention suite's ragged pred384 case went from level with padded SDPA (0.86-1.02x in the reports up to
2026-12-02-cpu-b, the loop) to 1.27x (2026-12-02-cpu-c), and the ragged-mask ViT-Ti/16 training step from 0.94x to 1.09x the I-JEPA baseline.
Bucketing by length (2-8 padded calls) was no faster than one padded call: the pad copies dominate.
Caveat: each Python call opens an OpenMP parallel region, and on cores busy with other processes a
region waits for a descheduled thread; there the many small calls lose to the one padded call.
On CUDA the padded call runs (the Triton kernels are the fast path there). The forward is
differentiable through autograd (eager use; `varlen_sdpa` through its own autograd Function, once);
the explicit backward below serves the custom op under torch.compile, where autograd cannot record.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import _native
from ..rows import gather_rows
from .layout import Layout


# Above this many sequences the per-sequence calls' Python and dispatch overhead outgrows what the
# padding costs at short lengths; the padded call runs instead.
LOOP_MAX_SEQS = 512
# Each per-sequence call costs ~80 us forward + backward (Python, dispatch, the split and cat) and uses
# the threads less well than one padded call over every sequence. Plain varlen runs per sequence only
# where the padded (query, key) pairs it saves, times heads, reach this many per call per thread squared:
# on the development machine the break-even was near 4k pairs at one thread and 16-20k at two (the
# `tiny` preset's 30-60-token contexts lose 1.5x per call at two threads; its repeated predictor's
# runs of four blocks gain 1.25x; I-JEPA ViT-Ti/16's are level at two threads and gain 1.5x at one).
LOOP_MIN_SAVED_PAIRS = 4096
# The C++ extension's varlen_sdpa has no Python per call and keeps every thread busy, so it wins wherever
# a run saves more than a few padded pairs; its fixed cost per call (the flash kernel's buffers) still
# loses to one padded call on many very short sequences (tens of 10-20-token sequences).
NATIVE_MIN_SAVED_PAIRS = 2048


def _padded_rows(layout: Layout) -> torch.Tensor:
    """Row of each packed token in the flattened [S * L] padded buffer."""
    return layout._get("padded_rows", lambda: layout.seq_index * layout.longest + layout.positions)


def _pad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[T, H, Dh] -> [S, H, L, Dh] with zeros in the padding."""
    S, L = layout.num_seqs, layout.longest
    buf = x.new_zeros((S * L,) + tuple(x.shape[1:]))
    buf = buf.index_copy(0, _padded_rows(layout), x)
    return buf.view(S, L, *x.shape[1:]).transpose(1, 2)


def _unpad(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[S, H, L, Dh] -> [T, H, Dh]."""
    S, H, L, D = x.shape
    return gather_rows(x.transpose(1, 2).reshape(S * L, H, D), _padded_rows(layout))


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


def _per_sequence_masks(layout: Layout) -> list:
    """[1, 1, n, n] boolean visibility of each sequence (segments), or None per sequence (plain varlen)."""
    def make():
        if layout.segment_ids is None:
            return [None] * layout.num_seqs
        out = []
        for seg in layout.segment_ids.split(layout.host_lengths):
            # the context (segment 0) sees itself; a block sees the context and itself
            out.append(((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))[None, None])
        return out
    return layout._get("per_sequence_masks", make)


def _runs_in_native(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether plain varlen attention with known lengths runs in the C++ extension's varlen_sdpa (every
    run of equal-length sequences one flash call, the runs spread over the threads): CPU float32 /
    bfloat16, no dropout, eager (torch.compile traces the Python loop)."""
    return (dropout_p == 0.0 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling() and _native.status().available)


class _VarlenSDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths, scale):
        out, lse = _native.ops().varlen_sdpa_fwd(q, k, v, lengths, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lengths, ctx.scale = lengths, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dq, dk, dv = _native.ops().varlen_sdpa_bwd(grad, q, k, v, out, lse, ctx.lengths, ctx.scale)
        return dq, dk, dv, None, None


def uses_per_sequence(layout: Layout, q: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether `varlen_attention` runs one call per sequence for this layout (see the module docstring)."""
    if layout.host_lengths is None or q.device.type != "cpu":
        return False
    native_runs = layout.segment_ids is None and _runs_in_native(q, dropout_p)
    if layout.num_seqs > LOOP_MAX_SEQS and not native_runs:
        return False
    if layout.segment_ids is not None:
        return True  # segments: the per-sequence paths skip the masked pairs too, not only the padding
    heads = q.shape[1] if q.dim() == 3 else 1
    saved = heads * layout._get("padded_pairs_saved", lambda: layout.num_seqs * layout.longest ** 2
                                - sum(n * n for n in layout.host_lengths))
    runs = len(_equal_length_runs(layout))
    if native_runs:
        return saved >= NATIVE_MIN_SAVED_PAIRS * runs
    return saved >= LOOP_MIN_SAVED_PAIRS * torch.get_num_threads() ** 2 * runs


def _sdpa_rows(q, k, v, scale: float, dropout_p: float, mask=None) -> torch.Tensor:
    """Attention of [n, H, Dh] query rows over [m, H, Dh] key rows (views -> [1, H, n, Dh]: SDPA reads
    the strided rows, no copy) -> [n, H, Dh]."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return o[0].transpose(0, 1)


def _attention_per_segment(q, k, v, layout: Layout, scale: float, dropout_p: float) -> torch.Tensor:
    """Shared-context layouts with known segment lengths: per sequence, the context over itself, then
    each block over [context, block] (its keys copied together): only the visible pairs."""
    outs = []
    for qs, ks, vs, pieces in zip(q.split(layout.host_lengths), k.split(layout.host_lengths),
                                  v.split(layout.host_lengths), layout.host_segments):
        c = pieces[0]
        qp, kp, vp = qs.split(pieces), ks.split(pieces), vs.split(pieces)
        if c:
            outs.append(_sdpa_rows(qp[0], kp[0], vp[0], scale, dropout_p))
        for qb, kb, vb in zip(qp[1:], kp[1:], vp[1:]):
            if qb.shape[0]:
                outs.append(_sdpa_rows(qb, torch.cat([kp[0], kb]), torch.cat([vp[0], vb]), scale, dropout_p))
    return torch.cat(outs)


def _uniform_segments(layout: Layout) -> Optional[tuple]:
    """(context, blocks, block length) when every sequence is [context | M equal blocks] alike (the
    shared layout on truncated masks), else None."""
    pieces = layout.host_segments[0] if layout.host_segments else ()
    if len(pieces) < 2 or pieces[0] == 0 or pieces[1] == 0 or len(set(pieces[1:])) != 1:
        return None
    if any(p != pieces for p in layout.host_segments):
        return None
    return pieces[0], len(pieces) - 1, pieces[1]


def _attention_uniform_segments(q, k, v, layout: Layout, scale: float, dropout_p: float, shape) -> torch.Tensor:
    """Two batched calls, only the visible pairs: every context over itself ([S, c] views), then every
    block over [its context, itself] (keys copied together, [S * M, c + t])."""
    c, m, t = shape
    S, (T, H, D) = layout.num_seqs, q.shape
    # [S, L, H, D] views split into context and blocks (split, not slicing: its backward is one cat,
    # where each slice's would fill a zero tensor of the whole)
    (qc, qb), (kc, kb), (vc, vb) = (x.unflatten(0, (S, c + m * t)).split([c, m * t], 1) for x in (q, k, v))
    heads = lambda x: x.transpose(1, 2)                                        # noqa: E731
    ctx = F.scaled_dot_product_attention(heads(qc), heads(kc), heads(vc), dropout_p=dropout_p,
                                         scale=scale).transpose(1, 2)         # [S, c, H, D]

    def with_context(xc, xb):
        keys = torch.cat([xc.unsqueeze(1).expand(S, m, c, H, D), xb.unflatten(1, (m, t))], 2)
        return keys.reshape(S * m, c + t, H, D)
    out = F.scaled_dot_product_attention(heads(qb.reshape(S * m, t, H, D)), heads(with_context(kc, kb)),
                                         heads(with_context(vc, vb)), dropout_p=dropout_p, scale=scale).transpose(1, 2)
    return torch.cat([ctx, out.reshape(S, m * t, H, D)], 1).reshape(T, H, D)


def _equal_length_runs(layout: Layout) -> list:
    """(sequences, length) of each run of consecutive sequences of one length: one call serves a run
    (the repeated predictor's M blocks of a sample share a length)."""
    def make():
        runs = []
        for n in layout.host_lengths:
            if runs and runs[-1][1] == n:
                runs[-1][0] += 1
            else:
                runs.append([1, n])
        return [tuple(r) for r in runs]
    return layout._get("equal_length_runs", make)


def _attention_per_sequence(q, k, v, layout: Layout, scale: float, dropout_p: float) -> torch.Tensor:
    if layout.segment_ids is not None:
        if layout.host_segments is not None:
            shape = _uniform_segments(layout)
            if shape is not None:
                return _attention_uniform_segments(q, k, v, layout, scale, dropout_p, shape)
            return _attention_per_segment(q, k, v, layout, scale, dropout_p)
        outs = []
        for qs, ks, vs, m, n in zip(q.split(layout.host_lengths), k.split(layout.host_lengths),
                                    v.split(layout.host_lengths), _per_sequence_masks(layout), layout.host_lengths):
            if n:
                outs.append(_sdpa_rows(qs, ks, vs, scale, dropout_p, m))
        return torch.cat(outs)
    if _runs_in_native(q, dropout_p):
        # the op reads rows with a unit head-dim stride (the qkv projection's views have it)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return _VarlenSDPA.apply(q, k, v, list(layout.host_lengths), float(scale))
    runs = _equal_length_runs(layout)
    sizes = [r * n for r, n in runs]
    outs = []
    for qs, ks, vs, (r, n) in zip(q.split(sizes), k.split(sizes), v.split(sizes), runs):
        if n:
            # [r * n, H, Dh] views -> [r, H, n, Dh]: SDPA reads the strided rows, no copy
            qr, kr, vr = (x.unflatten(0, (r, n)).transpose(1, 2) for x in (qs, ks, vs))
            o = F.scaled_dot_product_attention(qr, kr, vr, dropout_p=dropout_p, scale=scale)
            outs.append(o.transpose(1, 2).reshape(r * n, *q.shape[1:]))
    return torch.cat(outs)


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
    if uses_per_sequence(layout, q, dropout_p):
        return _attention_per_sequence(q, k, v, layout, scale, dropout_p)
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

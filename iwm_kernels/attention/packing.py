"""Packing the IWM predictor's sequences for `varlen_attention`.

Inputs are per-sample packed token sets (the layout `gather` produces): context latents [Tc, D] with
context_cu [B+1], target mask tokens [Tt, D] with target_cu [B*M+1] in sample-major order (sequence
b*M + j is target block j of sample b), and optionally sequence-conditioning action tokens [Te, D]
with extra_cu [B+1], which join the context.

Two packings:
  repeated (I-JEPA semantics)   one sequence per (sample, block): [context_b, extra_b, block_j]; the
                                context is copied M times and attends to that block's tokens;
  shared context                one sequence per sample: [context_b, extra_b | block_1 | ... | block_M]
                                with segment ids 0 | 1 | ... | M: the context attends only to itself
                                and each block sees the context and itself, so the context is computed
                                once instead of M times. Not I-JEPA's predictor beyond one layer: the
                                context never attends to mask tokens, so the targets equal the repeated
                                packing's at depth 1 and differ from depth 2 on.

Everything is vectorised: one gather index built with repeat_interleave, no loop over samples. The
longest sequence (max_seqlen, which sizes the attention launch) is read back from the device unless the
caller passes it; with `max_seqlen` given and `check_values=False` (a sampler's MaskBatch knows its
lengths as Python ints: `MaskBatch.predictor_max_seqlen`) nothing is read back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import check_cu_seqlens, check_max_seqlen, check_tensor
from ..rows import gather_rows


@dataclass
class PackedPredictorInput:
    x: torch.Tensor                      # [T, D] packed predictor tokens
    cu_seqlens: torch.Tensor             # [S + 1] int32 offsets of the sequences
    max_seqlen: int                      # longest sequence
    segment_ids: Optional[torch.Tensor]  # [T] int32 (shared mode) or None (repeated mode)
    target_rows: torch.Tensor            # [Tt] int64: row of x holding each target token, in target order
    source_index: torch.Tensor           # [T] int64: row of cat([context, extra, targets]) each row came from
    num_tokens: int                      # T
    num_targets: int                     # M, target blocks per sample
    shared_context: bool

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _lengths(cu: torch.Tensor) -> torch.Tensor:
    cu = cu.long()
    return cu[1:] - cu[:-1]


def pack_predictor_sequences(context: torch.Tensor, context_cu: torch.Tensor, targets: torch.Tensor,
                             target_cu: torch.Tensor, num_targets: int, *, shared_context: bool,
                             extra: Optional[torch.Tensor] = None, extra_cu: Optional[torch.Tensor] = None,
                             max_seqlen: Optional[int] = None, check_values: bool = True
                             ) -> PackedPredictorInput:
    """Build the predictor's packed sequences (see the module docstring); differentiable in the tokens.

    max_seqlen: the longest packed sequence if the caller knows it (must be >= the longest; it sizes
        the attention launches); None computes it (a host read).
    check_values: read the offsets to validate them (a host read); False for offsets the caller
        vouches for (a sampler's MaskBatch)."""
    check_tensor(context, "context", ndim=2)
    device, dim = context.device, context.shape[1]
    check_tensor(targets, "targets", ndim=2, device=device)
    if targets.shape[1] != dim:
        raise ValueError(f"targets: width {targets.shape[1]} differs from context's {dim}")
    if targets.dtype != context.dtype:
        raise TypeError(f"targets: dtype {targets.dtype} differs from context's {context.dtype}")
    if isinstance(num_targets, bool) or not isinstance(num_targets, int) or num_targets < 1:
        raise ValueError(f"num_targets: expected an int >= 1, got {num_targets!r}")
    if isinstance(shared_context, torch.Tensor) or not isinstance(shared_context, bool):
        raise TypeError(f"shared_context: expected a bool, got {type(shared_context).__name__}")
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
    if max_seqlen is not None:
        check_max_seqlen(max_seqlen, "max_seqlen")
    check_cu_seqlens(context_cu, "context_cu", context.shape[0], device=device, check_values=check_values)
    B, M = context_cu.numel() - 1, num_targets
    check_cu_seqlens(target_cu, "target_cu", targets.shape[0], num_seqs=B * M, device=device,
                     check_values=check_values)
    if (extra is None) != (extra_cu is None):
        raise ValueError(f"{'extra_cu' if extra_cu is None else 'extra'}: pass extra and extra_cu together")
    Tc, Tt = context.shape[0], targets.shape[0]
    ctx_len, tgt_len = _lengths(context_cu), _lengths(target_cu)
    ctx_start = context_cu.long()[:-1]
    if extra is not None:
        check_tensor(extra, "extra", ndim=2, device=device)
        if extra.shape[1] != dim:
            raise ValueError(f"extra: width {extra.shape[1]} differs from context's {dim}")
        if extra.dtype != context.dtype:
            raise TypeError(f"extra: dtype {extra.dtype} differs from context's {context.dtype}")
        check_cu_seqlens(extra_cu, "extra_cu", extra.shape[0], num_seqs=B, device=device,
                         check_values=check_values)
        Te = extra.shape[0]
        ex_len, ex_start = _lengths(extra_cu), extra_cu.long()[:-1] + Tc
        src = torch.cat([context, extra, targets])
    else:
        Te = 0
        ex_len = torch.zeros_like(ctx_len)
        ex_start = torch.full_like(ctx_len, Tc)
        src = torch.cat([context, targets])
    tgt_src_start = target_cu.long()[:-1] + Tc + Te            # [B*M], per block

    if shared_context:
        S = B
        sample_tgt_start = target_cu.long()[0::M]              # [B + 1]: blocks of a sample are contiguous
        piece_len = torch.stack([ctx_len, ex_len, sample_tgt_start[1:] - sample_tgt_start[:-1]], 1)
        piece_src = torch.stack([ctx_start, ex_start, sample_tgt_start[:-1] + Tc + Te], 1)
        total = Tc + Te + Tt
    else:
        S = B * M
        piece_len = torch.stack([ctx_len.repeat_interleave(M), ex_len.repeat_interleave(M), tgt_len], 1)
        piece_src = torch.stack([ctx_start.repeat_interleave(M), ex_start.repeat_interleave(M), tgt_src_start], 1)
        total = M * (Tc + Te) + Tt
    piece_out = _exclusive_cumsum(piece_len.flatten()).view(S, 3)
    source_index = torch.arange(total, device=device) + torch.repeat_interleave(
        (piece_src - piece_out).flatten(), piece_len.flatten(), output_size=total)
    x = src.index_select(0, source_index)

    seq_len = piece_len.sum(1)
    cu_seqlens = torch.zeros(S + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = torch.cumsum(seq_len, 0)
    if max_seqlen is None:
        max_seqlen = int(seq_len.max()) if S else 0

    # Where each target block starts in x, then each target token's row.
    if shared_context:
        block_in_sample = target_cu.long()[:-1] - sample_tgt_start[:-1].repeat_interleave(M)
        block_out = piece_out[:, 2].repeat_interleave(M) + block_in_sample
    else:
        block_out = piece_out[:, 2]
    target_rows = torch.arange(Tt, device=device) + torch.repeat_interleave(
        block_out - target_cu.long()[:-1], tgt_len, output_size=Tt)

    segment_ids = None
    if shared_context:
        block_of_row = torch.repeat_interleave(torch.arange(B * M, device=device) % M + 1, tgt_len, output_size=Tt)
        segment_ids = torch.zeros(total, dtype=torch.int32, device=device)
        segment_ids[target_rows] = block_of_row.to(torch.int32)
    return PackedPredictorInput(x, cu_seqlens, max_seqlen, segment_ids, target_rows, source_index, total, M,
                                shared_context)


def unpack_targets(out: torch.Tensor, packed: PackedPredictorInput) -> torch.Tensor:
    """The rows of a predictor output [T, ...] that hold target tokens, in the original packed target
    order (the order of `targets` / `target_cu` given to pack_predictor_sequences)."""
    check_tensor(out, "out", device=packed.target_rows.device)
    if out.dim() < 1 or out.shape[0] != packed.num_tokens:
        raise ValueError(f"out: expected {packed.num_tokens} rows (the packed predictor tokens), "
                         f"got shape {tuple(out.shape)}")
    return gather_rows(out, packed.target_rows)  # no row repeats: the backward scatters, not index_add

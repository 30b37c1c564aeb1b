"""Argument checks shared by every op and every backend.

Backends assume their inputs passed through here: each check raises a ValueError/TypeError whose
message starts with the argument's name, before anything is launched.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(t: object, name: str, *, dtypes: Optional[Sequence[torch.dtype]] = None,
                 ndim: Optional[int | Sequence[int]] = None, device: Optional[torch.device] = None,
                 contiguous: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} is not supported "
                        f"(expected one of {_dtype_names(dtypes)})")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(f'{n}-D' for n in allowed)}, "
                             f"got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} like the other inputs")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous() first)")
    return t


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: on {t.device} but {ref_name} is on {ref.device}")


def check_momentum(momentum: object, name: str = "momentum", device: Optional[torch.device] = None,
                   check_values: bool = True) -> tuple[float, Optional[torch.Tensor]]:
    """A Python number in [0, 1], or a 0-dim floating tensor (a device tensor's value is not read: no
    host sync; a CPU tensor's is, unless check_values is False)."""
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or momentum.numel() != 1:
            raise ValueError(f"{name}: a tensor momentum must be 0-dim, got shape {tuple(momentum.shape)}")
        if not momentum.dtype.is_floating_point:
            raise TypeError(f"{name}: a tensor momentum must be floating point, got {momentum.dtype}")
        if device is not None and momentum.device != device and momentum.device.type != "cpu":
            raise ValueError(f"{name}: on {momentum.device}, expected {device} (or CPU)")
        if momentum.device.type == "cpu" and check_values and not torch.compiler.is_compiling():
            value = float(momentum)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name}: must be finite and within [0, 1], got {value}")
        return float("nan"), momentum
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{name}: expected a float or a 0-dim tensor, got {type(momentum).__name__}")
    if torch.compiler.is_compiling():
        # torch.compile may trace the number as a symbolic float (math.isfinite cannot be traced):
        # the op reads the concrete value when it runs and checks it there.
        return momentum, None  # type: ignore[return-value]
    value = float(momentum)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}: must be finite and within [0, 1], got {value}")
    return value, None


def check_cu_seqlens(cu: object, name: str, total: int, *, num_seqs: Optional[int] = None,
                     device: Optional[torch.device] = None, check_values: bool = True) -> torch.Tensor:
    """Offsets of a packed variable-length layout: 1-D int32/int64, starts at 0, non-decreasing, ends at
    `total` (the packed length). Reading the values costs a device sync on CUDA; pass check_values=False
    where the caller guarantees them (e.g. offsets our own sampler produced)."""
    check_tensor(cu, name, dtypes=INDEX_DTYPES, ndim=1, device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name}: needs at least one entry (offsets [0, ..., total])")
    if num_seqs is not None and cu.numel() != num_seqs + 1:
        raise ValueError(f"{name}: expected {num_seqs + 1} offsets for {num_seqs} sequences, got {cu.numel()}")
    if check_values and not torch.compiler.is_compiling():
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name}: must start at 0, got {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name}: must be non-decreasing (monotone offsets)")
        if values[-1] != total:
            raise ValueError(f"{name}: must end at {total} (the packed length), got {values[-1]}")
    return cu


def check_index_range(index: torch.Tensor, name: str, upper: int, *, check_values: bool = True) -> None:
    """Every entry in [0, upper). One min/max reduction (a device sync on CUDA)."""
    if check_values and index.numel() and not torch.compiler.is_compiling():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0:
            raise ValueError(f"{name}: negative index {lo}")
        if hi >= upper:
            raise ValueError(f"{name}: index {hi} out of range for size {upper}")


def check_max_seqlen(max_seqlen: object, name: str, lengths: Optional[torch.Tensor] = None) -> int:
    """A Python int >= 0; when `lengths` (per-sequence token counts) is given, also >= the longest."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        if isinstance(max_seqlen, torch.SymInt):
            return max_seqlen  # type: ignore[return-value]  # traced by torch.compile: value unknown
        raise TypeError(f"{name}: expected a Python int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"{name}: must be >= 0, got {max_seqlen}")
    if lengths is not None and lengths.numel() and not torch.compiler.is_compiling():
        longest = int(lengths.max())
        if longest > max_seqlen:
            raise ValueError(f"{name}: {max_seqlen} is shorter than the longest sequence ({longest} tokens)")
    return max_seqlen


def check_host_lengths(lengths: object, name: str, num_seqs: int) -> torch.Tensor:
    """Sequence lengths known on the host: a CPU int32/int64 tensor, [S] (one length per sequence) or
    [S, K] (each sequence's K segment lengths, segment 0 first; its length is the row's sum). Shapes
    only: the values are read where they are used (a CPU tensor: no device sync)."""
    check_tensor(lengths, name, dtypes=INDEX_DTYPES, ndim=(1, 2), device=torch.device("cpu"))
    if lengths.shape[0] != num_seqs or (lengths.dim() == 2 and lengths.shape[1] < 1):
        raise ValueError(f"{name}: expected [{num_seqs}] or [{num_seqs}, K >= 1] lengths (one row per "
                         f"sequence), got shape {tuple(lengths.shape)}")
    return lengths


def check_segment_ids(segment_ids: object, name: str, cu_seqlens: torch.Tensor, total: int, *,
                      device: Optional[torch.device] = None, check_values: bool = True) -> torch.Tensor:
    """Segment labels of a packed layout (the predictor's shared-context structure).

    1-D int32/int64, one entry per packed token, every entry >= 0. Inside each sequence (rows
    cu_seqlens[i]:cu_seqlens[i+1], whose values must already be valid) every segment is one contiguous
    run, and segment 0, when present, comes first. Value checks cost a device sync on CUDA.
    """
    check_tensor(segment_ids, name, dtypes=INDEX_DTYPES, ndim=1, device=device)
    if segment_ids.numel() != total:
        raise ValueError(f"{name}: expected {total} entries (one per packed token), got {segment_ids.numel()}")
    if not check_values or total == 0 or torch.compiler.is_compiling():
        return segment_ids
    seg = segment_ids.long()
    if int(seg.min()) < 0:
        raise ValueError(f"{name}: negative segment id {int(seg.min())}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=seg.device), lengths)
    seq_start = torch.zeros(total, dtype=torch.bool, device=seg.device)
    seq_start[cu[:-1][lengths > 0]] = True
    run_start = seq_start.clone()
    run_start[1:] |= seg[1:] != seg[:-1]
    starts = torch.nonzero(run_start).squeeze(1)
    late_zero = (seg[starts] == 0) & ~seq_start[starts]
    if bool(late_zero.any()):
        row = int(starts[late_zero.nonzero()[0, 0]])
        raise ValueError(f"{name}: segment 0 must come first in its sequence (sequence {int(seq[row])} has "
                         f"segment-0 tokens after another segment, at row {row})")
    pairs = torch.stack([seq[starts], seg[starts]], dim=1)
    unique, counts = torch.unique(pairs, dim=0, return_counts=True)
    if bool((counts > 1).any()):
        s, g = unique[(counts > 1).nonzero()[0, 0]].tolist()
        raise ValueError(f"{name}: segment {g} of sequence {s} is not contiguous (its tokens must be one run)")
    return segment_ids

def check_index_values(index: torch.Tensor, name: str, upper: int, *,
                       segment_starts: Optional[torch.Tensor] = None, check_values: bool = True,
                       want_order: bool = True) -> bool:
    """`check_index_range` plus order, in one host round trip: every entry in [0, upper), and (when
    `want_order`) whether the flattened entries never decrease, except where a new segment starts
    (positions listed in `segment_starts`, which may restart lower). Returns False when the values are
    not read or the order was not asked for."""
    if not check_values or torch.compiler.is_compiling():
        return False
    flat = index.reshape(-1)
    if flat.numel() == 0:
        return want_order
    lo, hi = torch.aminmax(flat)
    stats = [lo.long(), hi.long()]
    if want_order and flat.numel() > 1:
        rises = flat[1:] >= flat[:-1]
        if segment_starts is not None and segment_starts.numel():
            starts = segment_starts.to(device=flat.device, dtype=torch.int64)
            starts = starts[(starts > 0) & (starts < flat.numel())]
            rises[starts - 1] = True
        stats.append(rises.all().long())
    values = torch.stack(stats).tolist()
    if values[0] < 0:
        raise ValueError(f"{name}: negative index {values[0]}")
    if values[1] >= upper:
        raise ValueError(f"{name}: index {values[1]} out of range for size {upper}")
    return want_order and (len(values) == 2 or bool(values[2]))


def check_eps(eps: object, name: str = "eps") -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(eps).__name__}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name}: must be finite and > 0, got {value}")
    return value


def check_token_axis(size: int, selected: int, name: str, index_name: str) -> None:
    """Shape-only (no host sync): a non-empty selection needs a non-empty axis to select from. Without
    this, clamping unchecked values would map every index to row 0 of an empty axis."""
    if size == 0 and selected:
        raise ValueError(f"{name}: the token axis (dim 1) is empty, but {index_name} has {selected} indices into it")


# CUDA's grid: x up to 2^31 - 1 blocks, y and z up to 65535. The gather and photometric Triton launches put
# every axis that grows with the input on x (a 1-D grid, tiles numbered row-major), so only this limit applies.
MAX_GRID_X = 2**31 - 1


def check_grid_x(programs: int, name: str) -> tuple[int]:
    """A 1-D launch grid of `programs` blocks, or a ValueError naming the input that is too large."""
    if programs > MAX_GRID_X:
        raise ValueError(f"{name}: too large for one kernel launch ({programs} blocks, CUDA allows {MAX_GRID_X})")
    return (max(int(programs), 0),)


def clamp_index(index: torch.Tensor, upper: int) -> torch.Tensor:
    """Index values forced into [0, upper): what an op runs on when its caller skipped the value checks
    (no host round trip; wrong values give wrong rows, never an out-of-bounds access)."""
    if upper < 1 and index.numel():
        raise ValueError(f"index: {index.numel()} indices into an empty axis (nothing to clamp them to)")
    return index.clamp(0, max(upper - 1, 0))


def clamp_cu_seqlens(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Offsets forced to start at 0, never decrease and end at `total`, without reading them."""
    safe = torch.cummax(cu.clamp(0, total), 0).values
    bounds = torch.zeros_like(safe)
    bounds[-1] = total
    safe = torch.maximum(safe, bounds)
    return torch.cat([torch.zeros_like(safe[:1]), safe[1:]])

IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_image_batch(images: object, name: str, *, channels: int = 3) -> torch.Tensor:
    """A contiguous [B, C, H, W] image batch: uint8 (0..255) or float (taken as [0, 1]); H, W >= 1."""
    check_tensor(images, name, dtypes=IMAGE_DTYPES, ndim=4, contiguous=True)
    if images.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels ([B, {channels}, H, W]), "
                         f"got shape {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name}: empty image (shape {tuple(images.shape)})")
    return images


def check_dtype_choice(dtype: object, name: str, allowed: Sequence[torch.dtype]) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        raise TypeError(f"{name}: expected one of {_dtype_names(allowed)}, got {dtype!r}")
    return dtype


def check_channel_values(values: object, name: str, channels: int = 3, *, positive: bool = False) -> list[float]:
    """A sequence of `channels` finite floats (e.g. normalisation mean / std); positive if asked."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        out = [float(v) for v in values]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {channels} numbers, got {values!r}") from None
    if len(out) != channels:
        raise ValueError(f"{name}: expected {channels} numbers (one per channel), got {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name}: values must be finite, got {out}")
    if positive and not all(v > 0 for v in out):
        raise ValueError(f"{name}: values must be positive, got {out}")
    return out


def check_param_table(params: object, name: str, *, rows: int, columns: Sequence[tuple[str, float, float, bool]],
                      device: Optional[torch.device] = None, check_values: bool = True) -> torch.Tensor:
    """A contiguous float32 [rows, len(columns)] table of per-sample parameters.

    columns: (label, low, high, is_flag) per column; values must be finite and within [low, high], flags
    exactly 0 or 1. The values are read only for CPU tables (no device sync) and outside torch.compile.
    `device`: the table must be there or on the CPU."""
    check_tensor(params, name, dtypes=(torch.float32,), ndim=2, contiguous=True)
    if tuple(params.shape) != (rows, len(columns)):
        raise ValueError(f"{name}: expected shape ({rows}, {len(columns)}) (one row per image), "
                         f"got {tuple(params.shape)}")
    if device is not None and params.device != device and params.device.type != "cpu":
        raise ValueError(f"{name}: on {params.device}, expected {device} (or CPU)")
    if check_values and params.device.type == "cpu" and params.numel() and not torch.compiler.is_compiling():
        finite = torch.isfinite(params)
        if not bool(finite.all()):
            r, c = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{name}: column {c} ({columns[c][0]}) is not finite in row {r}")
        for c, (label, lo, hi, is_flag) in enumerate(columns):
            col = params[:, c]
            bad = (col < lo) | (col > hi)
            if is_flag:
                bad |= (col != 0) & (col != 1)
            if bool(bad.any()):
                r = int(bad.nonzero()[0])
                want = "0 or 1" if is_flag else f"within [{lo}, {hi}]"
                raise ValueError(f"{name}: column {c} ({label}) must be {want}, got {float(col[r])} in row {r}")
    return params

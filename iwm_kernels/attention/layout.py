"""What every backend needs to know about one packed layout (cu_seqlens + optional segment_ids).

The visibility rule, for a query row q and a key row k of the same sequence s:

    visible(q, k) = k < ctx_end[s]  or  lo[q] <= k < hi[q]

where ctx_end[s] is the end (absolute row) of sequence s's segment 0 and [lo[q], hi[q]) is the row range
of q's own segment when that segment is not 0 (an empty range at ctx_end[s] when it is). Without
segment_ids, ctx_end[s] is the end of the sequence and there is no second range. Because segments are
contiguous and segment 0 comes first, the keys a whole tile of queries can see are two row intervals:
[seq_start, ctx_end) and [min lo, max hi) over the tile; that is what lets the Triton kernels skip every
other key tile.

`prepare` validates the values (a device sync on CUDA) and computes these arrays once per pair of
offset tensors. With `check_values=False` (inputs the caller vouches for, e.g. a sampler's MaskBatch)
nothing is read back: `longest` is then the caller's max_seqlen (a bound that sizes the launches), the
offsets are clamped on the device into a monotone [0, T] range (so the kernels' row ranges stay inside
the packed tensors; wrong values give wrong rows), and every array below is computed without a
data-dependent shape. A predictor calls the attention once per layer with the same
cu_seqlens/segment_ids, so the result is cached on the identity and version counter of those tensors (the cache holds them,
so an id cannot be reused by another tensor while its entry lives; a few entries only). Inference
tensors have no version counter and are not cached.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .._validate import check_cu_seqlens, check_max_seqlen, check_segment_ids, clamp_cu_seqlens


@dataclass
class Layout:
    cu_seqlens: torch.Tensor               # the caller's offsets
    segment_ids: Optional[torch.Tensor]    # the caller's segment labels (None: plain varlen)
    total: int                             # packed rows
    num_seqs: int
    longest: int                           # longest sequence (checked), or the caller's bound (unchecked)
    checked: bool = True                   # values validated (False: vouched for, not read)
    source_cu: Optional[torch.Tensor] = None  # the caller's offsets when cu_seqlens is their clamped copy
    host_lengths: Optional[tuple] = None   # the sequence lengths as Python ints, when known without a read
    host_segments: Optional[tuple] = None  # per sequence, its segments' lengths (segment 0 first), if known
    host_source: Optional[torch.Tensor] = None  # the caller's host-lengths tensor these came from, if any
    _cache: dict = field(default_factory=dict, repr=False)

    def _get(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def lengths(self) -> torch.Tensor:
        return self._get("lengths", lambda: (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long())

    @property
    def seq_index(self) -> torch.Tensor:
        """Sequence of each packed row [T] (int64)."""
        return self._get("seq_index", lambda: torch.repeat_interleave(
            torch.arange(self.num_seqs, device=self.cu_seqlens.device), self.lengths, output_size=self.total))

    @property
    def positions(self) -> torch.Tensor:
        """Position of each packed row inside its sequence [T] (int64)."""
        return self._get("positions", lambda: torch.arange(self.total, device=self.cu_seqlens.device)
                         - self.cu_seqlens.long()[:-1][self.seq_index])

    @property
    def cu_seqlens_i32(self) -> torch.Tensor:
        return self._get("cu32", lambda: self.cu_seqlens.to(torch.int32).contiguous())

    def bounds(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(ctx_end [S], lo [T], hi [T]) as int32 absolute rows; lo/hi are None without segments."""
        return self._get("bounds", self._bounds)

    def _bounds(self):
        cu = self.cu_seqlens.long()
        if self.segment_ids is None:
            return cu[1:].to(torch.int32).contiguous(), None, None
        seg = self.segment_ids.long()
        device = seg.device
        seq = self.seq_index
        zeros = torch.zeros(self.num_seqs, dtype=torch.long, device=device)
        ctx_len = zeros.index_add(0, seq, (seg == 0).long())
        ctx_end = cu[:-1] + ctx_len
        # Run boundaries without a data-dependent shape (no nonzero: no host read): a row's run starts
        # at the latest run start at or before it and ends at the next run start after it. An empty
        # sequence marks a start that the next sequence shares (or the spare slot T).
        marks = torch.zeros(self.total + 1, dtype=torch.bool, device=device)
        marks[cu[:-1]] = True
        run_start = marks[:self.total].clone()
        run_start[1:] |= seg[1:] != seg[:-1]
        rows = torch.arange(self.total, device=device)
        lo = torch.cummax(torch.where(run_start, rows, torch.zeros_like(rows)), 0).values
        next_start = torch.cat([run_start[1:], run_start.new_ones(1)])
        ends = torch.where(next_start, rows + 1, torch.full_like(rows, self.total))
        hi = torch.flip(torch.cummin(torch.flip(ends, (0,)), 0).values, (0,))
        in_ctx = seg == 0
        lo = torch.where(in_ctx, ctx_end[seq], lo)
        hi = torch.where(in_ctx, ctx_end[seq], hi)
        i32 = torch.int32
        return ctx_end.to(i32).contiguous(), lo.to(i32).contiguous(), hi.to(i32).contiguous()

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs that attend: the useful work of one head (host sync)."""
        ctx_end, lo, hi = self.bounds()
        cu = self.cu_seqlens.long()
        if lo is None:
            return int((self.lengths ** 2).sum())
        ctx = (ctx_end.long() - cu[:-1])[self.seq_index]
        return int((ctx + (hi.long() - lo.long())).sum())


# Lengths as Python ints, attached to an offsets tensor by a caller that knows them (a sampler's MaskBatch
# carries them): the native CPU path then runs its calls on views of the packed rows, without padding
# (iwm_kernels.attention.native). Stored on the tensor with its version counter, so an in-place change
# drops them; nothing is read back from the device.
_HOST_LENGTHS = "_iwm_host_lengths"


def attach_lengths(cu_seqlens: torch.Tensor, lengths, segments=None) -> None:
    """Record the lengths of the sequences cu_seqlens delimits, as Python ints (the caller vouches
    for them; only their count is checked here, their sum against the packed rows in `prepare`).
    segments: optionally, per sequence, the lengths of its segments in order (segment 0 first), for a
    layout with segment_ids: the CPU path then computes only the visible pairs."""
    if torch.compiler.is_compiling() or cu_seqlens.is_inference():
        return  # a graph cannot carry them; inference tensors have no version counter
    lengths = tuple(lengths)
    if len(lengths) != cu_seqlens.numel() - 1 or any(not isinstance(n, int) or n < 0 for n in lengths):
        raise ValueError(f"lengths: expected {cu_seqlens.numel() - 1} non-negative ints (one per sequence of "
                         f"cu_seqlens), got {len(lengths)}")
    if segments is not None:
        segments = tuple(tuple(s) for s in segments)
        if len(segments) != len(lengths) or any(sum(s) != n for s, n in zip(segments, lengths)):
            raise ValueError("segments: expected one tuple of segment lengths per sequence, summing to its length")
    setattr(cu_seqlens, _HOST_LENGTHS, (cu_seqlens._version, lengths, segments))


def _from_host_tensor(lengths: torch.Tensor, num_seqs: int, total: int, bound: int
                      ) -> tuple[Optional[tuple], Optional[tuple]]:
    """(lengths, segment lengths or None) from a CPU tensor [S] or [S, K] of segment lengths (the
    loader made it with the masks, so reading it is no device sync; NumPy reads it, so the host-read
    probe, which counts reads of tensors that would be device tensors on a GPU, does not count it).
    None for what does not describe this layout (the padded path serves it)."""
    rows = lengths.detach().numpy()
    rows = rows[:, None] if rows.ndim == 1 else rows
    per_seq = rows.sum(1)
    if len(per_seq) != num_seqs or int(per_seq.sum()) != total or bool((rows < 0).any()) \
            or (num_seqs and int(per_seq.max()) > bound):
        return None, None
    segments = tuple(map(tuple, rows.tolist())) if rows.shape[1] > 1 else None
    return tuple(per_seq.tolist()), segments


def _attached(cu_seqlens: torch.Tensor, total: int, bound: int) -> tuple[Optional[tuple], Optional[tuple]]:
    """(lengths, segment lengths) attached to cu_seqlens, or None for what is not known."""
    entry = getattr(cu_seqlens, _HOST_LENGTHS, None)
    if entry is None or cu_seqlens.is_inference() or entry[0] != cu_seqlens._version:
        return None, None
    lengths = entry[1]
    if sum(lengths) != total or max(lengths, default=0) > bound:
        return None, None  # not this layout's: the padded path serves it
    return lengths, entry[2]


_cache: "dict[tuple, tuple]" = {}
_MAX_ENTRIES = 4


def _alive(entry, cu, seg, host) -> bool:
    layout, cu_version, seg_version = entry
    own = layout.source_cu if layout.source_cu is not None else layout.cu_seqlens
    if own is not cu or cu._version != cu_version:
        return False
    if not layout.checked and layout.host_source is not host:
        return False  # (a checked layout read its lengths itself: it serves any call)
    if seg is None:
        return layout.segment_ids is None
    return layout.segment_ids is seg and seg._version == seg_version


def prepare(cu_seqlens: torch.Tensor, segment_ids: Optional[torch.Tensor], total: int, max_seqlen: int,
            *, check_values: bool = True, host_lengths: Optional[torch.Tensor] = None) -> Layout:
    """Validate the values of a packed layout (structure is checked by the caller) and describe it.

    check_values=False: nothing is read back (no host sync); max_seqlen must be >= the longest
    sequence, it sizes the launches (the caller vouches for it and for the offsets and segments).
    host_lengths: the lengths as a CPU tensor ([S], or [S, K] segment lengths; see
    `_validate.check_host_lengths`), which the caller vouches for like the offsets. An unchecked layout
    then knows its lengths (the per-sequence CPU path) and its real longest sequence, so max_seqlen may
    be any bound (under torch.compile the model passes the packed row count: no per-step int)."""
    # An inference tensor (made under torch.inference_mode) has no version counter, so an in-place change
    # to it could not be noticed: such layouts are validated on every call and never cached.
    cacheable = not cu_seqlens.is_inference() and (segment_ids is None or not segment_ids.is_inference())
    base = (id(cu_seqlens), id(segment_ids) if segment_ids is not None else None, total)
    # A checked layout serves every later call; an unchecked one only unchecked calls with its bound
    # and its host lengths (the layout holds that tensor, so its id is not reused while the entry lives).
    host_key = id(host_lengths) if host_lengths is not None else None
    keys = [base + (None, None)] + ([] if check_values else [base + (max_seqlen, host_key)])
    layout = None
    for key in keys if cacheable else ():
        entry = _cache.get(key)
        if entry is not None and _alive(entry, cu_seqlens, segment_ids, None if check_values else host_lengths):
            layout = entry[0]
            break
    if layout is None:
        num_seqs = cu_seqlens.numel() - 1
        if check_values:
            check_cu_seqlens(cu_seqlens, "cu_seqlens", total)
            if segment_ids is not None:
                check_segment_ids(segment_ids, "segment_ids", cu_seqlens, total)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            host = tuple(lengths.tolist())  # read for the check anyway
            longest = max(host, default=0)
            layout = Layout(cu_seqlens, segment_ids, total, num_seqs, longest, host_lengths=host)
        else:
            check_max_seqlen(max_seqlen, "max_seqlen")
            safe = clamp_cu_seqlens(cu_seqlens, total)
            lengths = (safe[1:] - safe[:-1]).long()
            bound = int(max_seqlen)
            if host_lengths is not None:
                host, segments = _from_host_tensor(host_lengths, num_seqs, total, bound)
            else:
                host, segments = _attached(cu_seqlens, total, bound)
            # Known lengths give the real longest sequence: the launches are sized from it, not the bound.
            longest = max(host, default=0) if host is not None else bound
            layout = Layout(safe, segment_ids, total, num_seqs, longest, checked=False, source_cu=cu_seqlens,
                            host_lengths=host, host_segments=segments if segment_ids is not None else None,
                            host_source=host_lengths)
        layout._cache["lengths"] = lengths
        if cacheable:
            _cache[keys[-1]] = (layout, cu_seqlens._version, segment_ids._version if segment_ids is not None else None)
            while len(_cache) > _MAX_ENTRIES:
                _cache.pop(next(iter(_cache)))
    if layout.checked and isinstance(max_seqlen, int) and layout.longest > max_seqlen:
        check_max_seqlen(max_seqlen, "max_seqlen", layout.lengths)
    return layout

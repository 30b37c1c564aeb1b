"""Multi-block masks (I-JEPA / IWM), sampled for a whole batch at once and kept ragged.

Owns `MultiBlockMaskSampler` (block sizes per step, block positions per sample, the context in IWM's
`complement` mode or I-JEPA's `block` mode) and `MaskBatch`, its packed result.

What differs from I-JEPA's `MaskCollator` (src/masks/multiblock.py), on purpose:
- Positions cover the whole grid: a block of height h starts at any row in [0, H - h], so the last row
  and column can be drawn (I-JEPA draws from [0, H - h - 1] and caps h at H - 1, so with a 13x13 context
  block on a 14x14 grid its encoder never sees the last row or column).
- Masks stay ragged: packed int32 indices plus `cu_seqlens`-style offsets. I-JEPA truncates every mask
  to the batch minimum so tensors stack, which drops the highest-index patches of the larger masks
  (its issue #60); `MaskBatch.to_ijepa()` still produces that form for parity.
- Scale and aspect ratio are drawn independently (I-JEPA reuses one uniform number for both).
- No unbounded loop: a sample whose context is smaller than `min_keep` is redrawn at most `max_tries`
  times (vectorised over the failing samples); after that, the targets it must avoid are dropped one at
  a time, last block first, like I-JEPA's own relaxation, until the context is large enough. Such
  samples are counted in `MaskBatch.fallbacks` (a Python int, computed here on the CPU, so logging it
  reads nothing from the device); they are the only ones whose context may overlap its targets.
  Settings that can never give a valid context raise at construction: `min_keep < 1` (an empty context
  gives the encoder nothing to predict from), a grid with fewer than `min_keep` patches left beside the
  smallest target block, or a context block smaller than `min_keep`.
- Randomness comes only from a `torch.Generator` seeded from (seed, step) by `iwm.rng`, so a batch's
  masks are the same in the main process, in any DataLoader worker and after resuming. In multi-process
  training, give each rank its own seed (e.g. `seed + rank`) so ranks draw different masks.

Everything is array operations over the whole batch (a handful per call, none per sample or patch).
The random numbers come from torch; the [B, N] mask arithmetic runs in NumPy, which never spreads
these small arrays over threads: torch's intra-op threads cost more than the work here, and on a
machine whose cores are busy they turn a sub-millisecond call into tens of milliseconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Union

import numpy as np
import torch

from iwm_kernels._validate import INDEX_DTYPES, check_index_range, check_tensor

from . import rng

Grid = tuple[int, int]


def _check_grid(grid: object) -> Grid:
    if isinstance(grid, bool):
        raise TypeError("grid: expected an int or a (height, width) pair, got bool")
    if isinstance(grid, int):
        grid = (grid, grid)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        raise TypeError(f"grid: expected an int or a (height, width) pair of ints, got {grid!r}")
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"grid: height and width must be >= 1, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def _check_range(value: object, name: str, *, upper: Optional[float] = None) -> tuple[float, float]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name}: expected a (low, high) pair of numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi):
        raise ValueError(f"{name}: needs 0 < low <= high, got {tuple(value)}")
    if upper is not None and hi > upper:
        raise ValueError(f"{name}: high must be <= {upper}, got {hi}")
    return lo, hi


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return value


def block_dims(grid: Grid, scale: float, aspect: float) -> Grid:
    """Height and width of a block covering about `scale` of the grid with height/width `aspect`,
    rounded to whole patches and clamped to [1, H] x [1, W]."""
    height, width = grid
    area = scale * height * width
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    return min(max(h, 1), height), min(max(w, 1), width)


def smallest_block(grid: Grid, scale: float, aspect: tuple[float, float]) -> int:
    """Fewest patches `block_dims(grid, scale, a)` gives for any aspect a in `aspect` (exact: the
    rounded height and width only change where sqrt(area * a) or sqrt(area / a) crosses k + 1/2)."""
    lo, hi = aspect
    area = scale * grid[0] * grid[1]
    candidates = {lo, hi}
    for k in range(max(grid) + 1):
        for a in ((k + 0.5) ** 2 / area, area / (k + 0.5) ** 2):
            candidates.update(x for x in (a * (1 - 1e-9), a * (1 + 1e-9)) if lo <= x <= hi)
    return min(h * w for h, w in (block_dims(grid, scale, a) for a in candidates))


def _lerp(lo_hi: tuple[float, float], u: float) -> float:
    return lo_hi[0] + u * (lo_hi[1] - lo_hi[0])


@dataclass
class MaskBatch:
    """Masks of one batch, packed.

    context_index [Tc] int32: each sample's context patches (row-major flat indices into the grid),
        sorted, samples one after another; context_cu [B+1] int32 delimits them.
    target_index [Tt] int32: the target blocks, sample-major (sequence b*M + j is block j of sample b),
        indices sorted within a block; target_cu [B*M+1] int32 delimits the blocks.
    context_sizes [B], target_sizes [B*M]: the same lengths as Python ints, computed where the masks
        are made (the sampler, in NumPy, in the loader workers), so the training step sizes its launches
        (`longest_context`, `predictor_max_seqlen`, ...) without reading a tensor back. None when
        unknown (a MaskBatch built by hand); the properties then read the offsets (a host sync).
    validated: the tensors' values were made or checked on the CPU (the sampler, from_ijepa): the
        model then skips its value checks (no host sync). Do not change the tensors in place after.

    host_sizes (not a field; derived from the two tuples, None without them): [B, 1 + M] int64 on the
    CPU, sample b's context length then its M target block lengths. It stays on the CPU through `to()`.
    The model hands it (or tensors made from it) to the attention, which reads it when it runs: reading
    a CPU tensor is no device sync, and under torch.compile the graph then carries no per-step Python
    int (the tuples would be specialised as constants and guarded: a recompile every step).
    """
    context_index: torch.Tensor
    context_cu: torch.Tensor
    target_index: torch.Tensor
    target_cu: torch.Tensor
    batch_size: int
    num_targets: int
    grid: Grid
    target_block: Grid = (0, 0)               # (h, w) shared by every target block of this batch
    context_block: Optional[Grid] = None      # (h, w) of the context block ("block" mode)
    fallbacks: int = 0                         # samples whose context needed the min_keep fallback
    fallback_rows: tuple[int, ...] = ()        # which samples those are (so a slice keeps its own count)
    context_sizes: Optional[tuple[int, ...]] = None  # [B] context lengths, Python ints
    target_sizes: Optional[tuple[int, ...]] = None   # [B*M] target block lengths, Python ints
    validated: bool = False                    # values made or checked on the CPU (see the docstring)

    _TENSORS = ("context_index", "context_cu", "target_index", "target_cu")

    def __post_init__(self):
        # Shape-only consistency of the Python lengths with the tensors (no value read).
        for name, sizes, count, total in (
                ("context_sizes", self.context_sizes, self.batch_size, self.context_index.numel()),
                ("target_sizes", self.target_sizes, self.batch_size * self.num_targets, self.target_index.numel())):
            if sizes is None:
                continue
            if len(sizes) != count or sum(sizes) != total or any(n < 0 for n in sizes):
                raise ValueError(f"{name}: {len(sizes)} lengths summing to {sum(sizes)} do not describe "
                                 f"{count} sequences of {total} packed indices")
        self.host_sizes: Optional[torch.Tensor] = None
        if self.context_sizes is not None and self.target_sizes is not None:
            ctx = np.asarray(self.context_sizes, dtype=np.int64).reshape(self.batch_size, 1)
            tgt = np.asarray(self.target_sizes, dtype=np.int64).reshape(self.batch_size, self.num_targets)
            self.host_sizes = torch.from_numpy(np.concatenate([ctx, tgt], 1))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    # -- lengths as Python ints (no tensor read when the sampler made the batch) ----------------------
    def _context_sizes(self) -> tuple[int, ...]:
        if self.context_sizes is not None:
            return self.context_sizes
        return tuple((self.context_cu[1:] - self.context_cu[:-1]).tolist())  # hand-built: a host read

    def _target_sizes(self) -> tuple[int, ...]:
        if self.target_sizes is not None:
            return self.target_sizes
        return tuple((self.target_cu[1:] - self.target_cu[:-1]).tolist())

    @property
    def context_tokens(self) -> int:
        """Context indices of the whole batch (a shape: never a read)."""
        return self.context_index.numel()

    @property
    def target_tokens(self) -> int:
        return self.target_index.numel()

    @property
    def longest_context(self) -> int:
        return _longest(self._context_sizes())

    @property
    def longest_target_block(self) -> int:
        return _longest(self._target_sizes())

    def sample_target_sizes(self) -> tuple[int, ...]:
        """[B] all M target blocks of each sample together."""
        t, m = self._target_sizes(), self.num_targets
        return tuple(sum(t[b * m:(b + 1) * m]) for b in range(self.batch_size))

    @property
    def longest_sample_targets(self) -> int:
        return _longest(self.sample_target_sizes())

    def predictor_max_seqlen(self, shared_context: bool, extra_per_sample: int = 0) -> int:
        """Longest sequence `pack_predictor_sequences` makes from these masks: [context, extra, block j]
        per (sample, block), or [context, extra, every block] per sample with `shared_context`;
        `extra_per_sample` tokens join each context (sequence conditioning: one per action component)."""
        ctx = self._context_sizes()
        if shared_context:
            per = [c + extra_per_sample + t for c, t in zip(ctx, self.sample_target_sizes())]
        else:
            t, m = self._target_sizes(), self.num_targets
            per = [ctx[b] + extra_per_sample + _longest(t[b * m:(b + 1) * m]) for b in range(self.batch_size)]
        return _longest(per)

    @property
    def target_cu_per_sample(self) -> torch.Tensor:
        """[B+1] offsets grouping all M target blocks of each sample (for gathering per sample)."""
        return self.target_cu[:: self.num_targets].contiguous()

    def context_lengths(self) -> torch.Tensor:
        return self.context_cu[1:] - self.context_cu[:-1]

    def target_lengths(self) -> torch.Tensor:
        """[B*M] length of each target block."""
        return self.target_cu[1:] - self.target_cu[:-1]

    def mark_dynamic(self) -> None:
        """Tell torch.compile, before it traces, that the packed token counts (the index tensors' lengths)
        change with every draw: they are marked unbacked, so the graph holds no guard on them at all
        (automatic dynamic shapes would recompile when a count first changes, and again whenever it
        crosses a size that inductor's CPU reductions guard on, 4096 rows). The training step's compiled
        forward calls this; the model has no branch on these sizes."""
        mark = getattr(torch._dynamo.decorators, "mark_unbacked", None) or torch._dynamo.maybe_mark_dynamic
        for t in (self.context_index, self.target_index):
            mark(t, 0)

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "MaskBatch":
        return replace(self, **{n: getattr(self, n).to(device, non_blocking=non_blocking) for n in self._TENSORS})

    def pin_memory(self) -> "MaskBatch":
        """Pinned copy (DataLoader(pin_memory=True) calls this)."""
        return replace(self, **{n: getattr(self, n).pin_memory() for n in self._TENSORS})

    def slice(self, start: int, stop: int) -> "MaskBatch":
        """Samples [start, stop) with offsets rebased to 0: a rank's share of a global batch's masks."""
        if not (0 <= start <= stop <= self.batch_size):
            raise ValueError(f"start, stop: [{start}, {stop}) is not within the batch of {self.batch_size}")
        m = self.num_targets
        ctx, tgt = self._context_sizes(), self._target_sizes()  # Python ints: no tensor read
        c0, c1 = sum(ctx[:start]), sum(ctx[:stop])
        t0, t1 = sum(tgt[:start * m]), sum(tgt[:stop * m])
        rows = tuple(r - start for r in self.fallback_rows if start <= r < stop)
        return replace(self, context_index=self.context_index[c0:c1], context_cu=self.context_cu[start:stop + 1] - c0,
                       target_index=self.target_index[t0:t1], target_cu=self.target_cu[start * m:stop * m + 1] - t0,
                       batch_size=stop - start, fallbacks=len(rows), fallback_rows=rows,
                       context_sizes=ctx[start:stop], target_sizes=tgt[start * m:stop * m])

    def dense_context(self) -> torch.Tensor:
        """[B, N] bool: True where a patch is in the sample's context."""
        return _dense(self.context_index, self.context_cu, self.batch_size, self.num_patches)

    def dense_targets(self) -> torch.Tensor:
        """[B, M, N] bool: True where a patch is in target block j of sample b."""
        out = _dense(self.target_index, self.target_cu, self.batch_size * self.num_targets, self.num_patches)
        return out.view(self.batch_size, self.num_targets, self.num_patches)

    def to_ijepa(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """I-JEPA's collated form: ([context [B, Kc]], [block_j [B, Kt] for j < M]), int64.

        Like I-JEPA's collator, every context is cut to the shortest context of the batch and every
        target block to the shortest block, keeping the lowest indices (this loses patches; prefer the
        packed form)."""
        enc = _truncate(self.context_index, self.context_cu, _shortest(self._context_sizes()))
        tgt = _truncate(self.target_index, self.target_cu, _shortest(self._target_sizes()))
        tgt = tgt.view(self.batch_size, self.num_targets, -1)
        return [enc], [tgt[:, j] for j in range(self.num_targets)]

    def truncated(self) -> "MaskBatch":
        """The I-JEPA-truncated form (`to_ijepa`) packed again, keeping the block sizes and the
        fallback count (the same samples still had their context relaxed)."""
        packed = MaskBatch.from_ijepa(*self.to_ijepa(), grid=self.grid, check_values=not self.validated)
        return replace(packed, validated=True, target_block=self.target_block, context_block=self.context_block,
                       fallbacks=self.fallbacks, fallback_rows=self.fallback_rows)

    @classmethod
    def from_ijepa(cls, masks_enc: Sequence[torch.Tensor], masks_pred: Sequence[torch.Tensor],
                   grid: Union[int, Grid], *, check_values: bool = True) -> "MaskBatch":
        """Pack I-JEPA's collated masks (one context tensor [B, Kc], M target tensors [B, Kt]).
        Indices are sorted within each row (I-JEPA's already are). The index range is checked (a host
        read), which makes the result `validated`; check_values=False is for masks already checked."""
        grid = _check_grid(grid)
        n = grid[0] * grid[1]
        if not isinstance(masks_enc, (list, tuple)) or len(masks_enc) != 1:
            raise ValueError("masks_enc: expected a list holding exactly one [B, K] context tensor "
                             f"(got {type(masks_enc).__name__} of length {len(masks_enc) if hasattr(masks_enc, '__len__') else '?'})")
        if not isinstance(masks_pred, (list, tuple)) or len(masks_pred) < 1:
            raise ValueError("masks_pred: expected a non-empty list of [B, K] target tensors")
        enc = masks_enc[0]
        _check_ijepa_mask(enc, "masks_enc[0]", n, check_values)
        batch = enc.shape[0]
        for j, m in enumerate(masks_pred):
            _check_ijepa_mask(m, f"masks_pred[{j}]", n, check_values)
            if m.shape != masks_pred[0].shape or m.shape[0] != batch:
                raise ValueError(f"masks_pred[{j}]: shape {tuple(m.shape)} differs from masks_pred[0]'s "
                                 f"{tuple(masks_pred[0].shape)} or from masks_enc[0]'s batch {batch}")
        ctx = enc.sort(dim=1).values
        tgt = torch.stack(list(masks_pred), dim=1).sort(dim=2).values  # [B, M, Kt]
        m_count, kt = tgt.shape[1], tgt.shape[2]
        device = enc.device
        return cls(
            context_index=ctx.reshape(-1).to(torch.int32),
            context_cu=(torch.arange(batch + 1, device=device) * ctx.shape[1]).to(torch.int32),
            target_index=tgt.reshape(-1).to(torch.int32),
            target_cu=(torch.arange(batch * m_count + 1, device=device) * kt).to(torch.int32),
            batch_size=batch, num_targets=m_count, grid=grid, context_sizes=(ctx.shape[1],) * batch,
            target_sizes=(kt,) * (batch * m_count), validated=check_values)

    def __repr__(self) -> str:
        def show(name, value):
            if name in self._TENSORS:
                return f"{name}={tuple(value.shape)}"
            if name in ("context_sizes", "target_sizes") and value is not None:
                return f"{name}=<{len(value)} ints>"
            return f"{name}={value!r}"
        parts = [show(f.name, getattr(self, f.name)) for f in fields(self)]
        return f"MaskBatch({', '.join(parts)})"


# Lengths are >= 0, so 0 is the empty maximum; written without max(..., default=), which torch.compile
# cannot trace (a graph break).
def _longest(sizes: Sequence[int]) -> int:
    return max((0, *sizes))


def _shortest(sizes: Sequence[int]) -> int:
    return min(sizes) if len(sizes) else 0


def _check_ijepa_mask(m: object, name: str, n: int, check_values: bool = True) -> None:
    check_tensor(m, name, dtypes=INDEX_DTYPES, ndim=2)
    check_index_range(m, name, n, check_values=check_values)


def _dense(index: torch.Tensor, cu: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    out = torch.zeros(rows, n, dtype=torch.bool, device=index.device)
    lengths = (cu[1:] - cu[:-1]).long()
    row = torch.repeat_interleave(torch.arange(rows, device=index.device), lengths, output_size=index.numel())
    out[row, index.long()] = True
    return out


def _truncate(index: torch.Tensor, cu: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, k]: the first k indices of each row (k: the shortest row, known as a Python int)."""
    rows = cu.numel() - 1
    cols = torch.arange(k, device=index.device)
    return index[(cu[:-1].long()[:, None] + cols[None, :])].long() if rows else index.new_zeros(0, 0).long()


def _rect_index(top: np.ndarray, left: np.ndarray, size: Grid, width: int) -> np.ndarray:
    """[..., h*w] int64: the sorted flat indices of the size[0] x size[1] rectangle at (top, left)."""
    rows = top[..., None] + np.arange(size[0])
    cols = left[..., None] + np.arange(size[1])
    return (rows[..., :, None] * width + cols[..., None, :]).reshape(*top.shape, size[0] * size[1])


def _rect_masks(top: np.ndarray, left: np.ndarray, size: Grid, grid: Grid) -> np.ndarray:
    """[..., H*W] bool: True inside the size[0] x size[1] rectangle at (top, left), for each entry."""
    rows = np.arange(grid[0])
    cols = np.arange(grid[1])
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + size[0])
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + size[1])
    return (in_rows[..., :, None] & in_cols[..., None, :]).reshape(*top.shape, grid[0] * grid[1])


# How the context is drawn: the complement of the targets (IWM) or one block (I-JEPA).
CONTEXT_MODES = ("complement", "block")


class MultiBlockMaskSampler:
    """I-JEPA multi-block masks for a batch: M target blocks and one context per sample.

    grid: patches per side, an int or (H, W) (e.g. 14 for 224 px images and 16 px patches).
    num_targets, target_scale, target_aspect: M target blocks, each covering a fraction in
        `target_scale` of the grid with height/width in `target_aspect`. One size is drawn per batch
        (shared by every block and sample); positions are drawn per block and sample.
    context_mode: "complement" (IWM: every patch outside the union of the targets) or "block"
        (I-JEPA: a block of scale `context_scale` and aspect `context_aspect`, minus the targets).
    min_keep: the least number of context patches a sample may have (see the module docstring for
        what happens when a draw falls short).
    allow_overlap: "block" mode only: keep the targets inside the context block (I-JEPA's option).
    seed: with the step, the only source of randomness. max_tries: redraws before the fallback.

    `sample(batch_size, step)` returns a `MaskBatch`; it depends on (seed, step, batch_size) only.
    """

    def __init__(self, grid: Union[int, Grid], *, num_targets: int = 4,
                 target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                 context_mode: str = "complement", context_scale: tuple[float, float] = (0.85, 1.0),
                 context_aspect: tuple[float, float] = (1.0, 1.0), min_keep: int = 10,
                 allow_overlap: bool = False, seed: int = 0, max_tries: int = 20):
        self.grid = _check_grid(grid)
        self.num_targets = _check_int(num_targets, "num_targets", 1)
        self.target_scale = _check_range(target_scale, "target_scale", upper=1.0)
        self.target_aspect = _check_range(target_aspect, "target_aspect")
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode: expected one of {', '.join(map(repr, CONTEXT_MODES))}, "
                             f"got {context_mode!r}")
        self.context_mode = context_mode
        self.context_scale = _check_range(context_scale, "context_scale", upper=1.0)
        self.context_aspect = _check_range(context_aspect, "context_aspect")
        # An empty context would leave the encoder nothing to predict from: at least one patch.
        self.min_keep = _check_int(min_keep, "min_keep", 1)
        if not isinstance(allow_overlap, bool):
            raise TypeError(f"allow_overlap: expected a bool, got {type(allow_overlap).__name__}")
        if allow_overlap and context_mode == "complement":
            raise ValueError("allow_overlap: only meaningful with context_mode='block' "
                             "(the complement of the targets cannot overlap them)")
        self.allow_overlap = allow_overlap
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        self.seed = seed
        self.max_tries = _check_int(max_tries, "max_tries", 0)
        n = self.grid[0] * self.grid[1]
        if n < self.min_keep:
            raise ValueError(f"min_keep: {self.min_keep} context patches cannot fit a {self.grid[0]}x{self.grid[1]} "
                             f"grid of {n} patches (lower min_keep or use a larger grid)")
        # The targets cover at least one target block, so no draw can leave more than N minus its
        # smallest size to the context; below min_keep every sample would take the fallback (a
        # context overlapping its targets, silently), so such a sampler is refused outright.
        room = n - self.smallest_target_block()
        if room < self.min_keep and not allow_overlap:
            raise ValueError(f"min_keep: a {self.grid[0]}x{self.grid[1]} patch grid (crop size / patch size) leaves "
                             f"at most {room} context patches beside the smallest target block "
                             f"(target_scale={self.target_scale}), fewer than min_keep={self.min_keep}; use a "
                             f"larger crop or a smaller patch size, smaller targets, or a lower min_keep")
        if context_mode == "block":
            smallest = self.smallest_context_block()
            if smallest < self.min_keep:
                raise ValueError(f"min_keep: the context block can be as small as {smallest} patches on this "
                                 f"{self.grid[0]}x{self.grid[1]} grid (context_scale={self.context_scale}), "
                                 f"below min_keep={self.min_keep}")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def smallest_context_block(self) -> int:
        """Fewest patches a context block can have (its area is smallest at the lowest scale)."""
        return smallest_block(self.grid, self.context_scale[0], self.context_aspect)

    def smallest_target_block(self) -> int:
        """Fewest patches a target block can have."""
        return smallest_block(self.grid, self.target_scale[0], self.target_aspect)

    def block_sizes(self, step: int) -> tuple[Grid, Grid]:
        """(target block (h, w), context block (h, w)) of the batch at `step`."""
        return self._sizes(self._generator(step))

    def _generator(self, step: int) -> torch.Generator:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step: expected an int, got {type(step).__name__}")
        return rng.generator(rng.MASKS, self.seed, step)

    def _sizes(self, gen: torch.Generator) -> tuple[Grid, Grid]:
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        target = block_dims(self.grid, _lerp(self.target_scale, u[0]), _lerp(self.target_aspect, u[1]))
        context = block_dims(self.grid, _lerp(self.context_scale, u[2]), _lerp(self.context_aspect, u[3]))
        return target, context

    def _positions(self, gen: torch.Generator, batch: int, t_size: Grid, c_size: Grid):
        (H, W), M = self.grid, self.num_targets
        t_top = torch.randint(0, H - t_size[0] + 1, (batch, M), generator=gen).numpy()
        t_left = torch.randint(0, W - t_size[1] + 1, (batch, M), generator=gen).numpy()
        c_top = torch.randint(0, H - c_size[0] + 1, (batch,), generator=gen).numpy()
        c_left = torch.randint(0, W - c_size[1] + 1, (batch,), generator=gen).numpy()
        return t_top, t_left, c_top, c_left

    def _context(self, targets: np.ndarray, c_top, c_left, c_size: Grid, keep_targets: int) -> np.ndarray:
        """[B, N] bool context avoiding target blocks [0, keep_targets) of each sample
        (targets: [B, M, h*w] flat indices)."""
        batch = targets.shape[0]
        if self.context_mode == "block":
            context = _rect_masks(c_top, c_left, c_size, self.grid)
            if self.allow_overlap:
                return context
        else:
            context = np.ones((batch, self.num_patches), dtype=bool)
        if keep_targets:
            context[np.arange(batch)[:, None], targets[:, :keep_targets].reshape(batch, keep_targets * targets.shape[2])] = False
        return context

    def sample(self, batch_size: int, step: int) -> MaskBatch:
        batch_size = _check_int(batch_size, "batch_size", 0)
        gen = self._generator(step)
        t_size, c_size = self._sizes(gen)
        (H, W), M = self.grid, self.num_targets
        t_top, t_left, c_top, c_left = self._positions(gen, batch_size, t_size, c_size)
        targets = _rect_index(t_top, t_left, t_size, W)                           # [B, M, h*w]
        context = self._context(targets, c_top, c_left, c_size, M)                # [B, N]
        short = context.sum(1) < self.min_keep
        for _ in range(self.max_tries):
            if not short.any():
                break
            # Redraw every position (fixed shapes keep the stream layout independent of which samples
            # fell short), then keep the new draws only for the samples that did.
            new = self._positions(gen, batch_size, t_size, c_size)
            t_top, t_left = np.where(short[:, None], new[0], t_top), np.where(short[:, None], new[1], t_left)
            c_top, c_left = np.where(short, new[2], c_top), np.where(short, new[3], c_left)
            targets = _rect_index(t_top, t_left, t_size, W)
            context = self._context(targets, c_top, c_left, c_size, M)
            short = context.sum(1) < self.min_keep
        fallback_rows = tuple(np.flatnonzero(short).tolist())  # NumPy on the CPU: no device read
        for keep in range(M - 1, -1, -1):
            if not short.any():
                break
            relaxed = self._context(targets, c_top, c_left, c_size, keep)
            context = np.where(short[:, None], relaxed, context)
            short = context.sum(1) < self.min_keep

        ctx_cu = np.zeros(batch_size + 1, dtype=np.int32)
        np.cumsum(context.sum(1), out=ctx_cu[1:])
        ctx_index = np.nonzero(context)[1].astype(np.int32)
        block = t_size[0] * t_size[1]
        tgt_cu = np.arange(batch_size * M + 1, dtype=np.int32) * np.int32(block)
        # The lengths as Python ints, from the NumPy arrays (the step then reads nothing back), and the
        # values are ours: validated, so the model skips its value checks.
        return MaskBatch(torch.from_numpy(ctx_index), torch.from_numpy(ctx_cu),
                         torch.from_numpy(targets.reshape(-1).astype(np.int32)), torch.from_numpy(tgt_cu),
                         batch_size, M, (H, W), t_size, c_size if self.context_mode == "block" else None,
                         len(fallback_rows), fallback_rows, context_sizes=tuple(context.sum(1).tolist()),
                         target_sizes=(block,) * (batch_size * M), validated=True)

    def __repr__(self) -> str:
        return (f"MultiBlockMaskSampler(grid={self.grid}, num_targets={self.num_targets}, "
                f"target_scale={self.target_scale}, target_aspect={self.target_aspect}, "
                f"context_mode={self.context_mode!r}, context_scale={self.context_scale}, "
                f"context_aspect={self.context_aspect}, min_keep={self.min_keep}, "
                f"allow_overlap={self.allow_overlap}, seed={self.seed})")

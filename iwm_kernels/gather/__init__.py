"""Masked-token gather: pick a per-sample (ragged) subset of tokens, fused with what always follows.

Public entries:
  gather_tokens(x, index, cu_seqlens=None, *, pos=None, bias=None, normalize=False, eps=1e-5, backend=None)
      out[r] = x[b, i] (+ pos[i]) (+ bias[b]), then optionally a no-affine layer norm of that sum.
  apply_masks(x, masks)
      I-JEPA's `src/masks/utils.py::apply_masks`, same values and gradients, on the same kernels.

Eager calls go through a `torch.autograd.Function` (a few microseconds); inside `torch.compile` the
same work runs as the custom ops `iwm::gather_tokens` / `iwm::gather_tokens_backward` (with fake
implementations, so the compiled graph has no break). Index values and offsets are checked before
anything runs (one host round trip, a device sync on CUDA), also inside the compiled op, so no kernel
reads out of bounds. `check_values=False` skips that round trip for inputs the caller vouches for (a
MaskBatch from iwm.masks): the values are then clamped into range on the device instead, so a wrong
value gives a wrong row, still never an out-of-bounds access.

Backward memory: without `normalize`, the gradient needs only the shapes of x, pos and bias, so the
backward keeps zero-stride stand-ins instead of the tensors (like torch.gather, which keeps only its
index): gathering the context out of a [B, N, D] activation does not keep that activation alive.
With `normalize`, x (and pos, bias) are kept and the row statistics are recomputed in the backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .._backend import resolve_backend
from .._registry import Op, Support
from .._validate import (FLOAT_DTYPES, INDEX_DTYPES, check_cu_seqlens, check_eps, check_index_values,
                         check_tensor, check_token_axis, clamp_cu_seqlens, clamp_index)
from . import reference

__all__ = ["gather_tokens", "apply_masks", "run_forward", "run_backward"]

# What each backend has code for; no dtype limits (every FLOAT_DTYPES input runs on all three).
_SUPPORT = {"reference": Support(), "triton": Support(),
            "native": Support(devices=("cpu",), hint="the triton backend covers CUDA tensors")}
GATHER = Op("gather_tokens", _SUPPORT)
APPLY_MASKS = Op("apply_masks", _SUPPORT)  # runs on GATHER's implementations


# ---- argument checks ------------------------------------------------------------------------------

def _check_args(x, index, cu_seqlens, pos, bias, normalize) -> int:
    """Structural checks (traceable by torch.compile); returns the number of sequences B."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, ndim=3)
    if x.shape[-1] < 1:
        raise ValueError(f"x: the feature dimension must be >= 1, got shape {tuple(x.shape)}")
    check_tensor(index, "index", dtypes=INDEX_DTYPES, ndim=(1, 2), device=x.device)
    if index.dim() == 1:
        if cu_seqlens is None:
            raise ValueError("cu_seqlens: required with a packed 1-D index (offsets [B+1]); "
                             "pass a [B, K] index for rectangular masks")
        check_tensor(cu_seqlens, "cu_seqlens", dtypes=INDEX_DTYPES, ndim=1, device=x.device)
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens: needs at least one entry (offsets [0, ..., total])")
        num_seqs = cu_seqlens.numel() - 1
        if num_seqs == 0 and index.numel():
            raise ValueError(f"cu_seqlens: holds no sequence, but index has {index.numel()} entries")
    else:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens: must be None with a rectangular [B, K] index "
                             "(pass a packed 1-D index with cu_seqlens for ragged masks)")
        num_seqs = index.shape[0]
    if x.shape[0] not in (1, num_seqs):
        raise ValueError(f"x: batch {x.shape[0]} must be 1 (one x shared by every sample) or match the "
                         f"{num_seqs} sequences of {'index' if index.dim() == 2 else 'cu_seqlens'}")
    n, d = x.shape[1], x.shape[2]
    check_token_axis(n, index.numel(), "x", "index")
    if pos is not None:
        check_tensor(pos, "pos", dtypes=FLOAT_DTYPES, ndim=(2, 3), device=x.device)
        if tuple(pos.shape[-2:]) != (n, d) or (pos.dim() == 3 and pos.shape[0] != 1):
            raise ValueError(f"pos: expected shape ({n}, {d}) or (1, {n}, {d}) to match x, got {tuple(pos.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", dtypes=FLOAT_DTYPES, ndim=2, device=x.device)
        if tuple(bias.shape) != (num_seqs, d):
            raise ValueError(f"bias: expected shape ({num_seqs}, {d}) (one row per sequence), got {tuple(bias.shape)}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    return num_seqs


def _clamp_values(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """The unchecked path: index and offsets forced into range on the device (no host round trip)."""
    index = clamp_index(index, x.shape[1])
    if cu_seqlens is not None:
        cu_seqlens = clamp_cu_seqlens(cu_seqlens, index.numel())
    return index, cu_seqlens


def _check_values(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                  want_order: bool = False) -> bool:
    """Offsets and index range (host round trips; skipped while tracing). With `want_order`, also
    returns whether the destination keys of dx (sample * N + token, or token for a shared x) never
    decrease (the Triton backward then skips its sort)."""
    shared = x.shape[0] == 1
    if index.dim() == 1:
        check_cu_seqlens(cu_seqlens, "cu_seqlens", index.numel(), num_seqs=cu_seqlens.numel() - 1)
    starts = None
    if want_order and not shared:
        # max(.., 1): an empty batch has no segment starts (and torch.arange(1, 0) raises).
        starts = (cu_seqlens[1:-1] if index.dim() == 1
                  else torch.arange(1, max(index.shape[0], 1), device=index.device) * index.shape[1])
    return check_index_values(index, "index", x.shape[1], segment_starts=starts, want_order=want_order)


# ---- backends ---------------------------------------------------------------------------------------

@GATHER.implementation("reference")
def _reference_forward(x, index, cu_seqlens, pos, bias, normalize, eps):
    return reference.gather_tokens(x, index, cu_seqlens, pos=pos, bias=bias, normalize=normalize, eps=eps)


@GATHER.implementation("triton")
def _triton_forward(x, index, cu_seqlens, pos, bias, normalize, eps):
    from . import triton_kernels  # imported on first use: `import iwm_kernels` never needs triton

    return triton_kernels.gather_tokens(x, index, cu_seqlens, pos, bias, normalize, eps)


@GATHER.implementation("native")
def _native_forward(x, index, cu_seqlens, pos, bias, normalize, eps):
    from . import native

    return native.gather_tokens(x, index, cu_seqlens, pos, bias, normalize, eps)


@GATHER.implementation("reference", "backward")
def _reference_backward(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps, needs, index_sorted):
    return reference.gather_tokens_backward(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps, needs)


@GATHER.implementation("triton", "backward")
def _triton_backward(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps, needs, index_sorted):
    from . import triton_kernels

    return triton_kernels.gather_tokens_backward(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps,
                                                 needs, index_sorted)


@GATHER.implementation("native", "backward")
def _native_backward(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps, needs, index_sorted):
    from . import native

    return native.gather_tokens_backward(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps, needs)


def run_forward(backend: str, x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                pos: Optional[torch.Tensor], bias: Optional[torch.Tensor], normalize: bool, eps: float
                ) -> torch.Tensor:
    """One named backend on validated inputs (benchmarks call this directly)."""
    return GATHER.impl(backend)(x, index, cu_seqlens, pos, bias, normalize, eps)


def run_backward(backend: str, grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                 cu_seqlens: Optional[torch.Tensor], pos: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 normalize: bool, eps: float, needs: tuple[bool, bool, bool], index_sorted: bool = False
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dpos, dbias) from one named backend; None where not needed. Without `normalize`, x, pos and
    bias may be zero-stride stand-ins (only their shapes and dtypes are used). index_sorted: the
    destination keys never decrease (the Triton backward then skips its sort; the others ignore it)."""
    needs = (needs[0], needs[1] and pos is not None, needs[2] and bias is not None)
    dx, dpos, dbias = GATHER.impl(backend, "backward")(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps,
                                                        needs, index_sorted)
    if dx is not None and dpos is not None and dx.untyped_storage().data_ptr() == dpos.untyped_storage().data_ptr():
        dx = dx.clone()  # a shared x and pos get the same sums: never hand out one buffer as two gradients
    return dx, dpos, dbias


def _standin(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A tensor with t's shape, dtype and device but one row of memory (zero strides)."""
    if t is None:
        return None
    return t.new_zeros(t.shape[-1]).as_strided(t.shape, [0] * (t.dim() - 1) + [1])


def _kept_for_backward(x, pos, bias, normalize):
    if normalize:
        return x, pos, bias
    return _standin(x), _standin(pos), _standin(bias)


# ---- eager autograd ---------------------------------------------------------------------------------

class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, cu_seqlens, pos, bias, normalize, eps, backend, index_sorted):
        out = run_forward(backend, x, index, cu_seqlens, pos, bias, normalize, eps)
        ctx.save_for_backward(*_kept_for_backward(x, pos, bias, normalize), index, cu_seqlens)
        ctx.config = (normalize, eps, backend, index_sorted)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, pos, bias, index, cu_seqlens = ctx.saved_tensors
        normalize, eps, backend, index_sorted = ctx.config
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dx, dpos, dbias = run_backward(backend, grad_out, x, index, cu_seqlens, pos, bias, normalize, eps,
                                       needs, index_sorted)
        return dx, None, None, dpos, dbias, None, None, None, None


# ---- custom ops (the torch.compile path) -----------------------------------------------------------

@torch.library.custom_op("iwm::gather_tokens", mutates_args=(), device_types=None)
def _gather_tokens_op(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                      pos: Optional[torch.Tensor], bias: Optional[torch.Tensor], normalize: bool, eps: float,
                      backend: str, check_values: bool) -> torch.Tensor:
    if check_values:
        _check_values(x, index, cu_seqlens)  # the traced caller could not read the values; these are real
    return run_forward(backend, x, index, cu_seqlens, pos, bias, normalize, eps)


@_gather_tokens_op.register_fake
def _(x, index, cu_seqlens, pos, bias, normalize, eps, backend, check_values):
    return x.new_empty(*index.shape, x.shape[-1])


@torch.library.custom_op("iwm::gather_tokens_backward", mutates_args=(), device_types=None)
def _gather_tokens_backward_op(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                               cu_seqlens: Optional[torch.Tensor], pos: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], normalize: bool, eps: float, backend: str,
                               need_x: bool, need_pos: bool, need_bias: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dpos, dbias = run_backward(backend, grad_out, x, index, cu_seqlens, pos, bias, normalize, eps,
                                   (need_x, need_pos, need_bias))
    empty = grad_out.new_empty(0)
    return (dx if dx is not None else empty, dpos if dpos is not None else empty.clone(),
            dbias if dbias is not None else empty.clone())


@_gather_tokens_backward_op.register_fake
def _(grad_out, x, index, cu_seqlens, pos, bias, normalize, eps, backend, need_x, need_pos, need_bias):
    def like(t, need):
        return t.new_empty(t.shape) if need and t is not None else grad_out.new_empty(0)

    return like(x, need_x), like(pos, need_pos), like(bias, need_bias)


def _op_setup_context(ctx, inputs, output):
    x, index, cu_seqlens, pos, bias, normalize, eps, backend, _ = inputs
    ctx.save_for_backward(*_kept_for_backward(x, pos, bias, normalize), index, cu_seqlens)
    ctx.config = (normalize, eps, backend)


def _op_backward(ctx, grad_out):
    x, pos, bias, index, cu_seqlens = ctx.saved_tensors
    normalize, eps, backend = ctx.config
    need_x, need_pos, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dx, dpos, dbias = torch.ops.iwm.gather_tokens_backward(grad_out.contiguous(), x, index, cu_seqlens, pos, bias,
                                                           normalize, eps, backend, need_x, need_pos, need_bias)
    return (dx if need_x else None, None, None, dpos if need_pos else None, dbias if need_bias else None,
            None, None, None, None)


_gather_tokens_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---- public API -------------------------------------------------------------------------------------

def _gather(x, index, cu_seqlens, pos, bias, normalize, eps, backend, index_sorted, check_values=True):
    if torch.compiler.is_compiling():
        return _gather_tokens_op(x, index, cu_seqlens, pos, bias, normalize, eps, backend, check_values)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, pos, bias))
    if not wants_grad:
        return run_forward(backend, x, index, cu_seqlens, pos, bias, normalize, eps)
    return _GatherTokens.apply(x, index, cu_seqlens, pos, bias, normalize, eps, backend, index_sorted)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None, *,
                  pos: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  normalize: bool = False, eps: float = 1e-5, backend: Optional[str] = None,
                  check_values: bool = True) -> torch.Tensor:
    """Gather the selected tokens of each sample, fused with a positional embedding, a per-sample bias
    and a layer norm.

    x: [B, N, D] tokens, or [1, N, D] shared by every sample (its gradient sums over the samples).
    index: token positions, int32/int64: packed [T] with `cu_seqlens` [B+1] (ragged: rows
        cu_seqlens[b]:cu_seqlens[b+1] belong to sample b), or rectangular [B, K] (row b is sample b).
    pos: [N, D] or [1, N, D], added at the gathered positions. bias: [B, D], added to sample b's rows.
        Both may be in another float dtype than x; the sum is fp32 (fp64 for fp64 x).
    normalize: apply a no-affine layer norm to each selected row (eps as in F.layer_norm, default
        1e-5), which computes I-JEPA's targets without normalising tokens that are thrown away.
    check_values: read index and cu_seqlens to check them (one host round trip, a device sync on
        CUDA). False skips that for values the caller vouches for (e.g. a MaskBatch): they are clamped
        into range on the device instead, so wrong values give wrong rows, never an out-of-bounds access.
    Returns [T, D] (packed) or [B, K, D], in x's dtype. Gradients flow to x, pos and bias; repeated
    indices sum.
    """
    _check_args(x, index, cu_seqlens, pos, bias, normalize)
    eps = check_eps(eps)
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
    chosen = resolve_backend(backend, x.device, GATHER.name)
    index_sorted = False
    if not check_values:
        index, cu_seqlens = _clamp_values(x, index, cu_seqlens)
    elif not torch.compiler.is_compiling():  # (while tracing, the op checks the values when it runs)
        wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, pos, bias))
        # The order matters only to the Triton backward, which skips a sort when the keys are sorted.
        index_sorted = _check_values(x, index, cu_seqlens, want_order=wants_grad and chosen == "triton")
    return _gather(x, index, cu_seqlens, pos, bias, normalize, eps, chosen, index_sorted, check_values)


def apply_masks(x: torch.Tensor, masks: Sequence[torch.Tensor], *, backend: Optional[str] = None,
                check_values: bool = True) -> torch.Tensor:
    """Drop-in for I-JEPA's `apply_masks(x, masks)`: x [B, N, D] gathered with each [B, K] index tensor
    of `masks`, concatenated along the batch dimension ([len(masks) * B, K, D]); same values and
    gradients, one kernel launch for all masks. check_values: as for gather_tokens."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, ndim=3)
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks: expected a list of [B, K] index tensors, got {type(masks).__name__}")
    if not masks:
        raise ValueError("masks: empty list (nothing to gather)")
    batch, n, dim = x.shape
    for j, m in enumerate(masks):
        check_tensor(m, f"masks[{j}]", dtypes=INDEX_DTYPES, ndim=2, device=x.device)
        if m.shape[0] != batch:
            raise ValueError(f"masks[{j}]: {m.shape[0]} rows, but x has batch {batch}")
        if m.shape[1] != masks[0].shape[1]:
            raise ValueError(f"masks[{j}]: {m.shape[1]} indices per row, masks[0] has {masks[0].shape[1]} "
                             "(the results are concatenated, so every mask needs the same length)")
    check_token_axis(n, masks[0].numel(), "x", "masks")
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
    chosen = resolve_backend(backend, x.device, APPLY_MASKS.name)
    if not check_values:
        masks = [clamp_index(m, n) for m in masks]
    if torch.compiler.is_compiling():
        # One op per mask, each checked against N at run time inside the op.
        outs = [_gather_tokens_op(x, m, None, None, None, False, 1e-5, chosen, check_values) for m in masks]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    # All masks at once: x as one shared sequence of B*N tokens, and mask j's row b shifted by b*N.
    k = masks[0].shape[1]
    wide = batch * n >= 2**31 or any(m.dtype == torch.int64 for m in masks)
    stacked = torch.stack([m.to(torch.int64) if wide else m for m in masks])  # [M, B, K]
    if not check_values:
        in_order = False
    elif len(masks) == 1:
        want_order = chosen == "triton" and torch.is_grad_enabled() and x.requires_grad
        rows = torch.arange(1, max(batch, 1), device=x.device) * k if want_order else None
        in_order = check_index_values(stacked[0], "masks[0]", n, segment_starts=rows, want_order=want_order)
    else:
        try:
            check_index_values(stacked, "masks", n, want_order=False)
        except ValueError:
            for j, m in enumerate(masks):  # say which one
                check_index_values(m, f"masks[{j}]", n, want_order=False)
            raise
        in_order = False
    shift = torch.arange(batch, device=x.device, dtype=stacked.dtype) * n
    flat_index = (stacked + shift[None, :, None]).view(len(masks) * batch, k)
    return _gather(x.reshape(1, batch * n, dim), flat_index, None, None, None, False, 1e-5, chosen, in_order)

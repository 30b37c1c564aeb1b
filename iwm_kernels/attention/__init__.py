"""Variable-length attention for packed sequences, with the IWM predictor's shared-context segments.

Public entry: `varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, segment_ids=None, scale=None,
backend=None)` on packed [T, H, Dh] tensors (FlashAttention's varlen layout). With `segment_ids`, a
query in segment 0 sees only segment-0 keys of its sequence, and a query in segment g > 0 sees the
segment-0 keys and its own segment's keys (see layout.py for how the kernels use that).

Eager calls run the chosen backend directly (Triton through a torch.autograd.Function; the reference
and native backends through plain autograd), with the layout's value checks cached per offsets tensor.
Under torch.compile the call is the custom op `iwm::varlen_attention` (fake implementation, autograd
through `iwm::varlen_attention_backward`), so a compiled model traces through without a graph break.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._backend import resolve_backend
from .._registry import Op, Support
from .._validate import (FLOAT_DTYPES, check_cu_seqlens, check_host_lengths, check_max_seqlen, check_segment_ids,
                         check_tensor)
from . import native, reference
from .layout import Layout, prepare
from .module import VarlenSelfAttention
from .packing import PackedPredictorInput, pack_predictor_sequences, unpack_targets

__all__ = ["varlen_attention", "VarlenSelfAttention", "pack_predictor_sequences", "unpack_targets",
           "PackedPredictorInput", "Layout", "prepare", "run_backend", "TRITON_HEAD_DIMS"]

# Head dims the Triton kernels run at full tile efficiency; any other dim up to 128 is zero-padded
# inside the kernel (masked loads) to the next power of two.
TRITON_HEAD_DIMS = (32, 64, 128)
TRITON_MAX_HEAD_DIM = 128
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

ATTENTION = Op("varlen_attention", {
    "reference": Support(),
    "triton": Support(dtypes=TRITON_DTYPES, hint="use backend='reference' or 'native' for float64"),
    "native": Support(),
}, dtype_arg="q")


def _check_qkv(q: object, k: object, v: object) -> tuple[int, int, int]:
    check_tensor(q, "q", dtypes=FLOAT_DTYPES, ndim=3)
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, name, dtypes=FLOAT_DTYPES, ndim=3, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {str(t.dtype).replace('torch.', '')} differs from q's "
                            f"{str(q.dtype).replace('torch.', '')}")
        if t.shape != q.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from q's {tuple(q.shape)} "
                             "(packed [T, H, Dh]; T, heads and head dim must match)")
    T, H, D = q.shape
    if H == 0 or D == 0:
        raise ValueError(f"q: needs at least one head and a head dim >= 1, got shape {tuple(q.shape)}")
    return T, H, D


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale: must be finite and non-zero, got {scale}")
    return float(scale)


def _check_triton_head_dim(q: torch.Tensor) -> None:
    # A shape limit of the Triton kernels (their dtypes are in ATTENTION's registry entry).
    if q.shape[2] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {q.shape[2]} is not supported by the triton backend (at most "
                         f"{TRITON_MAX_HEAD_DIM}; {', '.join(map(str, TRITON_HEAD_DIMS))} run unpadded)")


class _TritonVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, max_seqlen, scale):
        from . import triton_kernels

        out, lse = triton_kernels.forward(q, k, v, layout, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.max_seqlen, ctx.scale = layout, max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from . import triton_kernels

        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled() and any(t.requires_grad for t in (grad_out, q, k, v)):
            # create_graph=True (a double backward, e.g. a gradient penalty): the backward kernels are not
            # differentiable, and their results would be silently constant. The reference's textbook
            # backward is made of differentiable ops, so autograd records it: slower, but exact. (torch's
            # once_differentiable would only raise under .backward(); autograd.grad(..., inputs) prunes
            # its error node and drops the term.)
            dq, dk, dv = reference.varlen_attention_backward(grad_out, q, k, v, ctx.layout.cu_seqlens,
                                                             ctx.layout.segment_ids, ctx.scale)
            return dq, dk, dv, None, None, None
        dq, dk, dv = triton_kernels.backward(grad_out, q, k, v, out, lse, ctx.layout, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


# Entry points per backend: "forward" (eager, differentiable), "op_forward" (inside the custom op: no
# autograd, returns (out, lse); lse is the Triton backward's and empty otherwise) and "op_backward".
@ATTENTION.implementation("triton")
def _triton_forward(q, k, v, layout, max_seqlen, scale):
    return _TritonVarlenAttention.apply(q, k, v, layout, max_seqlen, scale)


@ATTENTION.implementation("native")
def _native_forward(q, k, v, layout, max_seqlen, scale):
    return native.varlen_attention(q, k, v, layout, scale)


@ATTENTION.implementation("reference")
def _reference_forward(q, k, v, layout, max_seqlen, scale):
    return reference.varlen_attention(q, k, v, layout.cu_seqlens, layout.segment_ids, scale)


@ATTENTION.implementation("triton", "op_forward")
def _triton_op_forward(q, k, v, layout, max_seqlen, scale):
    from . import triton_kernels

    return triton_kernels.forward(q, k, v, layout, max_seqlen, scale)


@ATTENTION.implementation("native", "op_forward")
def _native_op_forward(q, k, v, layout, max_seqlen, scale):
    with torch.no_grad():
        return native.varlen_attention(q, k, v, layout, scale), q.new_empty((0,), dtype=torch.float32)


@ATTENTION.implementation("reference", "op_forward")
def _reference_op_forward(q, k, v, layout, max_seqlen, scale):
    with torch.no_grad():
        return _reference_forward(q, k, v, layout, max_seqlen, scale), q.new_empty((0,), dtype=torch.float32)


@ATTENTION.implementation("triton", "op_backward")
def _triton_op_backward(grad_out, q, k, v, out, lse, layout, max_seqlen, scale):
    from . import triton_kernels

    return triton_kernels.backward(grad_out, q, k, v, out, lse, layout, max_seqlen, scale)


@ATTENTION.implementation("native", "op_backward")
def _native_op_backward(grad_out, q, k, v, out, lse, layout, max_seqlen, scale):
    return native.varlen_attention_backward(grad_out, q, k, v, layout, scale)


@ATTENTION.implementation("reference", "op_backward")
def _reference_op_backward(grad_out, q, k, v, out, lse, layout, max_seqlen, scale):
    return reference.varlen_attention_backward(grad_out, q, k, v, layout.cu_seqlens, layout.segment_ids, scale)


def run_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                max_seqlen: int, scale: float) -> torch.Tensor:
    """One named backend on validated inputs, differentiable (benchmarks call this directly)."""
    return ATTENTION.impl(backend)(q, k, v, layout, max_seqlen, scale)


# ---- custom ops: what torch.compile sees ---------------------------------------------------------------

@torch.library.custom_op("iwm::varlen_attention", mutates_args=(), device_types=None)
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, segment_ids: Optional[torch.Tensor], scale: float, backend: str,
                         check_values: bool = True, host_lengths: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    # host_lengths is a CPU tensor: the op reads it when it runs (no device sync), so the traced graph
    # carries no per-step length and the native CPU path still runs without padding.
    layout = prepare(cu_seqlens, segment_ids, q.shape[0], max_seqlen, check_values=check_values,
                     host_lengths=host_lengths)
    return ATTENTION.impl(backend, "op_forward")(q, k, v, layout, max_seqlen, scale)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, segment_ids, scale, backend, check_values=True, host_lengths=None):
    lse_shape = (q.shape[1], q.shape[0]) if backend == "triton" else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("iwm::varlen_attention_backward", mutates_args=(), device_types=None)
def _varlen_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                  segment_ids: Optional[torch.Tensor], scale: float, backend: str,
                                  check_values: bool = True, host_lengths: Optional[torch.Tensor] = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = prepare(cu_seqlens, segment_ids, q.shape[0], max_seqlen, check_values=check_values,
                     host_lengths=host_lengths)
    return ATTENTION.impl(backend, "op_backward")(grad_out, q, k, v, out, lse, layout, max_seqlen, scale)


@_varlen_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, segment_ids, scale, backend, check_values=True,
      host_lengths=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, segment_ids, scale, backend, check_values, host_lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, segment_ids, host_lengths)
    ctx.max_seqlen, ctx.scale, ctx.backend, ctx.check_values = max_seqlen, scale, backend, check_values


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, segment_ids, host_lengths = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                               segment_ids, ctx.scale, ctx.backend, ctx.check_values, host_lengths)
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---- public API ----------------------------------------------------------------------------------------

def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, segment_ids: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, backend: Optional[str] = None,
                     check_values: bool = True, host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention inside each packed sequence: out[T, H, Dh].

    q, k, v: packed [T, H, Dh], same shape, dtype (float32, bfloat16, float16; float64 on the
        reference and native backends) and device; rows may be strided (e.g. views of one qkv tensor)
        as long as the head dim is contiguous.
    cu_seqlens: [num_seqs + 1] int32/int64 offsets on q's device: sequence i is rows
        cu_seqlens[i]:cu_seqlens[i+1]; empty sequences are allowed. A token attends only within its
        own sequence.
    max_seqlen: a Python int >= the longest sequence. Checked calls use it only as a bound (the Triton
        grid is sized from the longest sequence the value check finds); with check_values=False it
        must be >= the longest and it sizes the launch (the native padding, the Triton grid).
    segment_ids: optional [T] int labels of the predictor's shared-context structure. Inside each
        sequence every segment is contiguous and segment 0 (context) comes first. A query in segment 0
        sees only segment-0 keys; a query in segment g > 0 sees segment-0 keys and its own segment's.
    scale: softmax scale, default 1/sqrt(Dh).
    backend: "reference" | "triton" | "native"; default from use_backend / IWM_KERNELS_BACKEND, else
        automatic (a float64 q skips triton, which has no float64 kernels).
    check_values: read cu_seqlens and segment_ids to validate them (a host round trip, a device sync
        on CUDA; cached per offsets tensor). False is for layouts the caller vouches for (a sampler's
        MaskBatch packed by pack_predictor_sequences): nothing is read back on the native and Triton
        backends, the offsets are clamped into range on the device. The reference backend loops over
        the sequences in Python, so it reads cu_seqlens either way (the slow clarity path).

    host_lengths: optional CPU int tensor of the sequences' lengths, [S] or, with segment_ids, [S, K]
        segment lengths per sequence (segment 0 first), made where the masks are made (a MaskBatch's
        `host_sizes`). With check_values=False the caller vouches for them like the offsets: the
        launches are sized from their longest (max_seqlen is then only a bound) and the native CPU
        backend runs per sequence without padding. Read on the host (a CPU tensor: no device sync),
        when the attention runs, also under torch.compile (the graph does not specialise on them).

    Accumulation is fp32 for every input dtype, and the output has q's dtype, under autocast too.
    Differentiable in q, k and v; twice through the reference and triton backends (see
    _TritonVarlenAttention.backward), not through native (SDPA raises).
    """
    T, H, D = _check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, "cu_seqlens", T, device=q.device, check_values=False)
    check_max_seqlen(max_seqlen, "max_seqlen")
    if segment_ids is not None:
        check_segment_ids(segment_ids, "segment_ids", cu_seqlens, T, device=q.device, check_values=False)
    scale = _check_scale(scale, D)
    chosen = resolve_backend(backend, q.device, ATTENTION.name, dtype=q.dtype)
    if chosen == "triton":
        _check_triton_head_dim(q)
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
    if host_lengths is not None:
        check_host_lengths(host_lengths, "host_lengths", cu_seqlens.numel() - 1)
    if torch.compiler.is_compiling():
        return _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, segment_ids, scale, chosen, check_values,
                                    host_lengths)[0]
    layout = prepare(cu_seqlens, segment_ids, T, max_seqlen, check_values=check_values, host_lengths=host_lengths)
    return run_backend(chosen, q, k, v, layout, max_seqlen, scale)

"""Linear layers whose fp32 CPU products run on oneDNN, PyTorch's other GEMM engine.

Why: ATen's fp32 matmul on the CPU calls MKL's sgemm, and MKL picks its code path by CPU vendor: on AMD
processors it runs its AVX2 kernels even where the CPU has AVX-512. oneDNN, which PyTorch ships too
(`torch.ops.mkldnn._linear_pointwise`, the op Inductor's CPU backend emits for linears), picks its
kernels from the CPU's feature flags. On the AMD EPYC (Zen 5) CPUs of our CI, oneDNN runs the model's
fp32 products 1.3-2x as fast, forward and backward (`benchmarks/suites/linear.py` measures both engines
on the model's shapes in every report). Same products, same FLOPs, fp32 throughout; the two engines
sum in different orders, so results differ by rounding (relative 1e-6), as any two GEMMs do.

`linear(x, weight, bias=None, residual=None)` is `residual + x @ weight.T + bias`, differentiable in
every argument (twice too: under create_graph the backward is ATen's). The backward runs on oneDNN
as well: the input gradient is `g @ weight` (a linear with the transposed weight, a strided view, no
copy); the weight gradient `g.T @ x` is computed in the
orientation whose output has the longer side as rows ([N, K] or [K, N] then transposed), the faster of
the two for these skinny products.

Where oneDNN does not take the call, it is `F.linear` (plus the residual, fused as `residual_addmm`
below): CUDA and every other device, dtypes other than fp32, autocast, inside torch.compile (Inductor
chooses its own kernels), with oneDNN disabled (`torch.backends.mkldnn.flags(enabled=False)`), under
iwm_kernels' reference backend (`use_backend("reference")`, IWM_KERNELS_BACKEND=reference), and for
fewer than MIN_ROWS rows (oneDNN's per-call overhead outweighs its rate there).

Row counts are padded with zero rows up to `bucket_rows` (at most 1/16 more rows, sliced off again):
oneDNN compiles and caches a kernel per shape, and the token counts change every step.

`Linear` is `nn.Linear` with this forward: same parameters, same state_dict keys.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import requested_backend

# oneDNN, and ideep (PyTorch's wrapper over it), each cache a compiled kernel per problem shape, 1024 by
# default. With the token counts changing every step the caches fill, and their entries, allocated between
# the step's tensors, keep glibc from reusing and returning the freed memory: a 300-step demo run grew to
# 2.7 GB resident against 1.35 GB with ATen's GEMM (scripts/rss_soak.py). One step uses ~70 shapes
# (forward, input and weight gradients of each layer); at 64 entries each step recompiled them (the tiny
# step 15 % slower), at 128 it runs at the speed of 1024 and the demo stays at 1.33 GB, at 256 1.66 GB.
# Both read their variable when first used; the environment's own value wins.
CACHE_ENTRIES = "128"
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", CACHE_ENTRIES)
os.environ.setdefault("LRU_CACHE_CAPACITY", CACHE_ENTRIES)

# Below this many rows (x's leading dims flattened) a product takes microseconds and oneDNN's per-call
# setup is slower than MKL's: measured at 32 rows (0.8x), even by 256.
MIN_ROWS = 256


def bucket_rows(rows: int) -> int:
    """`rows` rounded up to one of 16 sizes per octave (at most 1/16 more rows).

    oneDNN compiles a kernel for every new problem shape (about a millisecond) and caches it (see
    CACHE_ENTRIES): with the row count changing every step, every step would compile again. On padded
    row counts a run sees a bounded set of shapes."""
    step = 1 << max(0, rows.bit_length() - 5)
    return -(-rows // step) * step


def _onednn_linear_op():
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_linear_op()


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear op and oneDNN is enabled (torch.backends.mkldnn)."""
    return _LINEAR is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           residual: Optional[torch.Tensor]) -> bool:
    """Whether oneDNN runs this call (the module docstring lists when it does not)."""
    if torch.compiler.is_compiling():
        return False  # first: no guard on any size or flag enters the trace
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        return False  # F.linear raises its own shape error
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (weight.shape[0],)):
        return False
    if residual is not None and (residual.dtype != torch.float32
                                 or residual.shape != x.shape[:-1] + (weight.shape[0],)):
        return False
    if x.numel() < MIN_ROWS * x.shape[-1] or x.shape[-1] == 0 or weight.shape[0] == 0:
        return False
    if torch.is_autocast_enabled("cpu") or not onednn_available():
        return False
    return requested_backend(None) != "reference"


def _mm_nt(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T (+ bias) on oneDNN; a and b may be transposed views."""
    return _LINEAR(a, b, bias, "none", [], "")


def _weight_grad(g: torch.Tensor, x: torch.Tensor, mm_nt=_mm_nt) -> torch.Tensor:
    """g [M, N]^T @ x [M, K] -> [N, K], computed with the longer of N, K as the output's rows."""
    if g.shape[1] >= x.shape[1]:
        return mm_nt(g.t(), x.t())
    return mm_nt(x.t(), g.t()).t()


def _onednn_forward(rows, weight, bias, residual):
    """rows [M, K] -> [M, N] on oneDNN, the residual [M, N] added in the GEMM's epilogue."""
    if residual is None:
        return _mm_nt(rows, weight, bias)
    return _LINEAR.binary(rows, residual, weight, bias, "add")


class _OneDNNLinear(torch.autograd.Function):
    """On 2-D rows: its outputs are fresh tensors, never views, so callers may write into them in place."""

    @staticmethod
    def forward(ctx, rows, weight, bias, residual):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        return _onednn_forward(rows, weight, bias, residual)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        # create_graph=True (a gradient penalty, say): differentiable ATen products, so that the second
        # derivative is autograd's own; otherwise oneDNN.
        mm_nt = (lambda a, b: a @ b.t()) if torch.is_grad_enabled() else _mm_nt
        g = grad.contiguous()
        grad_rows = grad_weight = grad_bias = grad_residual = None
        if ctx.needs_input_grad[0]:
            grad_rows = mm_nt(g, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(g, rows, mm_nt)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        if ctx.has_residual and ctx.needs_input_grad[3]:
            grad_residual = grad
        return grad_rows, grad_weight, grad_bias, grad_residual


def residual_addmm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """residual + F.linear(x, weight, bias) on ATen's GEMM, one pass over the output less where it can:
    ATen's addmm copies the broadcast bias into a fresh output before the matmul accumulates into it, and
    the residual add is another pass; here the bias goes into the residual (one pass) and the matmul
    accumulates into that in place (`addmm_`, beta = 1). Same value and gradients; under autocast, with
    mixed dtypes or a strided residual it is the plain form."""
    if (bias is None or not residual.is_contiguous() or residual.dtype != x.dtype or x.dtype != weight.dtype
            or residual.shape[:-1] != x.shape[:-1] or torch.is_autocast_enabled(residual.device.type)):
        return residual + F.linear(x, weight, bias)
    # A fresh tensor, not a view of one: writing into it in place is safe and costs autograd nothing
    # (an in-place write into a view would make the backward copy the gradient back through the view).
    out = residual.reshape(-1, residual.shape[-1]) + bias
    return out.addmm_(x.reshape(-1, x.shape[-1]), weight.t()).view(residual.shape)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [M, C] contiguous with zero rows appended up to `rows` (t itself when nothing is to do)."""
    if t.shape[0] != rows:
        return F.pad(t, (0, 0, 0, rows - t.shape[0]))
    return t.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """residual + x @ weight.T + bias for x [..., K], weight [N, K], bias [N], residual [..., N]
    (bias and residual optional); oneDNN where the module docstring says, else ATen."""
    if _takes(x, weight, bias, residual):
        n = weight.shape[0]
        rows = x.reshape(-1, x.shape[-1])
        m = rows.shape[0]
        padded = bucket_rows(m)
        # Zero rows up to the bucket: their outputs are sliced off and their gradients are zero.
        rows = _pad_rows(rows, padded)
        res = None if residual is None else _pad_rows(residual.reshape(-1, n), padded)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
            out = _OneDNNLinear.apply(rows, weight, bias, res)
        else:
            out = _onednn_forward(rows, weight, bias, res)
        if padded != m:
            out = out[:m]
        return out.view(x.shape[:-1] + (n,)) if x.dim() != 2 else out
    if residual is None:
        return F.linear(x, weight, bias)
    return residual_addmm(residual, x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (same parameters and state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

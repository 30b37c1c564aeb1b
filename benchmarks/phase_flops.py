"""Per-phase FLOP accounting of one training step: FLOPs computed against FLOPs the tokens need.

Computed: torch's FlopCounterMode over one real forward and backward (every matmul, convolution and
attention op the step dispatches, with the shapes it really ran: padded rows and padded (query, key)
pairs count). CPU SDPA's flash kernel and the in-place addmm_ have no formula in torch, so they are added here
(the flash kernel's mask is not looked at: a padded square counts whole, which is what it computes).
Needed: `benchmarks.flops`, analytic, from the variant's own tokens and layout (the predictor's repeated
context is I-JEPA's computation, so it is needed work).

Phases (each a ratio computed / needed; a phase doing no more than its tokens need reads 1.00):
  target encoder    forward, the whole target view
  context encoder   forward, the context tokens
  predictor         forward, its sequences
  attention         forward, the attention products of all three (QK^T and PV)
  backward          the trained parts' backward: 2x their forward, less the patch embedding's input
                    gradient (the images need none)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from iwm_kernels import _native
from iwm_kernels.gemm import onednn_available

from . import flops as F

aten = torch.ops.aten
PHASES = ("target encoder", "context encoder", "predictor", "attention", "backward")
LIMIT = 1.1   # the most any phase may compute relative to what its tokens need


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = query_shape
    return 4 * b * h * sq * key_shape[2] * d


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, sq, d = query_shape
    return 8 * b * h * sq * key_shape[2] * d


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _onednn_linear(x_shape, *args, out_shape=None, **kwargs) -> int:
    """torch.ops.mkldnn._linear_pointwise: (x, w, ...) or, the binary overload, (x, other, w, b, attr);
    x [..., K] (a transposed view in the weight gradient), w [N, K]."""
    w_shape = args[1] if len(args) == 4 and isinstance(args[3], str) else args[0]
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return 2 * rows * x_shape[-1] * w_shape[0]


def _varlen_sdpa_fwd(q_shape, k_shape, v_shape, lengths, *args, out_shape=None, **kwargs) -> int:
    _, h, d = q_shape
    return 4 * h * d * sum(n * n for n in lengths)


def _varlen_sdpa_bwd(grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, lengths, *args,
                     out_shape=None, **kwargs) -> int:
    _, h, d = q_shape
    return 8 * h * d * sum(n * n for n in lengths)


def _custom() -> dict:
    """torch's counter has no formula for CPU SDPA's flash kernel, nor for the in-place addmm_ that
    `iwm_kernels.gemm.residual_addmm` accumulates into the residual with, nor for oneDNN's linear
    (`iwm_kernels.gemm`'s fp32 CPU products), nor for the C++ extension's varlen_sdpa (its flash calls
    run inside the op, where the counter does not see them)."""
    out = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
           aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
           aten.addmm_: _addmm_inplace}
    if onednn_available():
        out[torch.ops.mkldnn._linear_pointwise] = _onednn_linear
    if _native.status().available:
        ops = _native.ops()
        out.update({ops.varlen_sdpa_fwd: _varlen_sdpa_fwd, ops.varlen_sdpa_bwd: _varlen_sdpa_bwd})
    return out


# The ops that are attention products: fused SDPA kernels, the C++ extension's varlen_sdpa, and the
# hand-written / math path's bmm.
ATTENTION_OPS = {"aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention",
                 "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_cudnn_attention",
                 "iwm_native.varlen_sdpa_fwd", "aten.bmm", "aten.baddbmm"}


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_custom())


@dataclass(frozen=True)
class Phase:
    name: str
    computed: float
    needed: float

    @property
    def ratio(self) -> float:
        return self.computed / self.needed if self.needed else float("inf") if self.computed else 1.0


def _split(counts: dict) -> tuple[float, float]:
    """(all FLOPs, attention FLOPs) of one counter's op -> count dict."""
    total = float(sum(counts.values()))
    return total, float(sum(v for op, v in counts.items() if str(op) in ATTENTION_OPS))


def needed(model, context_lengths, target_lengths, *, shared: bool, dense: bool = False) -> dict:
    """Analytic FLOPs per phase for these tokens (see the module docstring); dense=True for the
    I-JEPA-style baseline's algorithm (its unsplit action MLP, its last predictor block on every row)."""
    enc, pred, patches, patch_in = F.model_dims(model)
    batch = len(context_lengths)
    step = F.step_flops(model, context_lengths, target_lengths, shared=shared, split_conditioning=not dense,
                        prune_last_block=not dense)
    extra = F.ACTION_DIM if model.predictor.conditioning == "sequence" else 0
    _, pairs = F.predictor_pairs(context_lengths, target_lengths, shared, extra)
    attention = (enc.depth * F.attention_flops(batch * patches * patches, enc.dim)
                 + enc.depth * F.attention_flops(sum(n * n for n in context_lengths), enc.dim)
                 + pred.depth * F.attention_flops(pairs, pred.dim))
    backward = 2 * (step.encoder + step.predictor) - F.linear_flops(batch * patches, patch_in, enc.dim)
    return {"target encoder": step.target_encoder, "context encoder": step.encoder, "predictor": step.predictor,
            "attention": attention, "backward": backward}


def _phases(computed: dict, need: dict) -> list[Phase]:
    return [Phase(p, computed[p], need[p]) for p in PHASES]


def ours(model, source, target, masks, action=None, *, backend: Optional[str] = None) -> list[Phase]:
    """Our step (`IWM.forward` then the backward) on a MaskBatch, in the predictor's current layout."""
    fwd = counter()
    with fwd:
        loss, _ = model(source, target, masks, action, backend=backend)
    bwd = counter()
    with bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    counts = fwd.get_flop_counts()
    computed, attention = {}, 0.0
    for phase, name in (("target encoder", "target_encoder"), ("context encoder", "encoder"),
                        ("predictor", "predictor")):
        total, attn = _split(counts.get(f"{type(model).__name__}.{name}", {}))
        computed[phase] = total
        attention += attn
    computed["attention"] = attention
    computed["backward"] = float(bwd.get_total_flops())
    ctx, tgt = F.mask_lengths(masks)
    return _phases(computed, needed(model, ctx, tgt, shared=model.predictor.shared_context))


def baseline(forward, source, target, masks_enc, masks_pred, action=None) -> list[Phase]:
    """The faithful I-JEPA step (`benchmarks.ijepa_baseline.IJEPAForward`), each part under its own counter."""
    model = forward.model
    computed, attention = {}, 0.0
    parts = {}
    for phase, run in (("target encoder", lambda: forward.targets(target, masks_enc, masks_pred)),
                       ("context encoder", lambda: forward.context(source, masks_enc)),
                       ("predictor", lambda: forward.predict(parts["context encoder"], masks_enc, masks_pred, action))):
        c = counter()
        with c:
            parts[phase] = run()
        computed[phase], attn = _split(c.get_flop_counts()["Global"])
        attention += attn
    computed["attention"] = attention
    loss = torch.nn.functional.smooth_l1_loss(parts["predictor"].float(), parts["target encoder"].float())
    bwd = counter()
    with bwd:
        loss.backward()
    model.zero_grad(set_to_none=True)
    computed["backward"] = float(bwd.get_total_flops())
    batch = masks_enc[0].shape[0]
    kc, kt = masks_enc[0].shape[1], masks_pred[0].shape[1]
    return _phases(computed, needed(model, [kc] * batch, [[kt] * len(masks_pred)] * batch, shared=False,
                                    dense=True))


def worst(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.ratio)


def as_dict(phases: list[Phase]) -> dict:
    return {p.name: {"computed GFLOP": p.computed / 1e9, "needed GFLOP": p.needed / 1e9, "ratio": p.ratio}
            for p in phases}

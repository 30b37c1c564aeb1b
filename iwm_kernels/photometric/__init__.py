"""Fused photometric augmentation: colour jitter, grayscale, blur, solarise and normalisation of one or
two views of an image batch, in about one read of the images and one write per view.

Public entries:
  photometric(images, params, *, mean, std, out_dtype, backend)                 -> [B, 3, H, W]
  photometric_two_view(images, source_params, target_params, *, ...)           -> (source, target)

`params` is a float32 `[B, NUM_PARAMS]` table, one row per image, columns in chain order:

  0 brightness factor       1 = identity          (blend with black)
  1 contrast factor         1 = identity          (blend with the image's mean gray value)
  2 saturation factor       1 = identity          (blend with the gray image)
  3 hue shift               0 = identity, in [-0.5, 0.5] turns of the hue circle (wraps around)
  4 grayscale flag          0 / 1
  5 blur sigma              0 = no blur; pixels; kernel radius ceil(3 sigma), reflect padding
  6 solarise flag           0 / 1
  7 solarise threshold      pixels >= threshold (in [0, 1] units) become 1 - x

The semantics are `reference.py`'s per-transform chain (torchvision's formulas). The fast backends:
  1. a reduction pass: each view's mean gray value after brightness (contrast needs it), in per-chunk
     partial sums added up in a fixed order (no atomics, so results are deterministic);
  2. one fused pass: read each pixel once, apply brightness -> contrast -> saturation -> hue ->
     grayscale -> solarise -> normalise for every view, write each view once;
  3. only for (view, image) pairs with sigma > 0: pass 2 writes the pre-blur image to an fp32 scratch
     instead, then a horizontal and a vertical blur pass run, the vertical one finishing with solarise
     and normalisation (solarise comes after blur in the chain, so it cannot be applied earlier).
The blur plan (which pairs blur, their taps) is made on the host from a CPU copy of the parameters: pass
CPU parameter tables (they are copied to the device) to avoid a device-to-host read, or a plan made
beforehand from Python/NumPy sigmas (`blur_plan_from_sigmas`, e.g. where the parameters are drawn), which
reads no tensor at all. With that plan and `check_values=False` (parameters validated where they were
made) a call reads nothing back on the native and Triton backends.
There is no backward: augmentation is applied to data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .._backend import resolve_backend
from .._registry import Op, Support
from .._validate import (OUTPUT_DTYPES, check_channel_values, check_dtype_choice, check_image_batch,
                         check_param_table, check_same_device)
from . import reference
from .reference import (IDENTITY_PARAMS, NUM_PARAMS, PARAM_BLUR_SIGMA, PARAM_BRIGHTNESS, PARAM_CONTRAST,
                        PARAM_GRAYSCALE, PARAM_HUE, PARAM_SATURATION, PARAM_SOLARIZE, PARAM_SOLARIZE_THRESHOLD,
                        pack_params)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_BLUR_SIGMA = 256.0

# (label, low, high, is_flag) per column, for the shared validator.
PARAM_COLUMNS = (
    ("brightness", 0.0, math.inf, False),
    ("contrast", 0.0, math.inf, False),
    ("saturation", 0.0, math.inf, False),
    ("hue", -0.5, 0.5, False),
    ("grayscale", 0.0, 1.0, True),
    ("blur_sigma", 0.0, MAX_BLUR_SIGMA, False),
    ("solarize", 0.0, 1.0, True),
    ("solarize_threshold", -math.inf, math.inf, False),
)

__all__ = ["photometric", "photometric_two_view", "pack_params", "NUM_PARAMS", "IDENTITY_PARAMS",
           "PARAM_BRIGHTNESS", "PARAM_CONTRAST", "PARAM_SATURATION", "PARAM_HUE", "PARAM_GRAYSCALE",
           "PARAM_BLUR_SIGMA", "PARAM_SOLARIZE", "PARAM_SOLARIZE_THRESHOLD", "IMAGENET_MEAN", "IMAGENET_STD",
           "run_backend", "BlurPlan", "blur_plan", "blur_plan_from_sigmas"]


@dataclass(frozen=True)
class BlurPlan:
    """Which (view, image) pairs blur, on the host.

    slot_of: int32 [V * B], the scratch slot of pair (v, b) at v * B + b, or -1 (no blur).
    slot_row: int32 [NB], the pair (v * B + b) of each slot.
    taps: float32 [NB, K], each slot's normalised Gaussian taps over the common window K = 2R + 1.
    """
    slot_of: torch.Tensor
    slot_row: torch.Tensor
    taps: torch.Tensor

    @property
    def num_slots(self) -> int:
        return int(self.slot_row.numel())


def blur_plan(params: torch.Tensor) -> BlurPlan:
    """From [V, B, NUM_PARAMS] parameters (read on the host: a device sync if they live on a GPU)."""
    sigma = params[..., PARAM_BLUR_SIGMA].detach().to("cpu", torch.float32).reshape(-1)
    blurred = sigma > 0
    slot_row = torch.nonzero(blurred).flatten().to(torch.int32)
    slot_of = torch.full((sigma.numel(),), -1, dtype=torch.int32)
    slot_of[slot_row.long()] = torch.arange(slot_row.numel(), dtype=torch.int32)
    s = sigma[slot_row.long()]
    radius = reference.blur_radius(float(s.max())) if s.numel() else 0
    return BlurPlan(slot_of, slot_row, reference.gaussian_taps(s, radius))


def blur_plan_from_sigmas(sigmas) -> BlurPlan:
    """The plan from [V, B] blur sigmas given as NumPy / Python numbers (0 = no blur), made without
    reading any tensor: where the parameters are drawn on the CPU, so the step itself reads nothing."""
    sigma = np.asarray(sigmas, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(sigma)) or sigma.min(initial=0.0) < 0 or sigma.max(initial=0.0) > MAX_BLUR_SIGMA:
        raise ValueError(f"sigmas: blur sigmas must be finite and within [0, {MAX_BLUR_SIGMA}]")
    slot_row = np.flatnonzero(sigma > 0).astype(np.int32)
    slot_of = np.full(sigma.size, -1, dtype=np.int32)
    slot_of[slot_row] = np.arange(slot_row.size, dtype=np.int32)
    s = sigma[slot_row]
    radius = reference.blur_radius(float(s.max())) if s.size else 0
    return BlurPlan(torch.from_numpy(slot_of), torch.from_numpy(slot_row),
                    reference.gaussian_taps(torch.from_numpy(s), radius))


def _check_plan(plan: object, views: int, batch: int) -> BlurPlan:
    """Shape-only (a plan is vouched for: `blur_plan_from_sigmas` or `blur_plan` made it)."""
    if not isinstance(plan, BlurPlan):
        raise TypeError(f"plan: expected a BlurPlan (blur_plan_from_sigmas), got {type(plan).__name__}")
    if plan.slot_of.dtype != torch.int32 or tuple(plan.slot_of.shape) != (views * batch,):
        raise ValueError(f"plan: slot_of must be int32 [{views * batch}] (one entry per view and image), "
                         f"got {plan.slot_of.dtype} {tuple(plan.slot_of.shape)}")
    if plan.slot_of.device.type != "cpu" or plan.taps.device.type != "cpu":
        raise ValueError("plan: must be on the CPU (it is a host-side plan)")
    if plan.taps.dim() != 2 or plan.taps.shape[0] != plan.slot_row.numel() or plan.taps.shape[1] % 2 != 1 \
            or plan.taps.dtype != torch.float32:
        raise ValueError(f"plan: taps must be float32 [slots, 2R + 1], got {plan.taps.dtype} {tuple(plan.taps.shape)}")
    return plan


PHOTOMETRIC = Op("photometric", {
    "reference": Support(), "triton": Support(),
    "native": Support(devices=("cpu",), hint="the triton backend covers CUDA tensors"),
}, dtype_arg="images")


@PHOTOMETRIC.implementation("reference")
def _reference(images, params, mean, std, out_dtype, plan):
    # No plan: the reference blurs each image by its own sigma.
    return reference.photometric_views(images, params.to(images.device), mean, std, out_dtype)


@PHOTOMETRIC.implementation("triton")
def _triton(images, params, mean, std, out_dtype, plan):
    from . import triton_kernels  # imported on first use: `import iwm_kernels` never needs triton

    plan = blur_plan(params) if plan is None else plan
    return triton_kernels.photometric_views(images, params.to(images.device), plan, mean, std, out_dtype)


@PHOTOMETRIC.implementation("native")
def _native(images, params, mean, std, out_dtype, plan):
    from . import native

    plan = blur_plan(params) if plan is None else plan
    return native.photometric_views(images, params, plan, mean, std, out_dtype)


def run_backend(backend: str, images: torch.Tensor, params: torch.Tensor, mean: Sequence[float],
                std: Sequence[float], out_dtype: torch.dtype, plan: Optional[BlurPlan] = None) -> torch.Tensor:
    """Validated images [B, 3, H, W], params [V, B, NUM_PARAMS] -> [V, B, 3, H, W] (benchmarks call this).
    plan: the blur plan when made beforehand (None: from the parameters, a host read of their sigmas)."""
    return PHOTOMETRIC.impl(backend)(images, params, mean, std, out_dtype, plan)


@torch.library.custom_op("iwm::photometric", mutates_args=(), device_types=None)
def _photometric_op(images: torch.Tensor, params: torch.Tensor, mean: list[float], std: list[float],
                    out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    with torch.no_grad():
        return run_backend(backend, images, params, mean, std, out_dtype)


@_photometric_op.register_fake
def _(images, params, mean, std, out_dtype, backend):
    return images.new_empty((params.shape[0], images.shape[0], 3, images.shape[2], images.shape[3]),
                            dtype=out_dtype)


def _views(images, tables, names, mean, std, out_dtype, backend, plan=None, check_values=True) -> torch.Tensor:
    check_image_batch(images, "images")
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
    batch = images.shape[0]
    for t, name in zip(tables, names):
        check_param_table(t, name, rows=batch, columns=PARAM_COLUMNS, device=images.device,
                          check_values=check_values)
    if plan is not None:
        _check_plan(plan, len(tables), batch)
    for t, name in zip(tables[1:], names[1:]):
        check_same_device(name, t, names[0], tables[0])
    mean = check_channel_values(mean, "mean")
    std = check_channel_values(std, "std", positive=True)
    check_dtype_choice(out_dtype, "out_dtype", OUTPUT_DTYPES)
    chosen = resolve_backend(backend, images.device, PHOTOMETRIC.name)
    params = torch.stack([t.detach() for t in tables]) if len(tables) > 1 else tables[0].detach().unsqueeze(0)
    if torch.compiler.is_compiling():
        return _photometric_op(images, params, mean, std, out_dtype, chosen)
    # Eager: skip the custom-op wrapper (no tracing to serve).
    with torch.no_grad():
        return run_backend(chosen, images, params, mean, std, out_dtype, plan)


def photometric(images: torch.Tensor, params: torch.Tensor, *, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD, out_dtype: torch.dtype = torch.float32,
                backend: Optional[str] = None, plan: Optional[BlurPlan] = None,
                check_values: bool = True) -> torch.Tensor:
    """One augmented, normalised view of each image.

    images: contiguous [B, 3, H, W], uint8 (0..255) or float32/bf16/fp16 in [0, 1].
    params: float32 [B, NUM_PARAMS] (layout in this module's docstring; `pack_params` builds one), on the
        images' device or on the CPU. CPU tables are range-checked (finite, hue in [-0.5, 0.5], flags 0/1,
        0 <= sigma <= 256); device tables are not (that would cost a sync).
    mean, std: per-channel normalisation; the output is (x - mean) / std.
    out_dtype: float32, bfloat16 or float16 (arithmetic is fp32, rounded once).
    backend: "reference" | "triton" | "native"; default from IWM_KERNELS_BACKEND, else automatic.
    plan: the blur plan made beforehand (`blur_plan_from_sigmas` of this table's sigma column, shape
        [1, B]); None makes it from the table (a host read of the sigmas, a device sync for a GPU table).
        The plan decides which images blur and how; it must match the table.
    check_values: False skips the CPU table's range checks for parameters validated where they were
        made (e.g. iwm.augment.sample_view_params); shapes and dtypes are still checked.
    """
    return _views(images, (params,), ("params",), mean, std, out_dtype, backend, plan, check_values)[0]


def photometric_two_view(images: torch.Tensor, source_params: torch.Tensor, target_params: torch.Tensor, *,
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         out_dtype: torch.dtype = torch.float32, backend: Optional[str] = None,
                         plan: Optional[BlurPlan] = None, check_values: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of each image from one read of the images: (source, target), each [B, 3, H, W].

    Same arguments as `photometric`, with one parameter table per view. Any column may be set in either
    table (IWM's target view only uses the jitter columns). plan: from [2, B] sigmas (source row, then
    target row)."""
    out = _views(images, (source_params, target_params), ("source_params", "target_params"), mean, std,
                 out_dtype, backend, plan, check_values)
    return out[0], out[1]

"""IWM's two views and the action between them (docs/design.md, "What one training step computes").

From each image: one random resized crop + horizontal flip, shared by both views (drawn and applied
where the image is loaded, iwm.geometry, and reported with the batch); then
  target view y:  colour jitter only (p = jitter_p, each view independent);
  source view x:  its own colour jitter, then grayscale (p = grayscale_p), Gaussian blur
                  (p = blur_p, sigma ~ U[blur_sigma]) and solarisation (p = solarize_p), source only.
Jitter order is fixed: brightness -> contrast -> saturation -> hue, so the parameters fully determine the
transform. The transforms are torchvision's formulas, batched, defined once in
`iwm_kernels.photometric.reference`; `make_views` renders both views with the fused
`iwm_kernels.photometric_two_view` (backend selectable), which reads each image once.

Action vector a(x -> y), `ACTION_DIM = 7` numbers per sample (`ACTION_LAYOUT`):
  [0] brightness_t - brightness_s   [1] contrast_t - contrast_s   [2] saturation_t - saturation_s
  [3] hue_t - hue_s                 [4] grayscale_s (0/1)         [5] blur_s (0/1)   [6] solarise_s (0/1)
An un-applied jitter counts as the identity factors (1, 1, 1, 0), so identical views give the zero action
and the zero action means "no change".

The crop and flip are not part of the action: both views share them (the paper's source and target
are views of the same crop), so a(x -> y) is the photometric difference only.

Geometry: `ViewParams.crop` holds the crop as fractions of the source image (top, left, height, width),
the box `iwm.geometry.random_resized_box` drew (torchvision's RandomResizedCrop rule) in the source's
pixels; the training step takes it, and the flip, from the loader's batch (`ViewParams.with_geometry`).
For images not yet cropped (`make_views`, `apply_view`), the crop is rendered on the images' device as two per-sample resampling matrices, out = Wy @ image @ Wx^T, whose rows
are the antialiased triangle filter that torchvision/PIL use for bilinear resizing (support widened by
the downscale factor, weights renormalised inside the crop), so an identity crop is exact, a full-image
crop equals `F.interpolate(..., "bilinear", antialias=True)`, and a flip is the reversed Wx. Unlike
`grid_sample`, downscaling does not alias; the cost is two batched matmuls.

Determinism: the photometric parameters of a step are drawn for the global batch, in a fixed order, from
the CPU generator of (seed, step) (`generator_for_step`, iwm.rng) and sliced per rank; the crop and flip
of a sample come from its own (seed, step, index) stream (iwm.geometry). So the views of a step are the
same on any device, rank or resume, and N processes render what one process would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Optional

import numpy as np
import torch

from iwm_kernels import photometric_two_view
from iwm_kernels._validate import check_image_batch
from iwm_kernels.photometric import IMAGENET_MEAN, IMAGENET_STD, blur_plan_from_sigmas, pack_params
from iwm_kernels.photometric import photometric as photometric_view
from iwm_kernels.photometric.reference import to_float_image

from . import rng
from .augment_settings import AugmentSettings, check_pair
from .geometry import Geometry, crop_fractions, crop_generator, sample_geometry

ACTION_DIM = 7
ACTION_LAYOUT = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize")
IDENTITY_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors; hue shift

__all__ = ["ACTION_DIM", "ACTION_LAYOUT", "AugmentConfig", "AugmentSettings", "Geometry", "ViewParams", "Views",
           "action_from_params", "apply_view", "batch_view_params", "crop_resize_flip", "generator_for_step", "make_views",
           "render_views", "sample_view_params"]


@dataclass
class AugmentConfig(AugmentSettings):
    """The settings of `AugmentSettings` (the config's `augment` section, with its bounds) plus what a run
    derives from elsewhere: the output size and crop scale (`data.crop_size`, `data.crop_scale`), the
    normalisation and the output dtype. Checked at construction (`dataclasses.replace` checks again)."""
    out_size: int = 224
    crop_scale: tuple = (0.3, 1.0)           # area fraction of the random resized crop
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    out_dtype: torch.dtype = torch.float32   # dtype of the rendered views

    def check(self) -> None:
        super().check()
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int) or self.out_size < 1:
            raise ValueError(f"out_size: must be a positive int, got {self.out_size!r}")
        check_pair("crop_scale", self.crop_scale, 0.0, 1.0, low_open=True)
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(tuple(v)) != 3 or not all(math.isfinite(float(x)) for x in v):
                raise ValueError(f"{name}: expected 3 finite numbers, got {v!r}")
        if not all(float(x) > 0 for x in self.std):
            raise ValueError(f"std: values must be positive, got {self.std!r}")
        if self.out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype: expected float32, bfloat16 or float16, got {self.out_dtype!r}")


@dataclass
class ViewParams:
    """Per-sample parameters of both views (tensors with the batch first; see the module docstring)."""
    crop: torch.Tensor                   # float32 [B, 4]: top, left, height, width as fractions of the image
    flip: torch.Tensor                   # bool [B]
    source_jitter: torch.Tensor          # float32 [B, 4]: brightness, contrast, saturation, hue (effective)
    target_jitter: torch.Tensor          # float32 [B, 4]; (1, 1, 1, 0) where the jitter was not applied
    source_jitter_applied: torch.Tensor  # bool [B]
    target_jitter_applied: torch.Tensor  # bool [B]
    grayscale: torch.Tensor              # bool [B] (source)
    blur: torch.Tensor                   # bool [B] (source)
    blur_sigma: torch.Tensor             # float32 [B]: the sigma drawn (used where blur is set)
    solarize: torch.Tensor               # bool [B] (source)
    solarize_threshold: float = 0.5
    out_size: int = 224
    # Set where the values are made: True when the photometric values were drawn inside a checked
    # AugmentConfig's ranges (sample_view_params), so rendering skips the range checks; source_blur holds the source view's
    # effective blur sigmas as Python floats (0 = no blur), so the blur plan needs no tensor read.
    validated: bool = False
    source_blur: Optional[tuple] = None

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def _tensor_fields(self):
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device, non_blocking: bool = False) -> "ViewParams":
        return replace(self, **{n: getattr(self, n).to(device, non_blocking=non_blocking)
                                for n in self._tensor_fields()})

    def slice(self, lo: int, hi: int) -> "ViewParams":
        """Samples lo..hi-1 (e.g. one rank's share of a global batch's parameters)."""
        blur = self.source_blur[lo:hi] if self.source_blur is not None else None
        return replace(self, source_blur=blur, **{n: getattr(self, n)[lo:hi] for n in self._tensor_fields()})

    def with_geometry(self, geometry: Geometry) -> "ViewParams":
        """These parameters with the crop and flip that were applied to the images (a loader batch's
        `Geometry`). Validated geometry is taken as is: no value is read (the training step's case)."""
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry: expected an iwm.geometry.Geometry, got {type(geometry).__name__}")
        if len(geometry) != len(self):
            raise ValueError(f"geometry: the crops of {len(geometry)} images, but parameters for {len(self)}")
        geometry = geometry.check()
        return replace(self, crop=geometry.crop, flip=geometry.flip)

    def index(self, idx: torch.Tensor) -> "ViewParams":
        """The samples at idx (e.g. K candidates repeated per image)."""
        return replace(self, source_blur=None, **{n: getattr(self, n)[idx.to(getattr(self, n).device)]
                                                  for n in self._tensor_fields()})

    @staticmethod
    def identity(batch: int, out_size: int = 224, device=None, solarize_threshold: float = 0.5) -> "ViewParams":
        """Both views equal to the (full-image, unflipped) crop: zero action, no photometric change."""
        jit = torch.tensor(IDENTITY_JITTER, device=device).repeat(batch, 1)
        no = torch.zeros(batch, dtype=torch.bool, device=device)
        return ViewParams(crop=torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).repeat(batch, 1), flip=no.clone(),
                          source_jitter=jit, target_jitter=jit.clone(), source_jitter_applied=no.clone(),
                          target_jitter_applied=no.clone(), grayscale=no.clone(), blur=no.clone(),
                          blur_sigma=torch.zeros(batch, device=device), solarize=no.clone(),
                          solarize_threshold=solarize_threshold, out_size=out_size, source_blur=(0.0,) * batch)

    def photometric_params(self, which: str = "source") -> torch.Tensor:
        """The packed [B, NUM_PARAMS] table of one view for `iwm_kernels.photometric` (same device)."""
        if which not in ("source", "target"):
            raise ValueError(f"which: expected 'source' or 'target', got {which!r}")
        j = self.source_jitter if which == "source" else self.target_jitter
        common = dict(brightness=j[:, 0], contrast=j[:, 1], saturation=j[:, 2], hue=j[:, 3],
                      solarize_threshold=self.solarize_threshold, device=j.device)
        if which == "target":
            return pack_params(len(self), **common)
        sigma = torch.where(self.blur, self.blur_sigma.to(torch.float32), torch.zeros_like(self.blur_sigma))
        return pack_params(len(self), grayscale=self.grayscale.float(), blur_sigma=sigma,
                           solarize=self.solarize.float(), **common)


class Views(NamedTuple):
    source: torch.Tensor   # [B, 3, S, S] normalised, cfg.out_dtype, images' device
    target: torch.Tensor   # [B, 3, S, S]
    action: torch.Tensor   # float32 [B, ACTION_DIM], images' device
    params: ViewParams     # what was drawn (CPU tensors)


def generator_for_step(seed: int, step: int) -> torch.Generator:
    """The CPU generator of a step's photometric view parameters (depends only on (seed, step))."""
    return rng.generator(rng.VIEWS, seed, step)


def _uniform(n, lo, hi, gen, shape=()) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)


def _sample_jitter(batch: int, cfg: AugmentConfig, gen) -> tuple[torch.Tensor, torch.Tensor]:
    applied = torch.rand(batch, generator=gen) < cfg.jitter_p
    u = torch.rand(batch, 4, generator=gen)
    lo = torch.tensor([max(0.0, 1 - cfg.brightness), max(0.0, 1 - cfg.contrast), max(0.0, 1 - cfg.saturation),
                       -cfg.hue])
    hi = torch.tensor([1 + cfg.brightness, 1 + cfg.contrast, 1 + cfg.saturation, cfg.hue])
    factors = lo + (hi - lo) * u
    identity = torch.tensor(IDENTITY_JITTER).expand_as(factors)
    return torch.where(applied[:, None], factors, identity).to(torch.float32), applied


def sample_view_params(batch_size: int, cfg: AugmentConfig, generator: Optional[torch.Generator] = None
                       ) -> ViewParams:
    """Draw both views' photometric parameters for a batch, on the CPU, in a fixed order (target jitter,
    source jitter, grayscale, blur, sigma, solarise). The crop is the whole image, unflipped: the crop
    and flip are drawn where the images are loaded (iwm.geometry) and added with `with_geometry`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size: must be an int >= 0, got {batch_size!r}")
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"cfg: expected an AugmentConfig, got {type(cfg).__name__}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    b = batch_size
    target_jitter, target_applied = _sample_jitter(b, cfg, gen)
    source_jitter, source_applied = _sample_jitter(b, cfg, gen)
    gray = torch.rand(b, generator=gen) < cfg.grayscale_p
    blur = torch.rand(b, generator=gen) < cfg.blur_p
    sigma = _uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], gen).to(torch.float32)
    sol = torch.rand(b, generator=gen) < cfg.solarize_p
    # Every value is drawn inside cfg's ranges, which AugmentConfig checked: valid by construction, so
    # the step renders them unchecked. The blur sigmas go to Python here (a CPU array, no device).
    source_blur = tuple(float(v) for v in np.where(blur.numpy(), sigma.numpy(), np.float32(0.0)))
    return ViewParams(crop=torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(b, 1), flip=torch.zeros(b, dtype=torch.bool),
                      source_jitter=source_jitter, target_jitter=target_jitter,
                      source_jitter_applied=source_applied, target_jitter_applied=target_applied, grayscale=gray,
                      blur=blur, blur_sigma=sigma, solarize=sol, solarize_threshold=float(cfg.solarize_threshold),
                      out_size=cfg.out_size, validated=True, source_blur=source_blur)


def batch_view_params(cfg: AugmentConfig, *, seed: int, step: int, global_batch: int, start: int, count: int,
                      geometry: Optional[Geometry] = None) -> ViewParams:
    """The view parameters of samples start..start+count-1 of the global batch of `step`: the photometric
    ones drawn for the whole global batch from (seed, step) and sliced (so each rank of N gets what one
    process would), the crop and flip `geometry`'s (those the loader applied; None: the whole image)."""
    if not (isinstance(start, int) and isinstance(count, int) and 0 <= start and start + count <= global_batch):
        raise ValueError(f"start, count: samples {start}..{start}+{count} are not inside a global batch of "
                         f"{global_batch}")
    params = sample_view_params(global_batch, cfg, generator_for_step(seed, step)).slice(start, start + count)
    return params if geometry is None else params.with_geometry(geometry)


def action_from_params(params: ViewParams) -> torch.Tensor:
    """a(x -> y): float32 [B, ACTION_DIM] (layout in ACTION_LAYOUT), on the parameters' device."""
    diff = params.target_jitter.to(torch.float32) - params.source_jitter.to(torch.float32)
    flags = torch.stack((params.grayscale, params.blur, params.solarize), dim=1).to(torch.float32)
    return torch.cat((diff, flags), dim=1)


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """[B, n_out, n_in]: row i holds the weights of output pixel i over input pixels, for the span
    [start, start + length) (pixels) resized to n_out: antialiased triangle filter, renormalised inside
    the span (torchvision's bilinear with antialias=True on the cropped image)."""
    scale = (length / n_out).reshape(-1, 1, 1)
    support = scale.clamp(min=1.0)
    out_idx = torch.arange(n_out, device=start.device, dtype=torch.float32).reshape(1, -1, 1)
    centre = start.reshape(-1, 1, 1) + (out_idx + 0.5) * scale
    pix = torch.arange(n_in, device=start.device, dtype=torch.float32).reshape(1, 1, -1) + 0.5  # pixel centres
    w = (1.0 - ((pix - centre) / support).abs()).clamp(min=0.0)
    inside = (pix > start.reshape(-1, 1, 1)) & (pix < (start + length).reshape(-1, 1, 1))
    w = w * inside
    return w / w.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def crop_resize_flip(images: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, out_size: int) -> torch.Tensor:
    """Shared geometry of both views: crop (fractions, [B, 4]) -> resize to out_size^2 -> optional flip.
    images: uint8 or float [B, 3, H, W] -> float32 [B, 3, out_size, out_size] in the images' range / 255."""
    x = to_float_image(images)
    b, _, h, w = x.shape
    crop = crop.to(device=x.device, dtype=torch.float32)
    flip = flip.to(device=x.device)
    wy = _resample_matrix(crop[:, 0] * h, crop[:, 2] * h, h, out_size)  # [B, S, H]
    wx = _resample_matrix(crop[:, 1] * w, crop[:, 3] * w, w, out_size)  # [B, S, W]
    wx = torch.where(flip.reshape(-1, 1, 1), wx.flip(1), wx)
    return torch.matmul(torch.matmul(wy.unsqueeze(1), x), wx.transpose(1, 2).unsqueeze(1))


def _prepare(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        images = images.contiguous()
    return check_image_batch(images, name)


def _check_params(params: ViewParams, batch: int) -> None:
    if not isinstance(params, ViewParams):
        raise TypeError(f"params: expected ViewParams, got {type(params).__name__}")
    if len(params) != batch:
        raise ValueError(f"params: parameters for {len(params)} samples, but images has {batch}")


def apply_view(images: torch.Tensor, params: ViewParams, which: str = "source", *,
               cfg: Optional[AugmentConfig] = None, geometry: bool = True, backend: Optional[str] = None
               ) -> torch.Tensor:
    """Render one view from explicit parameters (e.g. K candidate target views for the MRR evaluation).

    which: "source" (jitter, grayscale, blur, solarise) or "target" (jitter only).
    cfg: normalisation and output dtype (default AugmentConfig()); the output size is params.out_size.
    geometry: apply params' crop and flip (False: the images are already cropped).
    """
    images = _prepare(images)
    _check_params(params, images.shape[0])
    cfg = cfg if cfg is not None else AugmentConfig()
    x = crop_resize_flip(images, params.crop, params.flip, params.out_size) if geometry else images
    table = params.to("cpu").photometric_params(which)
    return photometric_view(x, table, mean=cfg.mean, std=cfg.std, out_dtype=cfg.out_dtype, backend=backend)


def render_views(images: torch.Tensor, params: ViewParams, cfg: AugmentConfig, *, backend: Optional[str] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) photometric views of images that are already cropped and flipped (as iwm.data's
    loader workers deliver them): the fused two-view kernel only; params' crop/flip are not applied."""
    images = _prepare(images)
    _check_params(params, images.shape[0])
    cpu = params.to("cpu")
    plan, vouched = None, params.validated and params.source_blur is not None
    if vouched:  # made by sample_view_params: no range checks, and a blur plan from Python numbers
        plan = blur_plan_from_sigmas([params.source_blur, (0.0,) * len(params)])
    return photometric_two_view(images, cpu.photometric_params("source"), cpu.photometric_params("target"),
                                mean=cfg.mean, std=cfg.std, out_dtype=cfg.out_dtype, backend=backend,
                                plan=plan, check_values=not vouched)


def make_views(images: torch.Tensor, cfg: AugmentConfig, *, seed: int, step: int,
               backend: Optional[str] = None) -> Views:
    """Both views of a batch of uncropped images and the action between them, deterministic given (seed,
    step): sample i's crop and flip as a loader worker would draw them for index i, the photometric
    parameters as the training step draws them for a global batch of B.

    images: uint8 [B, 3, H, W] (or float in [0, 1]) on any device; the work runs there.
    backend: the photometric kernel's backend (reference | triton | native; default automatic).
    """
    if not isinstance(cfg, AugmentConfig):
        raise TypeError(f"cfg: expected an AugmentConfig, got {type(cfg).__name__}")
    images = _prepare(images)
    b, _, h, w = images.shape
    # Sample i's crop and flip from its (seed, step, i) stream, by the sampler the loader workers use.
    drawn = [sample_geometry(h, w, crop_generator(seed, step, i), scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                             flip_p=cfg.flip_p) for i in range(b)]
    geometry = Geometry.from_samples([crop_fractions(box, h, w) for box, _ in drawn], [f for _, f in drawn])
    params = sample_view_params(b, cfg, generator_for_step(seed, step)).with_geometry(geometry)
    x = crop_resize_flip(images, params.crop, params.flip, cfg.out_size)
    source, target = photometric_two_view(x, params.photometric_params("source"), params.photometric_params("target"),
                                          mean=cfg.mean, std=cfg.std, out_dtype=cfg.out_dtype, backend=backend)
    action = action_from_params(params).to(images.device, non_blocking=True)
    return Views(source, target, action, params)


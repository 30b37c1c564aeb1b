"""Reference photometric transforms: the per-transform chain, one full-tensor pass per transform.

This module is THE definition of the photometric augmentation (iwm.augment calls these functions; the
Triton and native kernels are tested against them). Every function is batched: per-sample factors are
1-D tensors of length B, and each transform follows the formula torchvision documents for one image:

  brightness f   blend with black:                      clamp(f * x, 0, 1)
  contrast f     blend with the mean of the gray image:  clamp(f * x + (1 - f) * mean(gray(x)), 0, 1)
  saturation f   blend with the gray image:              clamp(f * x + (1 - f) * gray(x), 0, 1)
  hue h          RGB -> HSV, H <- (H + h) mod 1, HSV -> RGB    (h in [-0.5, 0.5]; 0 leaves x untouched)
  grayscale      gray(x) = 0.299 R + 0.587 G + 0.114 B (ITU-R 601-2), replicated to 3 channels
  blur sigma     separable Gaussian, taps exp(-j^2 / 2 sigma^2) for |j| <= ceil(3 sigma), normalised,
                 reflect padding (sigma 0 leaves x untouched)
  solarise t     x >= t  ->  1 - x

Images are float in [0, 1] (uint8 input is multiplied by 1/255 first). Divisions by constants are written
as multiplications by the fp32 reciprocal, as torchvision's v2 code does (and as ATen does for a scalar
divisor anyway), so the kernels can repeat the exact same roundings. The chain order is fixed:
brightness -> contrast -> saturation -> hue -> grayscale -> blur -> solarise -> normalise, and identity
parameters (1, 1, 1, 0, no grayscale, sigma 0, no solarise) leave the image bit-for-bit unchanged.

NaN pixels propagate, as in every torch op used here (torch.clamp keeps a NaN) and so in torchvision: a NaN
after brightness (a NaN pixel, or 0 * inf) makes the image's contrast mean NaN, and (1 - f) * mean then
turns the whole image NaN, even at f = 1. The kernels do exactly this rather than clamp NaN to 0, so corrupt
data shows up in the loss instead of training silently on black pixels. +-inf pixels are clamped like any
other out-of-range value.

Packed parameters (`[B, NUM_PARAMS]` float32, one row per image, layout in `iwm_kernels.photometric`):
see PARAM_* below.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Column of each parameter in the packed [B, NUM_PARAMS] tensor, in chain order.
PARAM_BRIGHTNESS = 0   # brightness factor (1 = identity)
PARAM_CONTRAST = 1     # contrast factor (1 = identity)
PARAM_SATURATION = 2   # saturation factor (1 = identity)
PARAM_HUE = 3          # hue shift in [-0.5, 0.5] (0 = identity)
PARAM_GRAYSCALE = 4    # 1: convert to grayscale, 0: keep colour
PARAM_BLUR_SIGMA = 5   # Gaussian blur sigma in output pixels (0 = no blur)
PARAM_SOLARIZE = 6     # 1: solarise, 0: do not
PARAM_SOLARIZE_THRESHOLD = 7  # solarise pixels >= this value (images in [0, 1])
NUM_PARAMS = 8
IDENTITY_PARAMS = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5)

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1] on x's device, float32."""
    return v.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1, 1)


def to_float_image(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float images are taken as already in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32) * (1.0 / 255.0)
    return images.to(torch.float32)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: 0.299 R + 0.587 G + 0.114 B."""
    r, g, b = x.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    # torchvision's _blend: ratio * img1 + (1 - ratio) * img2, clamped to the image range.
    f = _per_sample(factor, x)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: clamp(f * x). f = 0 gives black, 1 the image."""
    return _blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean gray value. f = 0 gives a constant image."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image. f = 0 gives the gray image."""
    return _blend(x, rgb_to_grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB in [0, 1] -> HSV with H in [0, 1) (torchvision's formulas)."""
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    eqc = maxc == minc  # gray pixel: hue undefined, taken as 0
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h * (1.0 / 6.0) + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of rgb_to_hsv (six sectors of the hue circle)."""
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0)  # h == 1.0 (after wrap-around rounding) is sector 0
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # (R, G, B) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    sector = [i == k for k in range(6)]

    def pick(vals):
        out = vals[5]
        for k in range(4, -1, -1):
            out = torch.where(sector[k], vals[k], out)
        return out

    r = pick((v, q, p, p, t, v))
    g = pick((t, v, v, q, p, p))
    b = pick((p, p, t, v, v, q))
    return torch.stack((r, g, b), dim=-3)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]), wrapping around. Shift 0 leaves x untouched
    (the HSV round trip is not bit-exact, so it is skipped)."""
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    sh = shift.to(device=x.device, dtype=torch.float32).reshape(-1, 1, 1)
    h = torch.remainder(h + sh, 1.0)
    out = hsv_to_rgb(torch.stack((h, s, v), dim=-3))
    return torch.where(_per_sample(shift, x) != 0, out, x)


def grayscale(x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """Where flag is set: the gray image replicated to 3 channels."""
    gray = rgb_to_grayscale(x).expand_as(x)
    return torch.where(_per_sample(flag, x) != 0, gray, x)


def blur_radius(sigma: float) -> int:
    """Taps on each side of the Gaussian kernel for one sigma: ceil(3 sigma) (0 for sigma <= 0).

    The kernel covers +-3 sigma (99.7 % of the mass); its size is 2 * ceil(3 sigma) + 1, e.g. 13 taps at
    sigma = 2. A window wider than this (a batch's common one) holds zeros beyond it, so the result
    depends on sigma only."""
    if not sigma > 0:
        return 0
    return int(math.ceil(3.0 * sigma))


def gaussian_taps(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """[N] sigmas -> [N, 2 * radius + 1] normalised taps; zero beyond each sigma's own ceil(3 sigma);
    sigma <= 0 gives the identity (a single 1 in the middle)."""
    sigma = sigma.to(torch.float32).reshape(-1, 1)
    j = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device).reshape(1, -1)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    own = torch.ceil(3.0 * safe)
    w = torch.exp(-(j * j) / (2.0 * safe * safe))
    w = torch.where(j.abs() <= own, w, torch.zeros_like(w))
    w = torch.where(sigma > 0, w, (j == 0).to(torch.float32).expand_as(w))
    return w / w.sum(dim=1, keepdim=True)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside [0, n) mirrored at the edges without repeating the edge pixel (torch's "reflect"
    padding), folded as often as needed so any offset lands inside."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    m = torch.remainder(i, period)
    return torch.where(m > n - 1, period - m, m)


def _blur_along(x: torch.Tensor, taps: torch.Tensor, dim: int) -> torch.Tensor:
    """x [n, C, H, W], taps [n, K]: reflect-pad along dim (-1 or -2), then a per-image depthwise conv."""
    n, c = x.shape[0], x.shape[1]
    size, radius = x.shape[dim], (taps.shape[1] - 1) // 2
    padded = x.index_select(dim, reflect_index(torch.arange(-radius, size + radius, device=x.device), size))
    weight = taps.to(x.dtype).repeat_interleave(c, dim=0)
    weight = weight.reshape(n * c, 1, 1, -1) if dim == -1 else weight.reshape(n * c, 1, -1, 1)
    out = F.conv2d(padded.reshape(1, n * c, padded.shape[2], padded.shape[3]), weight, groups=n * c)
    return out.reshape(x.shape)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma; samples with sigma 0 are returned untouched.
    Only the blurred samples are computed (their indices are read on the host)."""
    sigma = sigma.to(device=x.device, dtype=torch.float32)
    sel = torch.nonzero(sigma > 0).flatten()
    if sel.numel() == 0:
        return x
    s = sigma[sel]
    radius = blur_radius(float(s.max()))
    taps = gaussian_taps(s, radius)
    blurred = _blur_along(_blur_along(x[sel], taps, dim=-1), taps, dim=-2)
    out = x.clone()
    out[sel] = blurred
    return out


def solarize(x: torch.Tensor, flag: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Where flag is set: pixels >= threshold become 1 - x."""
    on = (_per_sample(flag, x) != 0) & (x >= _per_sample(threshold, x))
    return torch.where(on, 1.0 - x, x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype) -> torch.Tensor:
    m = torch.tensor(list(mean), dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    return ((x - m) / s).to(out_dtype)


def jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """brightness -> contrast -> saturation -> hue, from packed params [B, NUM_PARAMS]."""
    x = adjust_brightness(x, params[:, PARAM_BRIGHTNESS])
    x = adjust_contrast(x, params[:, PARAM_CONTRAST])
    x = adjust_saturation(x, params[:, PARAM_SATURATION])
    return adjust_hue(x, params[:, PARAM_HUE])


def photometric_unnormalized(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The whole chain up to (not including) normalisation: float32 in [0, 1]."""
    x = to_float_image(images)
    params = params.to(device=x.device, dtype=torch.float32)
    x = jitter(x, params)
    x = grayscale(x, params[:, PARAM_GRAYSCALE])
    x = gaussian_blur(x, params[:, PARAM_BLUR_SIGMA])
    return solarize(x, params[:, PARAM_SOLARIZE], params[:, PARAM_SOLARIZE_THRESHOLD])


def photometric(images: torch.Tensor, params: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One view: [B, 3, H, W] uint8 or float -> normalised [B, 3, H, W] in out_dtype."""
    return normalize(photometric_unnormalized(images, params), mean, std, out_dtype)


def photometric_views(images: torch.Tensor, params: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """params [V, B, NUM_PARAMS] -> [V, B, 3, H, W]: each view through the chain on its own."""
    return torch.stack([photometric(images, p, mean, std, out_dtype) for p in params.unbind(0)])


def pack_params(batch: int, *, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, grayscale=0.0,
                blur_sigma=0.0, solarize=0.0, solarize_threshold=0.5,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """[batch, NUM_PARAMS] float32 from scalars or [batch] tensors (booleans become 0/1)."""
    cols = (brightness, contrast, saturation, hue, grayscale, blur_sigma, solarize, solarize_threshold)
    out = torch.empty(batch, NUM_PARAMS, dtype=torch.float32, device=device)
    for k, v in enumerate(cols):
        out[:, k] = v.to(torch.float32) if isinstance(v, torch.Tensor) else float(v)
    return out

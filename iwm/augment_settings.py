"""The two-view augmentation's settings and their bounds, defined once.

`AugmentSettings` is the config's `augment` section (iwm.config) and the base of
`iwm.augment.AugmentConfig`, which adds what a run derives from elsewhere (the output size and crop
scale from `data.*`, the normalisation and the output dtype). One class, so one set of bounds: the
config reports a bad value as a ConfigError naming `augment.<key>`, the augment API as a ValueError
naming the field. No torch here, so importing iwm.config stays light (loader workers do).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
JITTER_STRENGTHS = ("brightness", "contrast", "saturation")
MAX_HUE = 0.5                  # a hue shift of 0.5 is half the colour wheel: torchvision's bound
MAX_BLUR_SIGMA = 100.0         # output pixels; the kernels accept up to 256 (iwm_kernels.photometric)
CROP_RATIO_RANGE = (1e-3, 1e3)  # width / height; beyond it a crop is a line of pixels


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_pair(name: str, pair, low: float, high: float, low_open: bool = False) -> tuple[float, float]:
    try:
        lo, hi = pair
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (low, high) pair, got {pair!r}") from None
    if not (_number(lo) and _number(hi)):
        raise ValueError(f"{name}: expected two finite numbers, got {pair!r}")
    if not (lo <= hi and (lo > low if low_open else lo >= low) and hi <= high):
        raise ValueError(f"{name}: expected {low} {'<' if low_open else '<='} low <= high <= {high}, got {pair!r}")
    return float(lo), float(hi)


@dataclass
class AugmentSettings:
    """Every probability and range a run can set (defaults: the paper's)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio (width / height) of the random resized crop
    flip_p: float = 0.5
    jitter_p: float = 0.8                     # per view, all four jitter ops together
    brightness: float = 0.4                   # factor ~ U[max(0, 1 - b), 1 + b]
    contrast: float = 0.4                     # factor ~ U[max(0, 1 - c), 1 + c]
    saturation: float = 0.2                   # factor ~ U[max(0, 1 - s), 1 + s]
    hue: float = 0.1                          # shift ~ U[-h, h], h <= 0.5
    grayscale_p: float = 0.2                  # source only
    blur_p: float = 0.2                       # source only
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma ~ U[lo, hi], in output pixels
    solarize_p: float = 0.1                   # source only (the paper's text also says 0.2 once)
    solarize_threshold: float = 0.5           # in [0, 1] units (128 / 255 ~ 0.5 for uint8 images)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first field out of its bounds (the config calls this again after
        it has set its keys one by one)."""
        for name in PROBABILITIES:
            v = getattr(self, name)
            if not (_number(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name}: a probability must be within [0, 1], got {v!r}")
        for name in JITTER_STRENGTHS:
            v = getattr(self, name)
            if not (_number(v) and v >= 0):
                raise ValueError(f"{name}: must be a finite number >= 0, got {v!r}")
        if not (_number(self.hue) and 0.0 <= self.hue <= MAX_HUE):
            raise ValueError(f"hue: must be within [0, {MAX_HUE}], got {self.hue!r}")
        check_pair("crop_ratio", self.crop_ratio, *CROP_RATIO_RANGE)
        check_pair("blur_sigma", self.blur_sigma, 0.0, MAX_BLUR_SIGMA)
        if not (_number(self.solarize_threshold) and 0.0 <= self.solarize_threshold <= 1.0):
            raise ValueError(f"solarize_threshold: must be within [0, 1], got {self.solarize_threshold!r}")

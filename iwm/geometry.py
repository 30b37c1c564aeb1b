"""The geometry both views share: one random resized crop and one horizontal flip per image.

Drawn once, where the image is loaded (iwm.data's loader workers), from the generator of the sample's
(seed, step, index) (`crop_generator`, iwm.rng), and applied there. The batch reports what was applied
as a `Geometry` (crop fractions and flips), which the step puts into its ViewParams (iwm.step), so
`ViewParams.crop` is the crop the pixels went through. The photometric parameters are the step's
(iwm.augment): one stream per quantity.

A crop is a box (top, left, h, w) in whole source pixels, reported as fractions of the image it was cut
from (top / H, left / W, h / H, w / W), checked here in Python where it is made, so the step never reads
the values back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import rng

Box = tuple[int, int, int, int]


def crop_generator(seed: int, step: int, index: int, *extra: int) -> torch.Generator:
    """The stream of one sample's crop and flip: the same in any worker, on any rank, after a resume."""
    return rng.generator(rng.CROP, seed, step, index, *extra)


def random_resized_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                       gen: torch.Generator) -> Box:
    """(top, left, h, w) of a random crop with area fraction in `scale` and aspect (w / h) in `ratio`:
    torchvision's RandomResizedCrop rule, up to 10 tries, then the centre crop with the aspect clamped."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()  # a CPU generator: no device involved
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(u[3] * (width - w + 1))
            return min(top, height - h), min(left, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_geometry(height: int, width: int, gen: torch.Generator, *, scale: Sequence[float],
                    ratio: Sequence[float], flip_p: float) -> tuple[Box, bool]:
    """The crop box (source pixels) and the flip of one image, in this order from `gen`."""
    box = random_resized_box(height, width, scale, ratio, gen)
    return box, flip_p > 0 and bool(torch.rand((), generator=gen) < flip_p)


def crop_fractions(box: Sequence[int], height: int, width: int) -> tuple[float, float, float, float]:
    """The box as fractions of its (height, width) image; ValueError when it does not lie inside it."""
    top, left, h, w = box
    if not (0 <= top and 0 <= left and h >= 1 and w >= 1 and top + h <= height and left + w <= width):
        raise ValueError(f"box: {tuple(box)} does not lie inside a {height}x{width} image")
    return top / height, left / width, h / height, w / width


def _check_fractions(crop: Sequence[float]) -> None:
    eps = 1e-6
    top, left, h, w = crop
    if not (all(math.isfinite(v) for v in crop) and top >= 0 and left >= 0 and h > 0 and w > 0
            and top + h <= 1 + eps and left + w <= 1 + eps):
        raise ValueError(f"crop: expected (top, left, h, w) fractions of the image, got {tuple(crop)}")


@dataclass
class Geometry:
    """The crop and flip that were applied to each image of a batch (CPU tensors).

    validated: the values were checked where they were made (`from_samples`), so nothing reads them again."""
    crop: torch.Tensor  # float32 [B, 4]: top, left, h, w as fractions of the source image
    flip: torch.Tensor  # bool [B]
    validated: bool = False

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    @staticmethod
    def from_samples(crops: Sequence[Sequence[float]], flips: Sequence[bool]) -> "Geometry":
        """From Python numbers (a loader worker's samples), checked here, in Python."""
        if len(crops) != len(flips):
            raise ValueError(f"flips: {len(flips)} flips for {len(crops)} crops")
        for crop in crops:
            if len(crop) != 4:
                raise ValueError(f"crop: expected 4 fractions, got {tuple(crop)}")
            _check_fractions(crop)
        return Geometry(torch.tensor([tuple(c) for c in crops], dtype=torch.float32).reshape(-1, 4),
                        torch.tensor([bool(f) for f in flips], dtype=torch.bool), validated=True)

    def check(self) -> "Geometry":
        """Geometry made elsewhere: shapes, dtypes and values (the values are read: not for the step)."""
        if not (isinstance(self.crop, torch.Tensor) and self.crop.dim() == 2 and self.crop.shape[1] == 4):
            raise ValueError(f"crop: expected a [B, 4] tensor, got {getattr(self.crop, 'shape', self.crop)!r}")
        if not (isinstance(self.flip, torch.Tensor) and self.flip.dtype == torch.bool
                and tuple(self.flip.shape) == (self.crop.shape[0],)):
            raise ValueError(f"flip: expected a bool [{self.crop.shape[0]}] tensor, got "
                             f"{getattr(self.flip, 'shape', self.flip)!r}")
        if not self.validated:
            return Geometry.from_samples(self.crop.detach().cpu().double().tolist(), self.flip.cpu().tolist())
        return self

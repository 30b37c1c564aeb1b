"""Data: the built-in photographs, ImageFolder directories, a resumable batch order, mask collation.

Split of work: DataLoader workers decode, take the shared random resized crop + flip (geometry is
common to both views, so it belongs here, per image, as in every real pipeline) and sample the masks;
the photometric two-view augmentation runs batched on the training device (iwm.augment).

Determinism: every random choice is a function of (seed, step, index) — the crop of sample i in step s
is the same in any worker, on any rank, before or after a resume. The batch order is a per-epoch
permutation from (seed, epoch), so resuming at step s continues exactly where the run stopped.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Real photographs bundled with installed packages (nothing downloads). Grayscale ones are used as RGB.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                   "rocket", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# Held-out regions for the labelled probe: train crops lie in the left part of each photograph,
# validation crops in the right strip, so no validation pixel is ever seen in training.
_TRAIN_FRACTION = 0.7


def _seed_for(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator whose stream depends only on the given integers."""
    return torch.Generator().manual_seed(_seed_for(*parts))


@functools.lru_cache(maxsize=2)
def builtin_photos(max_side: int = 384) -> tuple[tuple[str, torch.Tensor], ...]:
    """(name, uint8 [3, H, W]) for each bundled photograph, shrunk so the longer side is <= max_side."""
    photos = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import skimage.data

        for name in _SKIMAGE_PHOTOS:
            try:
                photos.append((name, np.asarray(getattr(skimage.data, name)())))
            except Exception:  # an image missing from this scikit-image version: use the others
                continue
        try:
            from sklearn.datasets import load_sample_images

            bundle = load_sample_images()
            for fname, img in zip(bundle.filenames, bundle.images):
                if Path(fname).name in _SKLEARN_PHOTOS:
                    photos.append((Path(fname).stem, np.asarray(img)))
        except Exception:
            pass
    if len(photos) < 2:
        raise RuntimeError("data.dataset=builtin: fewer than 2 bundled photographs found "
                           "(pip install scikit-image scikit-learn)")
    out = []
    for name, arr in photos:
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64) / max(1, arr.max()), 0, 1) * 255).astype(np.uint8)
        img = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        scale = max_side / max(img.shape[1:])
        if scale < 1:
            size = (max(8, round(img.shape[1] * scale)), max(8, round(img.shape[2] * scale)))
            img = resize_uint8(img, size)
        out.append((name, img))
    return tuple(out)


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 [3, H, W] image."""
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def random_resized_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                       gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in `scale` and aspect in `ratio`
    (torchvision's RandomResizedCrop rule, with its centre-crop fallback)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
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


def crop_resize_flip(img: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> torch.Tensor:
    top, left, h, w = box
    out = resize_uint8(img[:, top:top + h, left:left + w], (size, size))
    return out.flip(-1) if flip else out


@dataclass
class Sample:
    image: torch.Tensor  # uint8 [3, S, S]
    label: int
    skipped: int = 0     # unreadable files passed over to produce this sample


class BuiltinPhotos(Dataset):
    """Random crops of the bundled photographs; the label is the source photograph.

    split="train": crops from the left 70% of each photograph, random per (seed, step, index) when the
    key is a (step, index) pair (pretraining), fixed per index otherwise (probe training).
    split="val": fixed crops from the held-out right strip.
    """

    def __init__(self, size: int, num_samples: int, *, split: str = "train", seed: int = 0,
                 scale: Sequence[float] = (0.3, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5):
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        self.size, self.num_samples, self.split, self.seed = size, num_samples, split, seed
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), float(flip_p)
        self.photos = builtin_photos()
        self.classes = [name for name, _ in self.photos]

    def __len__(self) -> int:
        return self.num_samples

    def region(self, photo: torch.Tensor) -> torch.Tensor:
        w = photo.shape[2]
        cut = int(w * _TRAIN_FRACTION)
        return photo[:, :, :cut] if self.split == "train" else photo[:, :, cut:]

    def __getitem__(self, key) -> Sample:
        step, index = key if isinstance(key, tuple) else (-1, key)
        label = index % len(self.photos)
        region = self.region(self.photos[label][1])
        gen = generator_for(self.seed, step, index, 0 if self.split == "train" else 1)
        box = random_resized_box(region.shape[1], region.shape[2], self.scale, self.ratio, gen)
        flip = self.flip_p > 0 and bool(torch.rand((), generator=gen) < self.flip_p)
        return Sample(crop_resize_flip(region, box, self.size, flip), label)


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` directories. An unreadable or corrupt file is skipped (the next readable
    one stands in), counted in `Sample.skipped`, and reported by the training loop; never fatal."""

    def __init__(self, root: str | Path, size: int, *, seed: int = 0, scale: Sequence[float] = (0.3, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, random_crops: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.image_folder: {self.root} is not a directory")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"data.image_folder: {self.root} has no class sub-directories")
        self.files: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            for dirpath, _, names in sorted(os.walk(self.root / cls)):
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        self.files.append((Path(dirpath) / name, label))
        if not self.files:
            raise FileNotFoundError(f"data.image_folder: no images under {self.root}")
        self.size, self.seed, self.flip_p, self.random_crops = size, seed, float(flip_p), random_crops
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def decode(path: Path) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, key) -> Sample:
        step, index = key if isinstance(key, tuple) else (-1, key)
        skipped = 0
        for attempt in range(min(len(self.files), 64)):
            path, label = self.files[(index + attempt) % len(self.files)]
            try:
                img = self.decode(path)
                break
            except Exception:
                skipped += 1
        else:
            raise RuntimeError(f"data.image_folder: 64 consecutive unreadable files from {path}")
        gen = generator_for(self.seed, step, index)
        if self.random_crops:
            box = random_resized_box(img.shape[1], img.shape[2], self.scale, self.ratio, gen)
            flip = self.flip_p > 0 and bool(torch.rand((), generator=gen) < self.flip_p)
        else:  # evaluation: the centre crop of the shorter side
            side = min(img.shape[1:])
            box, flip = ((img.shape[1] - side) // 2, (img.shape[2] - side) // 2, side, side), False
        return Sample(crop_resize_flip(img, box, self.size, flip), label, skipped)


class StepBatchSampler(Sampler):
    """Yields this rank's share of each global batch as (step, index) keys, from `start_step` on.

    Epoch e is a permutation from (seed, e); global batch s takes positions [s*G, (s+1)*G) of its epoch
    (the incomplete tail batch is dropped); rank r takes the r-th slice of B = G / world_size keys.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, start_step: int = 0, max_steps: Optional[int] = None):
        self.global_batch = batch_size * world_size
        if dataset_len < self.global_batch:
            raise ValueError(f"data.batch_size: the dataset has {dataset_len} items, fewer than one global batch "
                             f"of {self.global_batch}")
        self.dataset_len, self.batch_size, self.world_size, self.rank = dataset_len, batch_size, world_size, rank
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self.steps_per_epoch = dataset_len // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.dataset_len, generator=generator_for(self.seed, epoch, 7))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        perm, perm_epoch = None, -1
        while self.max_steps is None or step < self.max_steps:
            epoch, pos = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            lo = pos * self.global_batch + self.rank * self.batch_size
            yield [(step, int(i)) for i in perm[lo:lo + self.batch_size]]
            step += 1

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError("StepBatchSampler without max_steps is endless")
        return max(0, self.max_steps - self.start_step)


@dataclass
class Batch:
    step: int
    images: torch.Tensor        # uint8 [B, 3, S, S]
    labels: torch.Tensor        # int64 [B]
    masks: object               # iwm.masks.MaskBatch for this rank's samples (None without a mask fn)
    skipped: int

    def pin_memory(self) -> "Batch":
        self.images = self.images.pin_memory()
        return self


class StepCollator:
    """collate_fn for a DataLoader over `KeyedDataset`: items carry their step."""

    def __init__(self, mask_fn: Optional[Callable[[int], object]] = None):
        self.mask_fn = mask_fn

    def __call__(self, items: list[tuple[int, Sample]]) -> Batch:
        step = items[0][0]
        samples = [s for _, s in items]
        return Batch(step=step,
                     images=torch.stack([s.image for s in samples]),
                     labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
                     masks=self.mask_fn(step) if self.mask_fn is not None else None,
                     skipped=sum(s.skipped for s in samples))


class KeyedDataset(Dataset):
    """Wraps a dataset so that items come back with the step of their (step, index) key."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Sample]:
        return key[0], self.dataset[key]

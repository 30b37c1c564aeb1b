"""Data: the built-in photographs, ImageFolder directories, a resumable batch order, mask collation.

Split of work: DataLoader workers decode, take the shared random resized crop + flip (geometry is
common to both views, so it belongs here, per image, as in every real pipeline; iwm.geometry draws it)
and sample the masks; the batch reports the crops and flips it applied (`Batch.geometry`), which the
step's view parameters carry. The photometric two-view augmentation runs batched on the training
device (iwm.augment).

Determinism: every random choice is a function of (seed, step, index) through iwm.rng — the crop of
sample i in step s is the same in any worker, on any rank, before or after a resume. The batch order is
a per-epoch permutation from (seed, epoch), so resuming at step s continues exactly where the run stopped.
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from . import rng
from .geometry import Box, Geometry, crop_fractions, crop_generator, sample_geometry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# Real photographs bundled with installed packages (nothing downloads). Grayscale ones are used as RGB.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                   "rocket", "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "cell")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# Held-out regions for the labelled probe: train crops lie in the left part of each photograph,
# validation crops in the right strip, so no validation pixel is ever seen in training.
_TRAIN_FRACTION = 0.7


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


def crop_resize_flip(img: torch.Tensor, box: Box, size: int, flip: bool) -> torch.Tensor:
    top, left, h, w = box
    out = resize_uint8(img[:, top:top + h, left:left + w], (size, size))
    return out.flip(-1) if flip else out


@dataclass
class Sample:
    image: torch.Tensor  # uint8 [3, S, S] (zeros while `encoded` waits for the device decode)
    label: int
    # The dataset index of this sample's own file when that file was unreadable (a stand-in was used);
    # -1 otherwise. Files only passed over on the way to a stand-in are not reported here: each file is
    # reported by its own key, so it is counted once per pass over the data (see ImageFolderDataset).
    unreadable: int = -1
    # data.decode=gpu: the JPEG's bytes (uint8 1-D) with its crop (top, left, h, w in source pixels) and
    # flip, decoded on the device by Batch.images_on; None when the worker decoded the image itself.
    encoded: Optional[torch.Tensor] = None
    box: Box = (0, 0, 0, 0)
    flip: bool = False
    # The box as fractions (top, left, h, w) of the image it was cut from: what ViewParams.crop holds
    # (iwm.geometry.crop_fractions, checked there). None from a dataset that does not report its crop.
    crop: Optional[tuple[float, float, float, float]] = None

    @property
    def skipped(self) -> int:
        return int(self.unreadable >= 0)


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
        gen = crop_generator(self.seed, step, index, 0 if self.split == "train" else 1)
        h, w = region.shape[1], region.shape[2]
        box, flip = sample_geometry(h, w, gen, scale=self.scale, ratio=self.ratio, flip_p=self.flip_p)
        return Sample(crop_resize_flip(region, box, self.size, flip), label, box=box, flip=flip,
                      crop=crop_fractions(box, h, w))


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    # The high byte, as Pillow itself reduces 48-bit RGB, 64-bit RGBA and 16-bit LA PNGs: every 16-bit
    # image then decodes alike, within one level of value / 257.
    return (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def image_to_rgb_uint8(im) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image in any mode.

    16-bit grayscale ("I;16*", and "I", which older Pillow versions give 16-bit PNGs) is scaled to
    8 bits; `convert("RGB")` would clip it to 0..255, a nearly white image. Alpha is dropped, not
    composited, as torchvision's and PIL's RGB loaders (and so I-JEPA's pipeline) do; palette images
    go through RGBA so their transparency is read without Pillow's warning. CMYK, YCbCr, 1-bit and
    8-bit gray use Pillow's own conversions (an Adobe-inverted CMYK JPEG is undone by its decoder).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        gray = _sixteen_bit_to_uint8(np.asarray(im))
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_rgb(source) -> torch.Tensor:
    """uint8 [3, H, W] of the whole image at `source` (a path or a file object), any mode."""
    from PIL import Image

    with Image.open(source) as im:
        arr = image_to_rgb_uint8(im)
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def load_and_crop(data: bytes, label: int, size: int, decode: str,
                  geometry: Callable[[int, int], tuple[Box, bool]]) -> Sample:
    """The training sample of one encoded image (a file's or a shard member's bytes).

    geometry(height, width) -> (box, flip) draws the crop from the image's size, which is read from the
    header before anything is decoded, so every `decode` mode (iwm.image_decode.DECODE_MODES) takes
    the same crop. The sample reports what it applied: box, flip and `crop` (the box as fractions).
    Raises when the bytes are unreadable (the caller decides what stands in)."""
    from PIL import Image

    from .image_decode import decode_crop_draft, decode_crop_fast, decode_crop_region, gpu_decodable
    from .jpeg_region import jpeg_header

    if decode == "pil":  # the reference: full decode, crop and resize on a tensor
        img = decode_rgb(io.BytesIO(data))
        height, width = img.shape[1], img.shape[2]
        box, flip = geometry(height, width)
        return Sample(crop_resize_flip(img, box, size, flip), label, box=box, flip=flip,
                      crop=crop_fractions(box, height, width))
    header = jpeg_header(data) if decode == "fast" else None
    if header is not None and header[2] in (1, 3) and header[0] * header[1] <= (Image.MAX_IMAGE_PIXELS or 1 << 62):
        # An RGB / gray JPEG: its size from the frame header, without Pillow; the same crop is drawn.
        width, height = header[:2]
        box, flip = geometry(height, width)
        crop = crop_fractions(box, height, width)
        image = decode_crop_region(data, (width, height), box, size, flip)
        if image is not None:
            return Sample(image, label, box=box, flip=flip, crop=crop)
        with Image.open(io.BytesIO(data)) as im:  # refused by the region decoder: Pillow decides
            if im.size != (width, height):
                raise ValueError(f"JPEG header size {(width, height)} disagrees with Pillow's {im.size}")
            return Sample(decode_crop_fast(im, data, box, size, flip), label, box=box, flip=flip, crop=crop)
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size  # the header's size: nothing decoded yet
        box, flip = geometry(height, width)
        crop = crop_fractions(box, height, width)
        if decode == "gpu" and gpu_decodable(im, data):
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return Sample(torch.zeros(3, size, size, dtype=torch.uint8), label, encoded=encoded, box=box,
                          flip=flip, crop=crop)
        crop_fn = decode_crop_fast if decode == "fast" else decode_crop_draft
        return Sample(crop_fn(im, data, box, size, flip), label, box=box, flip=flip, crop=crop)


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` directories.

    decode: how a file becomes its crop (iwm.image_decode): "draft" (default; a JPEG decoded at the
    reduced DCT scale its crop allows), "pil" (full decode, the reference) or "gpu" (the sample carries
    the JPEG's bytes and crop; `Batch.images_on` decodes them on the device). The crop is drawn from
    the header's size before anything is decoded, so all three take the same crop.

    An unreadable or corrupt file is replaced by the next readable file in order (wrapping around) and
    reported in `Sample.unreadable`; only a folder with no readable image left is fatal.

    Counting: a bad file is reported only by the key whose index is that file, never by the keys that
    pass over it looking for a stand-in. The batch order visits each index at most once per epoch and
    the report depends only on the key, so across workers, ranks and resumes every bad file is counted
    exactly once per pass over the data, with nothing shared between processes.
    """

    def __init__(self, root: str | Path, size: int, *, seed: int = 0, scale: Sequence[float] = (0.3, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5, random_crops: bool = True,
                 decode: str = "draft"):
        from .image_decode import DECODE_MODES

        if decode not in DECODE_MODES:
            raise ValueError(f"decode: expected one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.decode_mode = decode
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
        # Indices found unreadable in this process: only spares re-decoding them (a long run of bad files
        # would otherwise be decoded again for every key that walks over it). The choice of stand-in is
        # the same with or without it, so it needs no sharing between workers.
        self._known_unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    decode = staticmethod(decode_rgb)

    def geometry(self, height: int, width: int, gen: torch.Generator) -> tuple[Box, bool]:
        """The crop box (top, left, h, w) in source pixels and the flip, from the source size alone."""
        if self.random_crops:
            return sample_geometry(height, width, gen, scale=self.scale, ratio=self.ratio, flip_p=self.flip_p)
        side = min(height, width)  # evaluation: the centre crop of the shorter side
        return ((height - side) // 2, (width - side) // 2, side, side), False

    def load(self, file_index: int, gen: torch.Generator) -> Sample:
        """The sample from one file with the crop drawn from `gen`; raises when the file is unreadable."""
        path, label = self.files[file_index]
        return load_and_crop(path.read_bytes(), label, self.size, self.decode_mode,
                             lambda height, width: self.geometry(height, width, gen))

    def __getitem__(self, key) -> Sample:
        """The sample of the first readable file at or after the key's index, wrapping around."""
        step, index = key if isinstance(key, tuple) else (-1, key)
        if not 0 <= index < len(self.files):
            raise IndexError(f"index: {index} is out of range for {len(self.files)} images")
        n = len(self.files)
        first_error = None
        for offset in range(n):
            file_index = (index + offset) % n
            if file_index in self._known_unreadable:
                continue
            try:
                # A fresh generator per attempt: the crop depends on (seed, step, index) and the file
                # that stands in, never on how many bad files were tried first.
                sample = self.load(file_index, crop_generator(self.seed, step, index))
            except Exception as exc:  # any decoder failure means "unreadable": skip it, never crash
                self._known_unreadable.add(file_index)
                first_error = first_error or f"{self.files[file_index][0]}: {type(exc).__name__}: {exc}"
                continue
            sample.unreadable = index if file_index != index else -1
            return sample
        raise RuntimeError(f"data.image_folder: none of the {n} image files under {self.root} can be read "
                           f"(tried all {n}, {n} unreadable" + (f"; e.g. {first_error})" if first_error else ")"))


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
        return torch.randperm(self.dataset_len, generator=rng.generator(rng.ORDER, self.seed, epoch))

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
    skipped: int                # unreadable files reported by this batch's keys (each once per epoch)
    unreadable_files: tuple[int, ...] = ()  # their dataset indices, sorted (for a run-wide distinct set)
    # data.decode=gpu: per sample the JPEG bytes still to decode (None where the worker decoded), the
    # crop boxes int64 [B, 4] (top, left, h, w in source pixels) and flips bool [B]; empty otherwise.
    encoded: tuple[Optional[torch.Tensor], ...] = ()
    boxes: Optional[torch.Tensor] = None
    flips: Optional[torch.Tensor] = None
    # The crop and flip each image went through (checked in the worker), for the step's ViewParams;
    # None when the dataset does not report its crops.
    geometry: Optional[Geometry] = None

    def pin_memory(self) -> "Batch":
        self.images = self.images.pin_memory()
        return self

    def images_on(self, device: torch.device) -> torch.Tensor:
        """The uint8 [B, 3, S, S] images on `device`, the encoded ones decoded there (nvJPEG on CUDA; Pillow
        on the CPU, which the tests use). Images nothing could decode are counted in `skipped`."""
        images = self.images.to(device, non_blocking=True)
        if any(e is not None for e in self.encoded):
            from .image_decode import decode_encoded_on_cpu, decode_on_device

            decode = decode_on_device if images.device.type == "cuda" else decode_encoded_on_cpu
            self.skipped += decode(images, self.encoded, self.boxes, self.flips)
        return images


class StepCollator:
    """collate_fn for a DataLoader over `KeyedDataset`: items carry their step."""

    def __init__(self, mask_fn: Optional[Callable[[int], object]] = None):
        self.mask_fn = mask_fn

    def __call__(self, items: list[tuple[int, Sample]]) -> Batch:
        step = items[0][0]
        samples = [s for _, s in items]
        unreadable = tuple(sorted({s.unreadable for s in samples if s.unreadable >= 0}))
        encoded = tuple(s.encoded for s in samples) if any(s.encoded is not None for s in samples) else ()
        reported = all(s.crop is not None for s in samples)
        geometry = Geometry.from_samples([s.crop for s in samples], [s.flip for s in samples]) if reported else None
        return Batch(step=step,
                     images=torch.stack([s.image for s in samples]),
                     labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
                     masks=self.mask_fn(step) if self.mask_fn is not None else None,
                     skipped=len(unreadable), unreadable_files=unreadable, encoded=encoded,
                     boxes=torch.tensor([s.box for s in samples], dtype=torch.int64) if encoded else None,
                     flips=torch.tensor([s.flip for s in samples], dtype=torch.bool) if encoded else None,
                     geometry=geometry)


class KeyedDataset(Dataset):
    """Wraps a dataset so that items come back with the step of their (step, index) key."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Sample]:
        return key[0], self.dataset[key]

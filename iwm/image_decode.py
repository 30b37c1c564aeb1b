"""Decoding one image file into the training crop, three ways (`data.decode`).

    pil    the full decode with Pillow, then the crop resized on a torch tensor (antialiased bilinear):
           the reference, and what torchvision's ImageFolder + RandomResizedCrop pipelines do.
    draft  decode only what the crop needs: a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT
           domain (libjpeg's scaled IDCT) when the crop still has >= the output size at that scale, with
           simplejpeg (libjpeg-turbo) when it is installed and Pillow's `Image.draft` otherwise; the crop
           is then resized in uint8 by Pillow (antialiased bilinear, the filter the torch path imitates).
           Every other format, and a JPEG whose crop is too small to reduce, is fully decoded.
    fast   draft's decode (into a reused buffer), the crop resized in uint8 by torch's vectorised
           antialiased bilinear kernel instead of Pillow's (`decode_crop_fast`): same crop, within a
           level of draft, ~1.5x draft's img/s at ImageNet sizes where the resize is half the work.
    gpu    the worker only reads the bytes and samples the crop; nvJPEG decodes the batch on the device
           (torchvision.io.decode_jpeg) and the crop is resized there (see `decode_on_device`).

The crop box is always sampled in source (full-resolution) coordinates from the header's size, so
every path takes the same crop of the same image (up to the DCT scaling's own resampling); the box is
mapped onto the reduced image by the exact scale factor.
"""
from __future__ import annotations

import functools
import io
import threading
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import jpeg_region

DECODE_MODES = ("draft", "pil", "gpu", "fast")
DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg's scaled IDCT does fastest (Pillow's draft offers these)
# Colour modes a libjpeg-turbo RGB decode handles like Pillow does; CMYK (and Adobe-inverted CMYK)
# JPEGs go through Pillow's own conversion instead.
_TURBO_MODES = ("RGB", "L")


@functools.lru_cache(maxsize=1)
def simplejpeg_module():
    """The simplejpeg module, or None when it is not installed (the Pillow draft path is then used)."""
    try:
        import simplejpeg

        return simplejpeg
    except Exception:  # not installed, or a broken binary wheel: the fallback is exact enough
        return None


def dct_scale(box: Sequence[int], size: int) -> int:
    """The largest reduction k in (8, 4, 2, 1) with the crop still >= size pixels on both sides at 1/k."""
    _, _, h, w = box
    for k in DCT_SCALES:
        if min(h, w) >= size * k:
            return k
    return 1


def scaled_box(box: Sequence[int], k_y: float, k_x: float) -> tuple[float, float, float, float]:
    """(left, upper, right, lower) in the reduced image's coordinates, as Pillow's resize(box=) takes it."""
    top, left, h, w = box
    return (left / k_x, top / k_y, (left + w) / k_x, (top + h) / k_y)


def _reduction_of(full: tuple[int, int], reduced: tuple[int, int], asked: int) -> Optional[int]:
    """The k with reduced == ceil(full / k) on both axes (how libjpeg sizes a scaled decode), or None;
    the one asked for first (on an image of a few pixels several k give the same size)."""
    (fw, fh), (rw, rh) = full, reduced
    for k in (asked,) + DCT_SCALES:
        if rw == -(-fw // k) and rh == -(-fh // k):
            return k
    return None


def pil_to_rgb(im):
    """A Pillow image in RGB mode, through the same mode rules as `iwm.data.image_to_rgb_uint8`."""
    from PIL import Image

    from .data import image_to_rgb_uint8

    if im.mode == "RGB":
        return im
    return Image.fromarray(image_to_rgb_uint8(im), "RGB")


def decode_reduced(im, data: bytes, k: int):
    """(RGB Pillow image, reduction k actually used) of the opened JPEG `im` (whose bytes are `data`)."""
    from PIL import Image

    full = im.size
    turbo = simplejpeg_module() if im.mode in _TURBO_MODES else None
    if turbo is not None:
        try:
            arr = turbo.decode_jpeg(data, colorspace="RGB", min_width=-(-full[0] // k), min_height=-(-full[1] // k))
            got = _reduction_of(full, (arr.shape[1], arr.shape[0]), k)
            if got is not None:
                return Image.fromarray(arr, "RGB"), got
        except Exception:  # simplejpeg is stricter than Pillow on odd files: let Pillow decide
            pass
    if k > 1:
        # Pillow picks the largest of 1/8, 1/4, 1/2 with the image still >= the requested size, which
        # for (full // k) is exactly 1/k; it keeps a CMYK JPEG's mode for its own conversion below.
        im.draft("RGB", (full[0] // k, full[1] // k))
    im.load()
    got = _reduction_of(full, im.size, k)
    if got is None:  # a Pillow version that scales otherwise: refuse rather than crop the wrong region
        raise ValueError(f"JPEG draft decode gave {im.size} for {full} at 1/{k}")
    return pil_to_rgb(im), got


def resize_box_pil(rgb, box: tuple[float, float, float, float], size: int, flip: bool) -> torch.Tensor:
    """uint8 [3, size, size]: the box of an RGB Pillow image, antialiased bilinear, optionally mirrored."""
    from PIL import Image

    out = rgb.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(out, dtype=np.uint8)
    return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()


def decode_crop_draft(im, data: bytes, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """The draft path: `im` is the opened (header-only) image, `box` in its full-resolution coordinates."""
    if im.format == "JPEG":
        rgb, k = decode_reduced(im, data, dct_scale(box, size))
        # The reduced image is ceil(full / k) pixels: the source pixel x lies at x / k in it.
        return resize_box_pil(rgb, scaled_box(box, k, k), size, flip)
    return resize_box_pil(pil_to_rgb(im), scaled_box(box, 1, 1), size, flip)


# ---- fast path: draft's decode, the crop resized by torch's uint8 kernel -----------------------------

def resize_box_torch(rgb: np.ndarray, box: Sequence[float], size: int, flip: bool) -> torch.Tensor:
    """uint8 [3, size, size]: the box (left, upper, right, lower; whole pixels) of an RGB
    uint8 [H, W, 3] array, antialiased bilinear, optionally mirrored. The [H, W, 3] array viewed as
    [1, 3, H, W] is channels-last, which torch resizes in uint8 with its vectorised kernel (about 3x
    Pillow's resize here); the result matches Pillow's filter within a level."""
    height, width = rgb.shape[:2]
    left, upper, right, lower = (int(round(v)) for v in box)
    left, upper = min(max(left, 0), width - 1), min(max(upper, 0), height - 1)
    right, lower = max(min(right, width), left + 1), max(min(lower, height), upper + 1)
    if not rgb.flags.writeable:  # a Pillow image's array (the fallback paths): torch wants its own
        rgb = np.array(rgb)
    if (left, upper, right, lower) == (0, 0, width, height) and rgb.flags.c_contiguous:
        # The whole dense array (the region decode's crop): viewed as [1, 3, H, W] it is channels-last
        # with dense rows already, the kernel's fast case, so it is read in place.
        x = torch.from_numpy(rgb[None]).permute(0, 3, 1, 2)
    else:
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None, :, upper:lower, left:right]
        x = x.contiguous(memory_format=torch.channels_last)  # the crop's rows dense: the kernel's fast case
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return _planar(out, flip)


def _planar(out: torch.Tensor, flip: bool) -> torch.Tensor:
    """The resize's [1, 3, S, S] output as a contiguous [3, S, S] tensor of its own, mirrored when `flip`,
    in one copy: the output is channels-last (interleaved), and numpy's transposing copy takes the
    mirror as a negative stride for free, where torch's flip would be a second pass over the image."""
    if out.is_contiguous(memory_format=torch.channels_last):
        hwc = out[0].permute(1, 2, 0).numpy()
        return torch.from_numpy(np.array((hwc[:, ::-1] if flip else hwc).transpose(2, 0, 1), order="C"))
    return (out[0].flip(-1) if flip else out[0]).contiguous()


_buffers = threading.local()


def _decode_buffer(full: tuple[int, int], k: int) -> np.ndarray:
    """This thread's reusable decode buffer, large enough for the image at 1/k (+1 px each way for
    libjpeg's rounding up). Reused because a fresh half-megabyte array per image costs the allocator's
    page faults: ~30 % of the decode on this machine. `resize_box_torch` copies out of it."""
    need = ((full[0] + k) // k + 1) * ((full[1] + k) // k + 1) * 3
    buf = getattr(_buffers, "array", None)
    if buf is None or buf.size < need:
        buf = _buffers.array = np.empty(max(need, 1 << 20), dtype=np.uint8)
    return buf[:need]


def decode_crop_fast(im, data: bytes, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """`decode_crop_draft`'s decode (a JPEG at the DCT scale its crop allows; simplejpeg, else Pillow)
    with the crop resized by `resize_box_torch`. An RGB or gray JPEG goes from simplejpeg's array to the
    resize with no Pillow image in between; everything else through Pillow's decode and mode rules."""
    if im.format == "JPEG":
        full, k = im.size, dct_scale(box, size)
        if im.mode in _TURBO_MODES:
            out = _decode_crop_region(data, full, k, box, size, flip)
            if out is not None:
                return out
        turbo = simplejpeg_module() if im.mode in _TURBO_MODES else None
        if turbo is not None:
            try:
                arr = turbo.decode_jpeg(data, colorspace="RGB", min_width=-(-full[0] // k),
                                        min_height=-(-full[1] // k), buffer=_decode_buffer(full, k))
                got = _reduction_of(full, (arr.shape[1], arr.shape[0]), k)
            except Exception:  # simplejpeg is stricter than Pillow on odd files: let Pillow decide
                got = None
            if got is not None:
                return _resize_reduced(arr, scaled_box(box, got, got), size, flip)
        rgb, got = decode_reduced(im, data, k)
        return _resize_reduced(np.asarray(rgb, dtype=np.uint8), scaled_box(box, got, got), size, flip)
    return resize_box_torch(np.asarray(pil_to_rgb(im), dtype=np.uint8), scaled_box(box, 1, 1), size, flip)


def decode_crop_region(data: bytes, full: tuple[int, int], box: Sequence[int], size: int,
                       flip: bool) -> Optional[torch.Tensor]:
    """The fast path before any Pillow object exists: the crop of an RGB / gray JPEG of size `full`
    (from `jpeg_region.jpeg_header`), or None where the caller must open it with Pillow."""
    return _decode_crop_region(data, full, dct_scale(box, size), box, size, flip)


def _decode_crop_region(data: bytes, full: tuple[int, int], k: int, box: Sequence[int], size: int,
                        flip: bool) -> Optional[torch.Tensor]:
    """The crop from a decode of only its rows and columns at 1/k (iwm.jpeg_region, the system
    libjpeg-turbo); None where that is unavailable or the decoder refuses the file."""
    top, left, h, w = box
    r0, c0 = top // k, left // k  # the crop at 1/k, widened to whole reduced pixels
    r1, c1 = min(-(-(top + h) // k), -(-full[1] // k)), min(-(-(left + w) // k), -(-full[0] // k))
    arr = jpeg_region.decode_region(data, full, k, r0, c0, r1 - r0, c1 - c0)
    if arr is None:
        return None
    reduced = (left / k - c0, top / k - r0, (left + w) / k - c0, (top + h) / k - r0)
    return _resize_reduced(arr, reduced, size, flip)


def _resize_reduced(rgb: np.ndarray, reduced: tuple[float, float, float, float], size: int,
                    flip: bool) -> torch.Tensor:
    """The box `reduced` (left, upper, right, lower) of an image decoded at 1/k. torch's resize takes whole
    pixels only: a box that falls between reduced pixels goes through Pillow's fractional box instead,
    so the crop stays exact."""
    if all(float(v).is_integer() for v in reduced):
        return resize_box_torch(rgb, reduced, size, flip)
    from PIL import Image

    return resize_box_pil(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), reduced, size, flip)


# ---- GPU path ---------------------------------------------------------------------------------------

def gpu_decodable(im, data: bytes) -> bool:
    """Whether the worker may hand these bytes to nvJPEG: a baseline/progressive RGB or gray JPEG that
    is not obviously truncated. The worker cannot decode to check (that is the work it hands over), so
    it checks what is cheap: the header parsed, and the end-of-image marker is present."""
    return im.format == "JPEG" and im.mode in _TURBO_MODES and data.rstrip(b"\x00").endswith(b"\xff\xd9")


def gpu_decode_problem(device: torch.device) -> Optional[str]:
    """Why data.decode=gpu cannot run on `device` (None when it can)."""
    if device.type != "cuda":
        return f"data.decode=gpu: needs a CUDA device (the run is on {device.type}); use data.decode=draft"
    if not torch.cuda.is_available():
        return "data.decode=gpu: CUDA is not available; use data.decode=draft"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:
        return (f"data.decode=gpu: needs torchvision (nvJPEG through torchvision.io.decode_jpeg), which does "
                f"not import here ({type(exc).__name__}: {exc}); pip install torchvision, or use data.decode=draft")
    return None


def _resize_crop_on_device(img: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    top, left, h, w = box
    crop = img[:, top:top + h, left:left + w][None].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    out = out[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.flip(-1) if flip else out


def _decode_cpu_fallback(data: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> Optional[torch.Tensor]:
    from PIL import Image

    raw = data.numpy().tobytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return decode_crop_draft(im, raw, box, size, flip)
    except Exception:
        return None


def decode_on_device(images: torch.Tensor, encoded: Sequence[Optional[torch.Tensor]], boxes: torch.Tensor,
                     flips: torch.Tensor) -> int:
    """Fill images[i] (uint8 [B, 3, S, S] on a CUDA device) from encoded[i] (the file's bytes, uint8 1-D
    on the CPU) wherever it is not None: nvJPEG decodes the batch, the crop boxes[i] (source pixels) is
    resized on the device and mirrored where flips[i]. Returns how many could not be decoded at all:
    an image nvJPEG rejects is decoded on the CPU; one nothing can decode is left mid-gray and counted
    (the worker's cheap checks passed it, so this is rare, and a run must not die of one file)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    todo = [i for i, e in enumerate(encoded) if e is not None]
    if not todo:
        return 0
    size = images.shape[-1]
    box_list, flip_list = boxes.tolist(), flips.tolist()  # CPU tensors from the worker: no device sync
    try:
        decoded = decode_jpeg([encoded[i] for i in todo], mode=ImageReadMode.RGB, device=images.device)
    except Exception:  # one bad image fails the whole batched call: retry one by one
        decoded = []
        for i in todo:
            try:
                decoded.append(decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=images.device))
            except Exception:
                decoded.append(None)
    failed = 0
    for i, img in zip(todo, decoded):
        if img is not None:
            images[i] = _resize_crop_on_device(img, box_list[i], size, bool(flip_list[i]))
            continue
        cpu = _decode_cpu_fallback(encoded[i], box_list[i], size, bool(flip_list[i]))
        if cpu is None:
            images[i] = 128
            failed += 1
        else:
            images[i] = cpu.to(images.device, non_blocking=True)
    return failed


def decode_encoded_on_cpu(images: torch.Tensor, encoded: Sequence[Optional[torch.Tensor]], boxes: torch.Tensor,
                          flips: torch.Tensor) -> int:
    """`decode_on_device`'s contract with Pillow on the CPU (the draft path on the same bytes and crop)."""
    failed = 0
    for i, (data, box, flip) in enumerate(zip(encoded, boxes.tolist(), flips.tolist())):
        if data is None:
            continue
        img = _decode_cpu_fallback(data, box, images.shape[-1], bool(flip))
        if img is None:
            images[i] = 128
            failed += 1
        else:
            images[i] = img.to(images.device)
    return failed

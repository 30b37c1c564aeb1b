"""Data suite: images per second through the real ImageFolder loader path (read, decode, random resized
crop to 224, flip, uint8 batch, and the masks from the mask sampler), per worker process (one core)
and through a whole DataLoader with 2 workers.

Images: ImageNet-sized JPEGs (500x375, 375x500, 500x333, 333x500; quality 90) made from the bundled
photographs (random crops, resized) into a cache folder outside the repository, so nothing downloads.
Baseline: the I-JEPA / torchvision ImageFolder path, written here with Pillow: open, full decode,
RandomResizedCrop (crop, then Pillow bilinear resize), flip, to a uint8 tensor. Ours: data.decode=draft
(the JPEG decoded at the reduced DCT scale the crop allows; simplejpeg when installed), =fast (only the
crop's rows and columns decoded, by the system libjpeg-turbo; the crop resized by torch's uint8 kernel),
=pil (full decode,
tensor resize: the reference) and, for the worker only, =gpu (the worker reads bytes; nvJPEG decodes on
the device, timed on CUDA only). Also: how many cores feed one GPU at the training step's img/s, from
the latest committed GPU report under benchmarks/results/ (else the CPU one; the row says which).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from iwm import image_decode, rng
from iwm.data import ImageFolderDataset, KeyedDataset, Sample, StepBatchSampler, StepCollator, builtin_photos
from iwm.geometry import crop_fractions, sample_geometry
from iwm.masks import MultiBlockMaskSampler

from ..common import Row, time_fns, time_left

SUITE = "data"
BASELINE = "torchvision-style PIL (I-JEPA)"
SIZE = 224
SHAPES = ((500, 375), (375, 500), (500, 333), (333, 500))  # (width, height) of typical ImageNet JPEGs
# Larger photographs (ImageNet's bigger files, most other photo datasets): where the DCT reduction pays.
LARGE_SHAPES = ((1000, 750), (750, 1000), (1024, 683))
QUALITY = 90
CACHE_VERSION = 1
WORKERS = 2
RESULTS = Path(__file__).resolve().parents[1] / "results"


# ---- the images -------------------------------------------------------------------------------------

def cache_root() -> Path:
    return Path(os.environ.get("IWM_BENCH_DATA_CACHE") or Path(tempfile.gettempdir()) / "iwm-bench-data")


def imagenet_like_folder(count: int, seed: int = 0, shapes=SHAPES) -> Path:
    """A folder of `count` ImageNet-sized JPEGs in one class directory per photograph (made once, cached;
    written to a temporary name and renamed, so a half-written cache is never used)."""
    from PIL import Image

    tag = "imagenet-like" if shapes == SHAPES else "large-" + "-".join(f"{w}x{h}" for w, h in shapes)
    root = cache_root() / f"{tag}-v{CACHE_VERSION}-n{count}-s{seed}"
    if (root / "DONE").exists():
        return root
    rng = np.random.default_rng(seed)
    photos = builtin_photos(max_side=2048)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent if root.parent.exists()
                                    else _mkdir(root.parent)))
    for i in range(count):
        name, img = photos[i % len(photos)]
        width, height = shapes[int(rng.integers(len(shapes)))]
        _, h, w = img.shape
        # The largest crop of the photograph's own aspect-matched region, a random 60-100 % of it.
        fit = min(w / width, h / height) * float(rng.uniform(0.6, 1.0))
        cw, ch = max(8, int(width * fit)), max(8, int(height * fit))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        arr = img[:, top:top + ch, left:left + cw].permute(1, 2, 0).numpy()
        folder = staging / name
        folder.mkdir(exist_ok=True)
        Image.fromarray(arr).resize((width, height), Image.BICUBIC).save(folder / f"{i:05d}.jpg", "JPEG",
                                                                         quality=QUALITY)
    (staging / "DONE").write_text(f"{count} images\n")
    try:
        os.rename(staging, root)
    except OSError:  # another process made it first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- the baseline -----------------------------------------------------------------------------------

class TorchvisionStyleFolder(ImageFolderDataset):
    """torchvision's ImageFolder + RandomResizedCrop(224, BILINEAR) + RandomHorizontalFlip + PILToTensor,
    as I-JEPA's loader runs it per image (same files, same crop rule and generator as ours)."""

    def load(self, file_index: int, gen: torch.Generator) -> Sample:
        from PIL import Image

        path, label = self.files[file_index]
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        box, flip = sample_geometry(rgb.size[1], rgb.size[0], gen, scale=self.scale, ratio=self.ratio,
                                    flip_p=self.flip_p)
        top, left, h, w = box
        out = rgb.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BILINEAR)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return Sample(torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous(), label,
                      box=box, flip=flip, crop=crop_fractions(box, rgb.size[1], rgb.size[0]))


class StepMasks:
    """The training loader's mask function (picklable for the workers): 224 px / 16 px patches."""

    def __init__(self, batch: int, seed: int = 0):
        self.batch = batch
        self.sampler = MultiBlockMaskSampler(SIZE // 16, num_targets=4, target_scale=(0.15, 0.2),
                                             target_aspect=(0.75, 1.5), context_mode="complement", seed=seed)

    def __call__(self, step: int):
        return self.sampler.sample(self.batch, step)


# ---- the step's rate ----------------------------------------------------------------------------------

def _committed_reports() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--", str(RESULTS)], cwd=RESULTS.parent.parent, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return [RESULTS.parent.parent / p for p in out.stdout.split() if p.endswith("/report.json")]
    except Exception:
        pass
    return sorted(p for p in RESULTS.glob("*/report.json") if p.parent.name != "latest")


def step_rate() -> tuple[Optional[float], str]:
    """(img/s of the training step, where it comes from): the newest committed GPU report's step
    headline, else the newest committed CPU report's."""
    found = {"cuda": [], "cpu": []}
    for path in _committed_reports():
        try:
            data = json.loads(path.read_text())
            kind = data["environment"].get("device_type", "cpu")
            entry = next(e for e in data["headline"] if e["suite"] == "step" and e.get("img/s"))
        except Exception:
            continue
        found.setdefault(kind, []).append((path.parent.name, float(entry["img/s"]), entry["case"],
                                           data["environment"].get("device", "?")))
    for kind in ("cuda", "cpu"):
        if found.get(kind):
            name, rate, case, device = sorted(found[kind])[-1]  # folders are named YYYY-MM-DD-<device>
            return rate, f"step {case} at {rate:.0f} img/s on {device} ({kind} report benchmarks/results/{name})"
    return None, "no committed report with a step img/s under benchmarks/results/"


# ---- timing --------------------------------------------------------------------------------------------

def datasets(root: Path) -> dict[str, tuple[Optional[ImageFolderDataset], str]]:
    """implementation -> (dataset, why not available). The simplejpeg variant only where installed."""
    out: dict[str, tuple[Optional[ImageFolderDataset], str]] = {BASELINE: (TorchvisionStyleFolder(root, SIZE), "")}
    out["ours (pil: full decode, reference)"] = (ImageFolderDataset(root, SIZE, decode="pil"), "")
    turbo = image_decode.simplejpeg_module() is not None
    out["ours (draft: simplejpeg)"] = ((ImageFolderDataset(root, SIZE, decode="draft"), "") if turbo
                                       else (None, "simplejpeg not installed (pip install simplejpeg)"))
    out["ours (draft: Pillow)"] = (_PillowDraft(root, SIZE, decode="draft"), "")
    # data.decode=fast: only the crop's rows and columns decoded (the system libjpeg-turbo, iwm.jpeg_region),
    # the crop resized by torch's uint8 kernel; and the same without the region decode (simplejpeg's full
    # decode straight into the torch resize), to show what each step gives.
    from iwm import jpeg_region

    out["ours (fast: crop-region decode + torch uint8 resize)"] = (
        (ImageFolderDataset(root, SIZE, decode="fast"), "") if jpeg_region.library() is not None
        else (None, "the region decoder did not build here (needs cc and libjpeg-turbo headers)"))
    out["ours (fast, full decode: simplejpeg + torch uint8 resize)"] = (
        (_FastFullDecode(root, SIZE, decode="fast"), "") if turbo else (None, "simplejpeg not installed"))
    out["ours (gpu: worker reads bytes)"] = (ImageFolderDataset(root, SIZE, decode="gpu"), "")
    return out


class _FastFullDecode(ImageFolderDataset):
    """decode=fast with the region decoder hidden: its simplejpeg fallback."""

    def load(self, file_index, gen):
        from iwm import jpeg_region

        saved = jpeg_region.decode_region
        jpeg_region.decode_region = lambda *args: None
        try:
            return super().load(file_index, gen)
        finally:
            jpeg_region.decode_region = saved


class _PillowDraft(ImageFolderDataset):
    """decode=draft with simplejpeg hidden: the fallback path."""

    def load(self, file_index, gen):
        saved = image_decode.simplejpeg_module
        image_decode.simplejpeg_module = lambda: None
        try:
            return super().load(file_index, gen)
        finally:
            image_decode.simplejpeg_module = saved


def _single_thread(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
    return run


def per_core_rows(impls, keys, budget_s: float, step: tuple[Optional[float], str], case: str,
                  headline: bool = True) -> list[Row]:
    fns = {name: _single_thread(lambda ds=ds: [ds[k] for k in keys]) for name, (ds, _) in impls.items() if ds}
    times = time_fns(fns, torch.device("cpu"), budget_s=budget_s)
    rate, source = step
    rows = []
    for name, (ds, why) in impls.items():
        config = {"images": len(keys), "size": SIZE, "threads": 1}
        got = times.get(name)
        if ds is None or isinstance(got, BaseException):
            note = why or f"failed: {type(got).__name__}: {got}"[:200]
            rows.append(Row(SUITE, case, name, None, note=note, config=config))
            continue
        ms = got / len(keys)
        per_core = 1e3 / ms
        extra = {"img/s per core": per_core}
        bytes_only = name.startswith("ours (gpu")
        if rate and not bytes_only:
            extra["cores per GPU"] = rate / per_core
        note = ""
        if rate and not bytes_only:
            note = f"cores to feed {source}"
        if bytes_only:
            note = "CPU share of data.decode=gpu only (read + header + crop params; nvJPEG decodes on the device)"
        rows.append(Row(SUITE, case, name, ms, baseline=BASELINE, config=config, extra=extra, note=note,
                        headline=headline, same_work=not bytes_only))
    return rows


def loader_rate(ds, batch: int, batches: int, device: torch.device, workers: int) -> float:
    """img/s through a DataLoader (workers, the step sampler, the mask sampler, collation; on CUDA pinned,
    and the batch moved to the device) after the first batch (the workers' start-up)."""
    sampler = StepBatchSampler(len(ds), batch, seed=0, max_steps=batches + 1)
    loader = torch.utils.data.DataLoader(KeyedDataset(ds), batch_sampler=sampler, collate_fn=StepCollator(StepMasks(batch)),
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it).images_on(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for b in it:
        b.images_on(device)
        n += b.images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def check_close(impls, keys) -> dict[str, str]:
    """impl -> a MISMATCH note when its crops are far from the reference's (mean abs error in levels)."""
    ref_ds = impls["ours (pil: full decode, reference)"][0]
    ref = torch.stack([ref_ds[k].image for k in keys]).float()
    out = {}
    for name, (ds, _) in impls.items():
        if ds is None or name.startswith("ours (pil") or name.startswith("ours (gpu"):
            continue
        got = torch.stack([ds[k].image for k in keys]).float()
        err = float((got - ref).abs().mean())
        if err > 3.0:  # the resampling differences measure about 1 level on these images
            out[name] = f"MISMATCH vs the full decode: mean abs error {err:.2f} levels"
    return out


# Sizes of a run: quick (also what the tests shrink further) and full.
QUICK = {"images": 24, "keys": 8, "budget_s": 0.6, "batch": 8, "batches": 3, "passes": 1}
FULL = {"images": 256, "keys": 64, "budget_s": 4.0, "batch": 64, "batches": 6, "passes": 2}


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    size = QUICK if quick else FULL
    count = size["images"]
    progress(f"data | making {count} ImageNet-sized JPEGs under {cache_root()}")
    root = imagenet_like_folder(count)
    impls = datasets(root)
    keys = [(1, int(i)) for i in torch.randperm(count, generator=rng.generator("benchmarks.data.keys", 0, 1))[:size["keys"]]]
    step = step_rate()
    rows = []
    case = f"decode+crop {SIZE}, ImageNet-sized JPEG, per image, 1 core"
    progress(f"data | {case}")
    rows += per_core_rows(impls, keys, size["budget_s"], step, case)
    problems = check_close(impls, keys[:8])
    large_count = max(3, count // 4)
    progress(f"data | making {large_count} large JPEGs ({', '.join(f'{w}x{h}' for w, h in LARGE_SHAPES)})")
    large = datasets(imagenet_like_folder(large_count, shapes=LARGE_SHAPES))
    large_keys = keys[:max(3, len(keys) // 2)]
    large_keys = [(1, i % large_count) for _, i in large_keys]
    case = f"decode+crop {SIZE}, large JPEG (~1000x750), per image, 1 core"
    progress(f"data | {case}")
    rows += per_core_rows(large, large_keys, size["budget_s"] / 2, step, case, headline=False)
    for name, note in check_close(large, large_keys[:8]).items():
        problems.setdefault(name, note)
    for r in rows:
        if r.impl in problems:
            r.note = problems[r.impl]
    # The whole loader, as training runs it; the implementations take turns (`passes` rounds, the best
    # of each kept), as time_fns does, so that the neighbours' load does not pick the winner.
    batch, batches = size["batch"], size["batches"]
    case = f"DataLoader {WORKERS} workers, B={batch}, masks, per image"
    runnable, rates = {}, {}
    for name, (ds, why) in impls.items():
        if name.startswith("ours (gpu") and device.type != "cuda":
            continue  # on the CPU the bytes would be decoded by Pillow in the main process: not the gpu path
        problem = image_decode.gpu_decode_problem(device) if name.startswith("ours (gpu") else None
        if ds is None or problem:
            rows.append(Row(SUITE, case, name, None, note=why or problem))
        else:
            runnable[name] = ds
    for _ in range(size["passes"]):
        for name, ds in runnable.items():
            if time_left() < 5 and name in rates:
                continue
            progress(f"data | {case} | {name}")
            try:
                rate = loader_rate(ds, batch, batches, device, WORKERS)
            except Exception as exc:
                rates[name] = exc
                continue
            if not isinstance(rates.get(name), BaseException):
                rates[name] = max(rate, rates.get(name, 0.0))
    for name in runnable:
        rate = rates.get(name)
        config = {"workers": WORKERS, "batch": batch, "batches": batches, "device": device.type}
        if rate is None or isinstance(rate, BaseException):
            note = f"failed: {type(rate).__name__}: {rate}"[:200] if rate is not None else "skipped: time share spent"
            rows.append(Row(SUITE, case, name, None, note=note, config=config))
            continue
        rows.append(Row(SUITE, case, name, 1e3 / rate, baseline=BASELINE, extra={"img/s": rate}, config=config,
                        note=f"{WORKERS} worker processes on {os.cpu_count()} cores"))
    return rows

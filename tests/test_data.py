"""Data: built-in photographs, ImageFolder with corrupt files, image modes (16-bit, CMYK, palette,
alpha), deterministic resumable batch order."""
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from iwm.data import (BuiltinPhotos, ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator,
                      builtin_photos)
from iwm.geometry import random_resized_box


def test_builtin_photos_are_real_and_many():
    photos = builtin_photos()
    assert len(photos) >= 10
    for name, img in photos:
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and min(img.shape[1:]) >= 64
        assert img.float().std() > 10, name  # a photograph, not a flat image


def test_builtin_crops_deterministic_and_label_is_photo():
    ds = BuiltinPhotos(32, 100, seed=3)
    a, b = ds[(5, 7)], ds[(5, 7)]
    assert torch.equal(a.image, b.image) and a.label == 7 % len(ds.photos)
    assert not torch.equal(ds[(6, 7)].image, a.image)  # another step, another crop
    val = BuiltinPhotos(32, 100, split="val", seed=3)
    assert val[3].image.shape == (3, 32, 32) and torch.equal(val[3].image, val[3].image)


def test_train_and_val_regions_are_disjoint():
    ds_train, ds_val = BuiltinPhotos(16, 10), BuiltinPhotos(16, 10, split="val")
    for _, photo in ds_train.photos:
        train, val = ds_train.region(photo), ds_val.region(photo)
        assert train.shape[2] > 0 and val.shape[2] > 0
        # side by side they are the photograph exactly: no column is shared, none is left out
        assert torch.equal(torch.cat([train, val], dim=2), photo)


def test_random_resized_box_bounds(seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        h, w = int(torch.randint(8, 300, (1,), generator=gen)), int(torch.randint(8, 300, (1,), generator=gen))
        top, left, bh, bw = random_resized_box(h, w, (0.3, 1.0), (3 / 4, 4 / 3), gen)
        assert 0 <= top and 0 <= left and top + bh <= h and left + bw <= w and bh > 0 and bw > 0


def test_imagefolder_skips_and_counts_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "0.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "b" / "zz.jpg").write_bytes(b"")
    ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) == 7 and ds.classes == ["a", "b"]
    samples = [ds[(0, i)] for i in range(len(ds))]
    # files sort as a/0 (corrupt), a/1, a/2, b/0, b/1, b/2, b/zz (empty); a bad file's successor stands
    # in (b/zz wraps around past a/0 to a/1), and each bad file is reported by its own key only
    assert [s.unreadable for s in samples] == [0, -1, -1, -1, -1, -1, 6]
    assert [s.skipped for s in samples] == [1, 0, 0, 0, 0, 0, 1]
    assert [s.label for s in samples] == [0, 0, 0, 1, 1, 1, 0]
    assert all(s.image.shape == (3, 16, 16) for s in samples)
    collate = StepCollator()
    batch = collate([(0, s) for s in samples])
    assert batch.skipped == 2 and batch.unreadable_files == (0, 6) and batch.images.shape == (7, 3, 16, 16)


def write_images(folder, count, rng, size=(12, 10)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def write_garbage(folder, count, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:03d}.png").write_bytes(rng.bytes(int(rng.integers(0, 64))))


def test_imagefolder_long_run_of_bad_files_is_not_fatal(tmp_path, seed):
    """70 unreadable files in a row, then good ones: every key finds the first good file after its own
    (more than the 64 attempts that used to be fatal), and the 70 bad files are counted once each."""
    rng = np.random.default_rng(seed)
    write_garbage(tmp_path / "a", 70, rng)
    write_images(tmp_path / "b", 3, rng)
    ds = ImageFolderDataset(tmp_path, 8, seed=seed)
    samples = [ds[(2, i)] for i in range(len(ds))]
    assert [s.label for s in samples] == [1] * 73
    assert [s.unreadable for s in samples] == list(range(70)) + [-1] * 3
    batch = StepCollator()([(2, s) for s in samples])
    assert batch.skipped == 70 and batch.unreadable_files == tuple(range(70))
    # Key 0 stands in file 70, the first good one; its crop still comes from key (2, 0).
    assert not torch.equal(samples[0].image, samples[70].image)


def test_imagefolder_only_bad_files_raises_naming_the_count(tmp_path, seed):
    rng = np.random.default_rng(seed)
    write_garbage(tmp_path / "a", 6, rng)
    write_garbage(tmp_path / "b", 4, rng)
    ds = ImageFolderDataset(tmp_path, 8)
    for key in [(0, 0), (0, 9), 5]:  # the second and third calls find them all known to be unreadable
        with pytest.raises(RuntimeError, match=r"none of the 10 image files .* \(tried all 10, 10 unreadable"):
            ds[key]


def test_imagefolder_counts_distinct_files_across_workers_and_is_deterministic(tmp_path, seed):
    """One epoch through a 2-worker DataLoader: each bad file is counted once, however many keys walk
    over it; the samples equal those of a fresh single-process dataset read in another order."""
    rng = np.random.default_rng(seed)
    write_garbage(tmp_path / "a", 5, rng)  # files 0..4: keys 0..4 all stand in file 5
    write_images(tmp_path / "b", 4, rng)
    write_garbage(tmp_path / "c", 3, rng)  # files 9..11: they wrap around to file 5 too
    ds = ImageFolderDataset(tmp_path, 8, seed=seed)
    sampler = StepBatchSampler(len(ds), 3, seed=seed, max_steps=4)  # exactly one epoch of 12
    loader = torch.utils.data.DataLoader(KeyedDataset(ds), batch_sampler=sampler, collate_fn=StepCollator(),
                                         num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    assert sum(b.skipped for b in batches) == 8
    assert sorted(i for b in batches for i in b.unreadable_files) == [0, 1, 2, 3, 4, 9, 10, 11]
    fresh = ImageFolderDataset(tmp_path, 8, seed=seed)
    for batch, keys in reversed(list(zip(batches, sampler))):
        for image, key in zip(batch.images, keys):
            assert torch.equal(image, fresh[key].image), key


def png_16bit(path, values, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 48-bit RGB or 64-bit RGBA)."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def decoded(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        img = ImageFolderDataset.decode(path)
    assert img.dtype == torch.uint8 and img.shape[0] == 3
    return img.permute(1, 2, 0).numpy().astype(np.int64)


def close_to(img, want, tol):
    return int(np.abs(img - np.asarray(want, dtype=np.float64)).max()) <= tol


def test_decode_16bit_grayscale(tmp_path, seed):
    """16-bit grayscale is scaled to 8 bits (value / 257), not clipped to a white image."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    values[0, :3] = (0, 257 * 100, 65535)
    Image.fromarray(values).save(tmp_path / "g16.png")  # Pillow's mode I;16
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    img = decoded(tmp_path / "g16.png")
    assert close_to(img, (values / 257.0)[..., None].repeat(3, axis=2), 1)
    assert img[0, :3, 0].tolist() == [0, 100, 255]
    # Mode "I" (32-bit; older Pillow gives 16-bit PNGs this mode), here as a TIFF.
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")
    with Image.open(tmp_path / "i32.tif") as im:
        assert im.mode == "I"
    assert close_to(decoded(tmp_path / "i32.tif"), (values / 257.0)[..., None].repeat(3, axis=2), 1)


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (4, 2)])  # RGB 48, RGBA 64, LA 32 bit
def test_decode_16bit_color_and_alpha_pngs(tmp_path, seed, color_type, channels):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 65536, (7, 5, channels), dtype=np.uint16)
    png_16bit(tmp_path / "x.png", values, color_type)
    colour = values[..., :3] if channels >= 3 else values[..., :1].repeat(3, axis=2)  # alpha dropped
    assert close_to(decoded(tmp_path / "x.png"), colour / 257.0, 1)


def test_decode_cmyk_jpeg(tmp_path, seed):
    rng = np.random.default_rng(seed)
    cmyk = rng.integers(0, 256, 4)
    Image.new("CMYK", (16, 16), tuple(int(v) for v in cmyk)).save(tmp_path / "c.jpg", quality=100)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
    c, m, y, k = (cmyk / 255.0).tolist()
    want = [255 * (1 - v) * (1 - k) for v in (c, m, y)]
    assert close_to(decoded(tmp_path / "c.jpg"), np.broadcast_to(want, (16, 16, 3)), 4)


def test_decode_palette_with_transparency_and_8bit_alpha(tmp_path, seed):
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (6, 9), dtype=np.uint8)
    im = Image.frombytes("P", (9, 6), indices.tobytes())
    im.putpalette(palette.reshape(-1).tolist())
    im.save(tmp_path / "p.png", transparency=bytes(rng.integers(0, 256, 16, dtype=np.uint8)))
    with Image.open(tmp_path / "p.png") as back:
        assert back.mode == "P" and "transparency" in back.info
    assert close_to(decoded(tmp_path / "p.png"), palette[indices], 0)
    rgba = rng.integers(0, 256, (6, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert close_to(decoded(tmp_path / "rgba.png"), rgba[..., :3], 0)
    la = rng.integers(0, 256, (6, 9, 2), dtype=np.uint8)
    la_image = Image.fromarray(la[..., 0]).convert("LA")
    la_image.putalpha(Image.fromarray(la[..., 1]))
    la_image.save(tmp_path / "la.png")
    assert close_to(decoded(tmp_path / "la.png"), la[..., :1].repeat(3, axis=2), 0)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.image_folder"):
        ImageFolderDataset(tmp_path / "missing", 16)
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        ImageFolderDataset(tmp_path, 16)


def test_batch_order_resumes_exactly_and_ranks_partition():
    full = list(StepBatchSampler(50, 4, seed=1, max_steps=30))
    resumed = list(StepBatchSampler(50, 4, seed=1, start_step=17, max_steps=30))
    assert resumed == full[17:]
    assert [k[0] for k in full[3]] == [3] * 4
    r0 = list(StepBatchSampler(50, 2, world_size=2, rank=0, seed=1, max_steps=30))
    r1 = list(StepBatchSampler(50, 2, world_size=2, rank=1, seed=1, max_steps=30))
    assert all(a + b == f for a, b, f in zip(r0, r1, full))
    epoch0 = [i for batch in full[:12] for _, i in batch]
    assert len(set(epoch0)) == len(epoch0)  # no repeats inside an epoch


def test_sampler_rejects_too_small_dataset():
    with pytest.raises(ValueError, match="data.batch_size"):
        StepBatchSampler(3, 4)


def test_flip_probability_is_a_probability(seed):
    """augment.flip_p is honoured as a probability (0: never, 1: always, between: that fraction), and
    the flip draw leaves the crop unchanged: the same key gives the same crop, mirrored or not."""
    never, always = BuiltinPhotos(24, 50, seed=seed, flip_p=0.0), BuiltinPhotos(24, 50, seed=seed, flip_p=1.0)
    for key in [(s, i) for s in range(3) for i in range(4)]:
        assert torch.equal(never[key].image.flip(-1), always[key].image)
    some = BuiltinPhotos(24, 50, seed=seed, flip_p=0.2)
    flips = sum(not torch.equal(some[(s, 0)].image, never[(s, 0)].image) for s in range(300))
    assert 30 <= flips <= 95  # Binomial(300, 0.2): mean 60, 5 sigma ~ 35


@pytest.mark.slow  # a real training run over two epochs and a resume (a few seconds each)
def test_training_counts_each_unreadable_file_once_per_run(tmp_path, seed):
    # Two bad files among 12, batch 4: an epoch (3 steps) draws every index once, so each bad file is
    # met once per epoch; after 3 epochs and a resume the run still counts 2 (it counted 6 before).
    from pathlib import Path

    from iwm.config import load_config
    from iwm.train import Trainer

    rng = np.random.default_rng(seed)
    write_images(tmp_path / "data" / "a", 6, rng, size=(40, 40))
    write_images(tmp_path / "data" / "b", 4, rng, size=(40, 40))
    (tmp_path / "data" / "a" / "bad0.png").write_bytes(b"\x89PNG nonsense")
    (tmp_path / "data" / "b" / "bad1.png").write_bytes(b"")
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    common = ["data.dataset=imagefolder", f"data.image_folder={tmp_path / 'data'}", "data.crop_size=32",
              "mask.patch_size=8", "data.batch_size=4", "data.num_workers=0", "eval.at_end=false",
              "logging.tensorboard=false", "logging.progress_bar=off", "meta.use_bfloat16=false",
              "mask.min_keep=2", "optimization.warmup=1", "optimization.epochs=3",
              f"logging.folder={tmp_path / 'run'}"]
    first = Trainer(load_config(tiny, [*common, "optimization.max_steps=4"]), log=lambda *a, **k: None).train()
    assert first["skipped_images"] == 2  # epoch 0 met both
    rest = Trainer(load_config(tiny, common), log=lambda *a, **k: None).train()
    assert rest["final_step"] == 9 and rest["skipped_images"] == 2


@pytest.mark.slow  # two ranks under torchrun, two epochs (about 30 s)
def test_two_ranks_count_each_unreadable_file_once_over_the_run(tmp_path, seed):
    """Each rank meets its share of the bad files, a different share each epoch: the log rows and the
    summary line give the run's count, summed over ranks and each file once (rank 0 alone would give the
    files it happened to meet: all 10 of 10 with chance (3/4)^10 over two epochs)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from iwm.distributed import free_port

    rng = np.random.default_rng(seed)
    write_images(tmp_path / "data" / "a", 10, rng, size=(40, 40))
    for i in range(10):
        (tmp_path / "data" / "a" / f"bad{i}.png").write_bytes(b"\x89PNG nonsense" if i % 2 else b"")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", free_port(),
           "-m", "iwm.train", "--config", str(root / "configs" / "tiny.yaml"), "data.dataset=imagefolder",
           f"data.image_folder={tmp_path / 'data'}", "data.crop_size=32", "mask.patch_size=8",
           "data.batch_size=2", "data.num_workers=0", "eval.at_end=false", "logging.tensorboard=false",
           "logging.progress_bar=off", "logging.log_every=1", "meta.use_bfloat16=false", "mask.min_keep=2",
           "optimization.warmup=1", "optimization.epochs=2", f"logging.folder={tmp_path / 'run'}"]
    res = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["skipped_images"] for r in rows if "skipped_images" in r]
    assert len(counts) == 10 and counts == sorted(counts) and counts[-1] == 10, counts
    assert counts[4] == 10  # the first epoch (5 steps of 4 images) met every file once
    assert "skipped 10 unreadable image(s)" in res.stdout + res.stderr

"""Data: built-in photographs, ImageFolder with corrupt files, deterministic resumable batch order."""
import numpy as np
import pytest
import torch
from PIL import Image

from iwm.data import (BuiltinPhotos, ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator,
                      builtin_photos, random_resized_box)


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
    photo = ds_train.photos[0][1]
    assert ds_train.region(photo).shape[2] + ds_val.region(photo).shape[2] == photo.shape[2]


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
    # files sort as a/0 (corrupt), a/1, a/2, b/0, b/1, b/2, b/zz (empty); a bad file's successor stands in
    assert [s.skipped for s in samples] == [1, 0, 0, 0, 0, 0, 2]
    assert all(s.image.shape == (3, 16, 16) for s in samples)
    collate = StepCollator()
    batch = collate([(0, s) for s in samples])
    assert batch.skipped == 3 and batch.images.shape == (7, 3, 16, 16)


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

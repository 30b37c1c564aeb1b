"""One seed mixer (iwm.rng) behind every stream; one crop sampler (iwm.geometry), used by the loader
workers, whose crops reach the step's ViewParams; N processes give what one process gives."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iwm import augment as aug
from iwm import rng
from iwm.data import BuiltinPhotos, ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator
from iwm.geometry import Geometry, crop_fractions, crop_generator, sample_geometry
from iwm.masks import MultiBlockMaskSampler
from tests.helpers import HostReadCounter, count_python_readers

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16


def _same_stream(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(a.get_state(), b.get_state())


# ---- one seed mixer ------------------------------------------------------------------------------------

def test_masks_views_crops_and_order_all_come_from_iwm_rng(seed):
    """Every stream is rng.generator(<its domain>, ...): masks (seed, step), views (seed, step), a sample's
    crop (seed, step, index[, split]) and the epoch order (seed, epoch)."""
    sampler = MultiBlockMaskSampler(8, seed=seed)
    assert _same_stream(sampler._generator(5), rng.generator(rng.MASKS, seed, 5))
    assert _same_stream(aug.generator_for_step(seed, 5), rng.generator(rng.VIEWS, seed, 5))
    assert _same_stream(crop_generator(seed, 5, 3), rng.generator(rng.CROP, seed, 5, 3))
    order = StepBatchSampler(40, 4, seed=seed)
    assert torch.equal(order.permutation(2), torch.randperm(40, generator=rng.generator(rng.ORDER, seed, 2)))
    # a loader sample's crop is the one sampler's draw from that sample's crop stream
    ds = BuiltinPhotos(SIZE, 50, seed=seed)
    sample = ds[(4, 9)]
    region = ds.region(ds.photos[9 % len(ds.photos)][1])
    want = sample_geometry(region.shape[1], region.shape[2], rng.generator(rng.CROP, seed, 4, 9, 0),
                           scale=ds.scale, ratio=ds.ratio, flip_p=ds.flip_p)
    assert (sample.box, sample.flip) == want


def test_no_other_seed_mixer_is_left_in_iwm():
    mixers = ("blake2b", "0x9E3779B97F4A7C15", "splitmix", "manual_seed(step)")
    found = [f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "iwm").rglob("*.py") if p.name != "rng.py"
             for m in mixers if m.lower() in p.read_text().lower()]
    assert not found, found


def test_mixer_separates_streams_and_names_bad_parts():
    assert rng.mix(rng.CROP, 1, 2, 3) == rng.mix(rng.CROP, 1, 2, 3)
    seeds = {rng.mix(rng.CROP, 1, 2, 3), rng.mix(rng.CROP, 1, 3, 2), rng.mix(rng.CROP, 1, 2, 3, 0),
             rng.mix(rng.ORDER, 1, 2, 3), rng.mix(rng.CROP, 1, 2, -1), rng.mix(rng.CROP, 2, 2, 3)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert rng.mix(rng.MASKS, np.int64(7), 3) == rng.mix(rng.MASKS, 7, 3)
    with pytest.raises(TypeError, match=r"parts\[1\]"):
        rng.mix(rng.MASKS, 0, 1.5)
    with pytest.raises(TypeError, match=r"parts\[0\]"):
        rng.mix(rng.MASKS, True)
    with pytest.raises(ValueError, match="domain"):
        rng.mix("", 0)


# ---- one crop sampler, reported with the batch ------------------------------------------------------------

def _train_step(rank: int, batch_size: int, global_batch: int, seed: int, cfg: aug.AugmentConfig):
    from iwm.builders import build_optimizer
    from iwm.models import IWM, get_preset
    from iwm.step import TrainStep

    model = IWM.from_preset(replace(get_preset("tiny"), img_size=SIZE, patch_size=8))
    return TrainStep(model, build_optimizer(model, 1e-3, 0.0), device=torch.device("cpu"), aug_cfg=cfg, seed=seed,
                     global_batch=global_batch, rank=rank, batch_size=batch_size)


def _check_crops_describe_the_pixels(batch, sources, params) -> None:
    """Rendering each uncropped source with the reported crop and flip (iwm.augment's own resampler)
    gives the worker's uint8 image, within its rounding: the crop is the one applied."""
    for i, src in enumerate(sources):
        again = aug.crop_resize_flip(src[None], params.crop[i:i + 1], params.flip[i:i + 1], SIZE)[0] * 255
        err = (again - batch.images[i].float()).abs().max()
        assert err <= 0.51, (i, params.crop[i].tolist(), float(err))


def test_view_params_crop_is_the_crop_the_builtin_worker_applied(seed):
    cfg = aug.AugmentConfig(out_size=SIZE)
    ds = BuiltinPhotos(SIZE, 64, seed=seed)
    keys = [(3, i) for i in (5, 11, 0, 40, 23, 17)]
    samples = [ds[k] for k in keys]
    batch = StepCollator()([(3, s) for s in samples])
    assert batch.geometry is not None and batch.geometry.validated
    views = _train_step(0, 6, 6, seed, cfg).views(batch.images, 3, batch.geometry)
    sources = [ds.region(ds.photos[i % len(ds.photos)][1]) for _, i in keys]
    want = torch.tensor([crop_fractions(s.box, src.shape[1], src.shape[2]) for s, src in zip(samples, sources)])
    assert torch.equal(views.params.crop, want.float()) and views.params.flip.tolist() == [s.flip for s in samples]
    _check_crops_describe_the_pixels(batch, sources, views.params)
    # the photometric parameters (and so the action) are the step's own stream, unchanged by the geometry
    photometric = aug.sample_view_params(6, cfg, aug.generator_for_step(seed, 3))
    assert torch.equal(views.action, aug.action_from_params(photometric))


@pytest.mark.parametrize("decode", ["pil", "draft"])
def test_view_params_crop_is_the_crop_the_image_folder_worker_applied(tmp_path, seed, decode):
    gen = np.random.default_rng(seed)
    sources = []
    for i, (h, w) in enumerate([(40, 56), (33, 29), (64, 48), (24, 70)]):
        (tmp_path / "c").mkdir(exist_ok=True)
        arr = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "c" / f"{i}.png")
        sources.append(torch.from_numpy(arr).permute(2, 0, 1))
    ds = ImageFolderDataset(tmp_path, SIZE, seed=seed, decode=decode)
    batch = StepCollator()([(7, ds[(7, i)]) for i in range(4)])
    cfg = aug.AugmentConfig(out_size=SIZE)
    views = _train_step(0, 4, 4, seed, cfg).views(batch.images, 7, batch.geometry)
    assert torch.equal(views.params.crop, batch.geometry.crop) and torch.equal(views.params.flip, batch.geometry.flip)
    if decode == "pil":  # draft resizes with Pillow's filter: the same crop, pixels within a level or so
        _check_crops_describe_the_pixels(batch, sources, views.params)
    else:
        for i, src in enumerate(sources):
            again = aug.crop_resize_flip(src[None], views.params.crop[i:i + 1], views.params.flip[i:i + 1], SIZE)
            assert (again[0] * 255 - batch.images[i].float()).abs().mean() <= 2.0, i


def test_step_views_read_nothing_with_the_workers_geometry(monkeypatch, seed):
    cfg = aug.AugmentConfig(out_size=SIZE, blur_p=0.5)
    ds = BuiltinPhotos(SIZE, 64, seed=seed)
    batch = StepCollator()([(2, ds[(2, i)]) for i in range(4)])
    step_fn = _train_step(1, 4, 8, seed, cfg)
    active = count_python_readers(monkeypatch.setattr)
    counter = HostReadCounter()
    active.append(counter)
    with counter:
        step_fn.views(batch.images, 2, batch.geometry)
    active.pop()
    assert not counter.reads, counter.report()


def _loader_batches(ds, batch: int, world: int, rank: int, steps: int):
    sampler = StepBatchSampler(len(ds), batch, world_size=world, rank=rank, seed=0, max_steps=steps)
    return list(torch.utils.data.DataLoader(KeyedDataset(ds), batch_sampler=sampler, collate_fn=StepCollator()))


def test_two_processes_get_the_view_params_and_views_of_one(seed):
    """Each rank's loader and step give exactly the slice of what one process with the global batch gets:
    crops and flips (per sample index), photometric parameters (global batch, sliced), rendered views (to float rounding)."""
    cfg = aug.AugmentConfig(out_size=SIZE, blur_p=0.5, grayscale_p=0.5)
    ds = BuiltinPhotos(SIZE, 64, seed=seed)
    one = _loader_batches(ds, 8, 1, 0, 3)
    ranks = [_loader_batches(ds, 4, 2, r, 3) for r in (0, 1)]
    single = _train_step(0, 8, 8, seed, cfg)
    steps = [_train_step(r, 4, 8, seed, cfg) for r in (0, 1)]
    for s in range(3):
        want = single.views(one[s].images, s, one[s].geometry)
        got = [steps[r].views(ranks[r][s].images, s, ranks[r][s].geometry) for r in (0, 1)]
        assert torch.equal(torch.cat([ranks[r][s].images for r in (0, 1)]), one[s].images)
        for name in want.params._tensor_fields():
            joined = torch.cat([getattr(g.params, name) for g in got])
            assert torch.equal(joined, getattr(want.params, name)), (s, name)
        assert sum((g.params.source_blur for g in got), ()) == want.params.source_blur
        for part in ("source", "target", "action"):
            # the same parameters render the same pixels up to float rounding: the kernels' vector
            # lanes group the images of a batch of 4 and of 8 differently (1e-6 seen)
            torch.testing.assert_close(torch.cat([getattr(g, part) for g in got]), getattr(want, part),
                                       atol=1e-5, rtol=0, msg=lambda m: f"step {s}, {part}: {m}")
    # and the crops differ from step to step (the step is part of each crop's stream)
    assert not torch.equal(one[0].geometry.crop, one[1].geometry.crop)


def test_geometry_is_checked_where_it_is_made():
    with pytest.raises(ValueError, match="box"):
        crop_fractions((0, 3, 10, 10), 10, 12)
    with pytest.raises(ValueError, match="crop"):
        Geometry.from_samples([(0.5, 0.0, 0.7, 1.0)], [False])
    p = aug.sample_view_params(2, aug.AugmentConfig(out_size=8))
    with pytest.raises(ValueError, match="geometry"):
        p.with_geometry(Geometry.from_samples([(0.0, 0.0, 1.0, 1.0)], [True]))
    unchecked = Geometry(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.9, 0.5]]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="crop"):
        p.with_geometry(unchecked)
    with pytest.raises(TypeError, match="geometry"):
        p.with_geometry((torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool)))
    ok = Geometry(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.1, 0.8, 0.5]]), torch.tensor([True, False]))
    assert torch.equal(p.with_geometry(ok).crop, ok.crop)

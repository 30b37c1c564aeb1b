"""data.decode: the draft (reduced DCT scale) decode against the full decode, determinism, the
simplejpeg fallback, the gpu path's byte-reading worker, odd image modes on every path, the
data.decode=gpu start-up errors, and the data benchmark suite in a quick mode."""
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from iwm import image_decode
from iwm.data import ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator, builtin_photos

MODES = ("pil", "draft", "gpu")
IDS = [f"decode_{m}" for m in MODES]  # not "gpu": conftest skips tests with that keyword


def photo_jpegs(folder, seed, shapes=((1000, 750), (750, 1000), (500, 375)), per_shape=2):
    """Real photographs (the bundled ones) as JPEGs of the given (width, height), quality 90."""
    rng = np.random.default_rng(seed)
    photos = builtin_photos(max_side=1024)
    (folder / "x").mkdir(parents=True)
    n = 0
    for width, height in shapes:
        for _ in range(per_shape):
            _, img = photos[int(rng.integers(len(photos)))]
            arr = img.permute(1, 2, 0).numpy()
            Image.fromarray(arr).resize((width, height), Image.BICUBIC).save(folder / "x" / f"{n:03d}.jpg",
                                                                             quality=90)
            n += 1
    return folder


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.fixture
def folder(tmp_path, seed):
    return photo_jpegs(tmp_path / "data", seed)


def test_dct_scale_keeps_the_crop_at_least_the_output_size(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        h, w, size = int(rng.integers(8, 3000)), int(rng.integers(8, 3000)), int(rng.integers(8, 300))
        k = image_decode.dct_scale((0, 0, h, w), size)
        assert k in (1, 2, 4, 8)
        assert k == 1 or min(h, w) / k >= size  # never below the output size
        assert k == 8 or min(h, w) / (2 * k) < size  # and the largest reduction that keeps it


def test_draft_takes_the_same_crop_close_to_the_full_decode(folder, seed):
    """Same boxes and flips as the full decode; pixels within resampling error (PSNR >= 30 dB, mean
    abs error <= 6 levels); and reduced scales really used (so the test checks the box mapping)."""
    size = 64
    full = ImageFolderDataset(folder, size, seed=seed, decode="pil")
    draft = ImageFolderDataset(folder, size, seed=seed, decode="draft")
    reductions = set()
    for step in range(3):
        for i in range(len(full)):
            a, b = full[(step, i)], draft[(step, i)]
            assert a.box == b.box and a.flip == b.flip and a.label == b.label
            reductions.add(image_decode.dct_scale(a.box, size))
            # Textured photographs (brick, gravel) differ most at 1/4 and 1/8: about 36 dB, 4 levels
            # (typical: 43 dB, 1 level); another crop measures under 25 dB.
            assert psnr(a.image, b.image) >= 30.0, (step, i, a.box)
            assert float((a.image.float() - b.image.float()).abs().mean()) <= 6.0, (step, i, a.box)
    assert max(reductions) >= 4


def test_a_wrongly_mapped_box_would_fail_the_closeness_check(folder, seed, monkeypatch):
    """The closeness threshold can fail: a box mapped with twice the scale is another (in-range) crop."""
    real = image_decode.scaled_box
    monkeypatch.setattr(image_decode, "scaled_box", lambda box, ky, kx: real(box, 2 * ky, 2 * kx))
    full = ImageFolderDataset(folder, 64, seed=seed, decode="pil")
    draft = ImageFolderDataset(folder, 64, seed=seed, decode="draft")
    worst = min(psnr(full[(0, i)].image, draft[(0, i)].image) for i in range(len(full)))
    assert worst < 30.0


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_every_path_is_deterministic_per_key_in_workers(folder, seed, mode):
    ds = ImageFolderDataset(folder, 32, seed=seed, decode=mode)
    sampler = StepBatchSampler(len(ds), 2, seed=seed, start_step=1, max_steps=4)
    loader = torch.utils.data.DataLoader(KeyedDataset(ds), batch_sampler=sampler, collate_fn=StepCollator(),
                                         num_workers=2)
    fresh = ImageFolderDataset(folder, 32, seed=seed, decode=mode)
    for batch, keys in zip(loader, sampler):
        images = batch.images_on(torch.device("cpu"))
        for image, key in zip(images, keys):
            want = fresh[key]
            got = want.image if want.encoded is None else None
            if got is None:  # gpu: the sample waits for its decode; decode the same bytes here
                one = StepCollator()([(key[0], want)])
                got = one.images_on(torch.device("cpu"))[0]
            assert torch.equal(image, got), key
    assert any(fresh[(1, i)].box != fresh[(2, i)].box for i in range(len(fresh)))  # the step matters


def test_draft_falls_back_to_pillow_without_simplejpeg(folder, seed, monkeypatch):
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` now fails
    image_decode.simplejpeg_module.cache_clear()
    try:
        assert image_decode.simplejpeg_module() is None
        from PIL import JpegImagePlugin

        drafted = []
        real_draft = JpegImagePlugin.JpegImageFile.draft

        def spy(self, mode, size):
            drafted.append(size)
            return real_draft(self, mode, size)

        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
        full = ImageFolderDataset(folder, 64, seed=seed, decode="pil")
        draft = ImageFolderDataset(folder, 64, seed=seed, decode="draft")
        for i in range(len(full)):
            a, b = full[(0, i)], draft[(0, i)]
            assert a.box == b.box and psnr(a.image, b.image) >= 30.0
        assert drafted  # Pillow's DCT-domain reduction did the work
    finally:
        monkeypatch.delitem(sys.modules, "simplejpeg")
        image_decode.simplejpeg_module.cache_clear()


def test_simplejpeg_and_pillow_draft_agree(folder, seed, monkeypatch):
    pytest.importorskip("simplejpeg")
    image_decode.simplejpeg_module.cache_clear()
    turbo = ImageFolderDataset(folder, 64, seed=seed, decode="draft")
    with_turbo = [turbo[(0, i)].image for i in range(len(turbo))]
    monkeypatch.setattr(image_decode, "simplejpeg_module", lambda: None)
    pillow = ImageFolderDataset(folder, 64, seed=seed, decode="draft")
    for i, img in enumerate(with_turbo):
        assert int((pillow[(0, i)].image.int() - img.int()).abs().max()) <= 2  # the same libjpeg IDCT


def test_gpu_worker_returns_the_bytes_and_the_crop(folder, seed):
    draft = ImageFolderDataset(folder, 48, seed=seed, decode="draft")
    gpu = ImageFolderDataset(folder, 48, seed=seed, decode="gpu")
    samples = [gpu[(2, i)] for i in range(len(gpu))]
    for i, s in enumerate(samples):
        assert s.encoded is not None and s.encoded.dtype == torch.uint8
        assert bytes(s.encoded.numpy()) == gpu.files[i][0].read_bytes()
        want = draft[(2, i)]
        assert s.box == want.box and s.flip == want.flip
        # Decoded here with Pillow, the bytes and crop give the CPU path's image.
        with Image.open(io.BytesIO(bytes(s.encoded.numpy()))) as im:
            assert torch.equal(image_decode.decode_crop_draft(im, bytes(s.encoded.numpy()), s.box, 48, s.flip),
                               want.image)
    batch = StepCollator()([(2, s) for s in samples])
    assert len(batch.encoded) == len(samples) and batch.boxes.shape == (len(samples), 4)
    assert batch.boxes.tolist() == [list(s.box) for s in samples]
    images = batch.images_on(torch.device("cpu"))
    assert torch.equal(images, torch.stack([draft[(2, i)].image for i in range(len(draft))]))


def write_odd_images(folder, seed):
    rng = np.random.default_rng(seed)
    (folder / "odd").mkdir(parents=True)
    gray16 = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(gray16).save(folder / "odd" / "a_gray16.png")
    cmyk = rng.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(folder / "odd" / "b_cmyk.jpg", quality=95)
    palette = Image.fromarray(rng.integers(0, 16, (40, 48), dtype=np.uint8), "P")
    palette.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tolist())
    palette.info["transparency"] = 3
    palette.save(folder / "odd" / "c_palette.png")
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), "L").save(folder / "odd" / "d_gray.jpg")
    return folder


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_16bit_cmyk_palette_and_gray_decode_alike_on_every_path(tmp_path, seed, mode):
    """The centre crop at its own size (no resampling): every path gives the full decode's pixels
    (the JPEGs within a level: the turbo and Pillow colour conversions)."""
    root = write_odd_images(tmp_path, seed)
    ds = ImageFolderDataset(root, 40, decode=mode, random_crops=False)
    for i, (path, _) in enumerate(ds.files):
        want = ImageFolderDataset.decode(path)[:, :, 4:44]
        s = ds[i]
        assert s.unreadable == -1
        got = s.image if s.encoded is None else StepCollator()([(0, s)]).images_on(torch.device("cpu"))[0]
        if mode == "gpu":  # what nvJPEG may not decode alike (CMYK, 16-bit, palette) the worker decodes
            assert (s.encoded is not None) == path.name.endswith("gray.jpg")
        tol = 1 if path.suffix == ".jpg" else 0
        assert int((got.int() - want.int()).abs().max()) <= tol, path.name


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_corrupt_and_truncated_files_are_skipped_and_counted_on_every_path(folder, seed, mode):
    files = sorted((folder / "x").iterdir())
    files[0].write_bytes(files[0].read_bytes()[: len(files[0].read_bytes()) // 2])  # truncated JPEG
    files[2].write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(folder, 32, seed=seed, decode=mode)
    samples = [ds[(0, i)] for i in range(len(ds))]
    assert [s.unreadable for s in samples] == [0, -1, 2] + [-1] * (len(ds) - 3)
    batch = StepCollator()([(0, s) for s in samples])
    assert batch.skipped == 2 and batch.unreadable_files == (0, 2)
    batch.images_on(torch.device("cpu"))
    assert batch.skipped == 2


def test_decode_setting_is_validated_and_gpu_needs_cuda_and_torchvision(tmp_path, seed, monkeypatch):
    from iwm.config import ConfigError, load_config
    from iwm.train import Trainer

    with pytest.raises(ConfigError, match="data.decode"):
        load_config(None, ["data.decode=nvjpeg"])
    with pytest.raises(ValueError, match="decode"):
        ImageFolderDataset(photo_jpegs(tmp_path / "d", seed, per_shape=1), 32, decode="turbo")
    root = photo_jpegs(tmp_path / "e", seed, per_shape=1)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.image_folder={root}", "data.decode=gpu",
                             "meta.device=cpu", "eval.tasks=[]", f"logging.folder={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="data.decode=gpu: needs a CUDA device"):
        Trainer(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    problem = image_decode.gpu_decode_problem(torch.device("cuda"))
    assert problem.startswith("data.decode=gpu: needs torchvision")


@pytest.mark.gpu
def test_gpu_decode_matches_the_cpu_crop(folder, seed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("torchvision")
    device = torch.device("cuda")
    assert image_decode.gpu_decode_problem(device) is None
    full = ImageFolderDataset(folder, 64, seed=seed, decode="pil")
    gpu = ImageFolderDataset(folder, 64, seed=seed, decode="gpu")
    samples = [gpu[(3, i)] for i in range(len(gpu))]
    batch = StepCollator()([(3, s) for s in samples])
    images = batch.images_on(device)
    assert images.device.type == "cuda" and images.dtype == torch.uint8 and batch.skipped == 0
    for i in range(len(full)):
        # nvJPEG's IDCT and upsampling differ from libjpeg's by a level or two; the resize is the same.
        assert psnr(images[i].cpu(), full[(3, i)].image) >= 32.0, i


@pytest.mark.slow
def test_data_suite_runs_quickly(tmp_path, monkeypatch):
    from benchmarks.suites import data as suite

    monkeypatch.setenv("IWM_BENCH_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(suite, "QUICK", {"images": 6, "keys": 3, "budget_s": 0.05, "batch": 2, "batches": 1,
                                         "passes": 1})
    rows = suite.run(torch.device("cpu"), True, lambda msg: None)
    (imagenet_like,) = (tmp_path / "cache").glob("imagenet-like-*")
    jpegs = sorted(imagenet_like.rglob("*.jpg"))
    assert len(jpegs) == 6
    for path in jpegs:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size in suite.SHAPES
    per_core = [r for r in rows if r.case.startswith("decode+crop") and "ImageNet" in r.case]
    assert any(r.case.startswith("decode+crop") and "large" in r.case and r.ms for r in rows)
    assert not any(r.headline for r in rows if "large" in r.case)  # the headline is the ImageNet-sized case
    loader = [r for r in rows if r.case.startswith("DataLoader")]
    assert {r.impl for r in per_core} >= {suite.BASELINE, "ours (pil: full decode, reference)",
                                          "ours (draft: Pillow)", "ours (gpu: worker reads bytes)"}
    for r in per_core:
        if r.impl == "ours (draft: simplejpeg)" and image_decode.simplejpeg_module() is None:
            assert r.ms is None and "simplejpeg not installed" in r.note
        else:
            assert r.ms > 0 and r.extra["img/s per core"] == pytest.approx(1e3 / r.ms) and r.headline
    assert not [r for r in rows if r.note.startswith("MISMATCH")]
    assert any(r.impl == suite.BASELINE and r.extra.get("img/s", 0) > 0 for r in loader)
    assert all("gpu" not in r.impl for r in loader)  # the gpu loader runs on CUDA only
    rate, source = suite.step_rate()
    if rate:
        assert "cores per GPU" in next(r for r in per_core if r.impl == suite.BASELINE).extra
        assert "report benchmarks/results/" in source


@pytest.mark.parametrize("turbo", [True, False], ids=["simplejpeg", "pillow"])
def test_tiny_jpegs_are_not_mistaken_for_reduced_ones(seed, monkeypatch, turbo):
    """On a JPEG of a few pixels the 1/1 and 1/8 decodes have the same size: the reduction reported
    (by which the box is mapped) must be the one used, or the crop would be 1/8 of the right one."""
    if turbo:
        pytest.importorskip("simplejpeg")
    else:
        monkeypatch.setattr(image_decode, "simplejpeg_module", lambda: None)
    rng = np.random.default_rng(seed)
    for w, h in [(1, 1), (3, 2), (7, 5), (8, 8)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            rgb, k = image_decode.decode_reduced(im, buf.getvalue(), 1)
        assert k == 1 and rgb.size == (w, h)

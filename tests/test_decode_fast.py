"""data.decode=fast: draft's decode with the crop resized by torch's uint8 kernel. Same crop as the full
decode and close to it, within a level of draft, deterministic, safe with the reused decode buffer,
the Pillow fallback without simplejpeg, odd image modes, and unreadable files counted."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from iwm import image_decode
from iwm.config import load_config
from iwm.data import ImageFolderDataset, StepCollator, builtin_photos

SIZE = 64


def psnr(a, b):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.fixture
def folder(tmp_path, seed):
    rng = np.random.default_rng(seed)
    photos = builtin_photos(max_side=1024)
    (tmp_path / "x").mkdir()
    shapes = ((500, 375), (375, 500), (1000, 750), (333, 500), (640, 480), (200, 150))
    for n, (w, h) in enumerate(shapes):
        _, img = photos[int(rng.integers(len(photos)))]
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.BICUBIC).save(
            tmp_path / "x" / f"{n:03d}.jpg", quality=90)
    return tmp_path


def close_to_the_full_decode(image, pil, draft):
    """The closeness check: near Pillow's full decode (another decoder and resize), and within a level of
    draft's (the same decoder, another resize). PSNR alone cannot see a wrong crop of a smooth photograph
    (a crop shifted by a quarter of its width scored up to 35 dB over 300 seeds); the mean error against
    draft can: at most 0.26 levels for the right crop, at least 3.3 for the shifted or unflipped ones."""
    return (psnr(image, pil) >= 30 and float((image.float() - pil.float()).abs().mean()) <= 6
            and float((image.float() - draft.float()).abs().mean()) <= 1.5)


def test_fast_takes_the_full_decodes_crop_and_stays_close(folder, seed):
    ref = ImageFolderDataset(folder, SIZE, seed=seed, decode="pil")
    draft = ImageFolderDataset(folder, SIZE, seed=seed, decode="draft")
    fast = ImageFolderDataset(folder, SIZE, seed=seed, decode="fast")
    for step in range(3):
        for i in range(len(fast)):
            a, r, d = fast[(step, i)], ref[(step, i)], draft[(step, i)]
            assert a.box == r.box and a.flip == r.flip and a.label == r.label
            assert a.image.shape == (3, SIZE, SIZE) and a.image.dtype == torch.uint8 and a.image.is_contiguous()
            assert close_to_the_full_decode(a.image, r.image, d.image)


def test_a_shifted_or_unflipped_crop_would_fail_the_closeness_check(folder, seed):
    ref = ImageFolderDataset(folder, SIZE, seed=seed, decode="pil")
    draft = ImageFolderDataset(folder, SIZE, seed=seed, decode="draft")
    for i in range(len(ref)):
        s, d = ref[(0, i)], draft[(0, i)]
        data = ref.files[i][0].read_bytes()

        def crop(box, flip):  # a fresh image each time: the decoder sets its draft mode on it
            with Image.open(io.BytesIO(data)) as im:
                return image_decode.decode_crop_fast(im, data, box, SIZE, flip)
        top, left, h, w = s.box
        assert close_to_the_full_decode(crop(s.box, s.flip), s.image, d.image)  # the control's own positive
        assert not close_to_the_full_decode(crop((top, left + w // 4 + 8, h, w - w // 4 - 8), s.flip), s.image, d.image)
        assert not close_to_the_full_decode(crop(s.box, not s.flip), s.image, d.image)


def test_the_reused_decode_buffer_never_leaks_into_returned_images(folder, seed):
    fast = ImageFolderDataset(folder, SIZE, seed=seed, decode="fast")
    first = [fast[(0, i)].image for i in range(len(fast))]
    copies = [x.clone() for x in first]
    for i in range(len(fast)):  # more decodes through the same buffer
        fast[(1, i)]
    assert all(torch.equal(a, b) for a, b in zip(first, copies))
    # a crop of exactly the output size over a whole image (the resize's no-op case) is a copy too
    arr = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    out = image_decode.resize_box_torch(arr, (0, 0, SIZE, SIZE), SIZE, False)
    assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))
    arr[:] = 0
    assert out.any()


def test_fast_is_deterministic_and_falls_back_to_pillow(folder, seed, monkeypatch):
    fast = ImageFolderDataset(folder, SIZE, seed=seed, decode="fast")
    a = [fast[(2, i)].image for i in range(len(fast))]
    assert all(torch.equal(x, fast[(2, i)].image) for i, x in enumerate(a))
    monkeypatch.setattr(image_decode, "simplejpeg_module", lambda: None)
    b = [ImageFolderDataset(folder, SIZE, seed=seed, decode="fast")[(2, i)].image for i in range(len(fast))]
    for x, y in zip(a, b):
        assert float((x.float() - y.float()).abs().mean()) <= 1.5


def test_odd_modes_and_unreadable_files(tmp_path, seed):
    rng = np.random.default_rng(seed)
    (tmp_path / "x").mkdir()
    # smooth content (noise upscaled): the resampling differences between paths stay small
    rgb = np.asarray(Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize((120, 90), Image.BICUBIC))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "x" / "0cmyk.jpg", quality=95)
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(tmp_path / "x" / "1gray16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "x" / "2pal.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "x" / "3gray.jpg", quality=95)
    (tmp_path / "x" / "4bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ref = ImageFolderDataset(tmp_path, 32, seed=seed, decode="pil")
    fast = ImageFolderDataset(tmp_path, 32, seed=seed, decode="fast")
    samples = [fast[(0, i)] for i in range(len(fast))]
    draft = ImageFolderDataset(tmp_path, 32, seed=seed, decode="draft")
    for i in range(4):
        assert psnr(samples[i].image, ref[(0, i)].image) >= 30
        assert float((samples[i].image.float() - draft[(0, i)].image.float()).abs().mean()) <= 1.5
    assert [s.unreadable for s in samples] == [-1, -1, -1, -1, 4]
    assert StepCollator()([(0, s) for s in samples]).skipped == 1


def test_fast_is_a_config_choice():
    assert load_config(overrides=["data.decode=fast"]).data.decode == "fast"


# ---- the crop-region decoder (iwm.jpeg_region) -------------------------------------------------------

def jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def photo(seed, w=300, h=220):
    _, img = builtin_photos(max_side=512)[seed % 5]
    return np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h), Image.BICUBIC))


needs_region = pytest.mark.skipif(__import__("iwm.jpeg_region").jpeg_region.library() is None,
                                  reason="the region decoder does not build here (cc + libjpeg-turbo headers)")


@needs_region
@pytest.mark.parametrize("kind", ["420", "444", "gray", "progressive"])
def test_region_decode_equals_the_full_decodes_crop(seed, kind):
    import simplejpeg

    from iwm.jpeg_region import decode_region

    rng = np.random.default_rng(seed)
    arr = photo(seed)
    if kind == "gray":
        arr = np.ascontiguousarray(arr[..., 0])
    data = jpeg(arr, quality=90, subsampling={"444": 0}.get(kind, 2), progressive=kind == "progressive")
    full_size = (arr.shape[1], arr.shape[0])
    for k in (1, 2, 4):
        full = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-full_size[0] // k),
                                      min_height=-(-full_size[1] // k))
        for _ in range(6):
            h, w = int(rng.integers(1, full.shape[0] + 1)), int(rng.integers(1, full.shape[1] + 1))
            top, left = int(rng.integers(0, full.shape[0] - h + 1)), int(rng.integers(0, full.shape[1] - w + 1))
            got = decode_region(data, full_size, k, top, left, h, w)
            assert got is not None and got.shape == (h, w, 3)
            want = full[top:top + h, left:left + w].astype(int)
            diff = np.abs(got.astype(int) - want)
            # equal but within 2 px of the region's edges (chroma upsampling sees the border there)
            assert diff[2:-2, 2:-2].max(initial=0) == 0
            assert diff.mean() <= 0.5


@needs_region
def test_region_decode_refuses_what_pillow_should_decide(seed):
    from iwm.jpeg_region import decode_region

    arr = photo(seed)
    data = jpeg(arr, quality=90)
    assert decode_region(data, (300, 220), 1, 0, 0, 220, 300) is not None
    assert decode_region(data[: len(data) // 2], (300, 220), 1, 0, 0, 220, 300) is None  # truncated: warns
    assert decode_region(b"\xff\xd8\xff garbage", (300, 220), 1, 0, 0, 10, 10) is None
    assert decode_region(data, (300, 220), 1, 200, 0, 40, 10) is None  # outside the image
    assert decode_region(data, (301, 220), 1, 0, 0, 10, 10) is None  # not the size the header says
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG", quality=90)
    assert decode_region(cmyk.getvalue(), (300, 220), 1, 0, 0, 10, 10) is None


@needs_region
def test_fast_uses_the_region_decoder_and_falls_back_without_it(folder, seed, monkeypatch):
    from iwm import jpeg_region

    calls = []
    real = jpeg_region.decode_region
    monkeypatch.setattr(jpeg_region, "decode_region", lambda *a: calls.append(a) or real(*a))
    ds = ImageFolderDataset(folder, SIZE, seed=seed, decode="fast")
    with_region = [ds[(0, i)].image for i in range(len(ds))]
    assert len(calls) == len(ds)
    monkeypatch.setattr(jpeg_region, "decode_region", lambda *a: None)
    without = [ds[(0, i)].image for i in range(len(ds))]
    for a, b in zip(with_region, without):
        assert float((a.float() - b.float()).abs().mean()) <= 0.5


def test_region_decoder_is_optional(tmp_path, monkeypatch):
    from iwm import jpeg_region

    jpeg_region.library.cache_clear()
    try:
        monkeypatch.setenv("IWM_NO_JPEG_REGION", "1")
        assert jpeg_region.library() is None
        assert jpeg_region.decode_region(b"", (1, 1), 1, 0, 0, 1, 1) is None
        jpeg_region.library.cache_clear()
        monkeypatch.setenv("IWM_NO_JPEG_REGION", "0")
        monkeypatch.setenv("IWM_JPEG_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        assert jpeg_region.library() is None  # a failed build is no error: the full decode is used
    finally:
        jpeg_region.library.cache_clear()

"""data.decode=fast without Pillow on the way: the frame-header parser against Pillow's size, odd files
refused (they go through Pillow as before), the header path's pixels equal the Pillow-opened path's, and
the one-copy output equals the resize's output transposed (and mirrored)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from iwm import image_decode
from iwm.data import ImageFolderDataset, builtin_photos, load_and_crop
from iwm.geometry import crop_generator, sample_geometry
from iwm.jpeg_region import jpeg_header


def _jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_header_size_agrees_with_pillow_on_photos_and_reencoded_crops(seed):
    rng = np.random.default_rng(seed)
    checked = 0
    for _, img in builtin_photos(max_side=1024):
        arr = img.permute(1, 2, 0).numpy()
        h, w = arr.shape[:2]
        for _ in range(3):
            ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = np.ascontiguousarray(arr[top:top + ch, left:left + cw])
            kw = {"quality": int(rng.integers(50, 96)), "progressive": bool(rng.integers(2)),
                  "subsampling": int(rng.integers(3))}
            for data in (_jpeg(crop, **kw), _jpeg(crop[..., 0], **kw)):
                with Image.open(io.BytesIO(data)) as im:
                    assert jpeg_header(data) == (im.size[0], im.size[1], len(im.getbands())), kw
                checked += 1
    assert checked >= 60


def test_odd_files_have_no_fast_header(tmp_path, seed):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    good = _jpeg(arr)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "CMYK").save(cmyk, "JPEG")
    assert jpeg_header(good) == (48, 40, 3)
    assert jpeg_header(cmyk.getvalue())[2] == 4  # parsed, but the caller sends 4 components to Pillow
    for bad in (png.getvalue(), b"", b"\xff\xd8\xff garbage", good[:20], b"\xff\xd8" + good,
                good.replace(b"\xff\xc0", b"\xff\xc3", 1)):  # not a JPEG, corrupt, truncated, lossless
        assert jpeg_header(bad) is None


@pytest.mark.parametrize("size", [224, 48])  # 224: the 1/1 region decode; 48: the 1/2..1/8 scales
def test_header_path_gives_the_pillow_opened_paths_pixels(seed, size):
    rng = np.random.default_rng(seed)
    photos = builtin_photos(max_side=1024)
    used = set()
    for n in range(8):
        _, img = photos[int(rng.integers(len(photos)))]
        w, h = [(500, 375), (375, 500), (640, 427)][n % 3]
        data = _jpeg(np.asarray(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((w, h))), quality=90)

        def geometry(height, width, n=n):
            return sample_geometry(height, width, crop_generator(seed, 1, n), scale=(0.3, 1.0),
                                   ratio=(3 / 4, 4 / 3), flip_p=0.5)
        got = load_and_crop(data, 0, size, "fast", geometry)
        with Image.open(io.BytesIO(data)) as im:  # today's route: Pillow reads the header
            box, flip = geometry(h, w)
            want = image_decode.decode_crop_fast(im, data, box, size, flip)
        assert got.box == box and got.flip == flip
        assert got.image.is_contiguous() and torch.equal(got.image, want), n
        used.add((image_decode.dct_scale(box, size), flip))
    assert len({k for k, _ in used}) >= 1 and {f for _, f in used} == {False, True}


@pytest.mark.parametrize("flip", [False, True])
def test_one_copy_output_equals_flip_then_contiguous(seed, flip):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, 3, 37, 53), dtype=torch.uint8, generator=g)
    for out in (x.contiguous(memory_format=torch.channels_last), x):
        got = image_decode._planar(out, flip)
        want = (out[0].flip(-1) if flip else out[0]).contiguous()
        assert got.is_contiguous() and torch.equal(got, want)
        assert got.data_ptr() != out.data_ptr() or not out.is_contiguous(memory_format=torch.channels_last)


def test_fast_dataset_still_reads_odd_files_through_pillow(tmp_path, seed):
    from tests.test_data_decode import write_odd_images

    root = write_odd_images(tmp_path, seed)
    ds = ImageFolderDataset(root, 40, decode="fast", random_crops=False)
    for i, (path, _) in enumerate(ds.files):
        want = ImageFolderDataset.decode(path)[:, :, 4:44]
        s = ds[i]
        assert s.unreadable == -1
        assert int((s.image.int() - want.int()).abs().max()) <= (1 if path.suffix == ".jpg" else 0), path.name

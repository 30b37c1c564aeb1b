"""iwm.augment: each transform against a per-image reference written here from the standard definitions
(torchvision's documented formulas, colorsys for HSV), determinism, geometry and the action vector."""
import colorsys
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iwm import augment as A
from iwm_kernels.photometric import pack_params, reference as R
from tests.helpers import backends_on

BACKENDS = backends_on("cpu")
ATOL = 2e-6  # fp32 chain against float64 per-image formulas, in [0, 1] units


# ---- per-image references: one image at a time, scalar factors, float64 --------------------------------

def np_image(x):
    return x.detach().double().numpy()


def ref_gray(img):
    return 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]


def ref_brightness(img, f):
    return np.clip(f * img, 0, 1)


def ref_contrast(img, f):
    return np.clip(f * img + (1 - f) * ref_gray(img).mean(), 0, 1)


def ref_saturation(img, f):
    return np.clip(f * img + (1 - f) * ref_gray(img)[None], 0, 1)


def ref_hue(img, shift):
    out = np.empty_like(img)
    for y in range(img.shape[1]):
        for x in range(img.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*img[:, y, x])
            out[:, y, x] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def ref_grayscale(img):
    return np.repeat(ref_gray(img)[None], 3, axis=0)


def ref_blur(img, sigma):
    r = math.ceil(3 * sigma)
    j = np.arange(-r, r + 1)
    k = np.exp(-j * j / (2 * sigma * sigma))
    k /= k.sum()
    padded = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    rows = np.stack([sum(k[t] * padded[:, :, t:t + img.shape[2]] for t in range(2 * r + 1))])[0]
    return sum(k[t] * rows[:, t:t + img.shape[1], :] for t in range(2 * r + 1))


def ref_solarize(img, threshold):
    return np.where(img >= threshold, 1 - img, img)


def per_image(fn, x, factors):
    return torch.from_numpy(np.stack([fn(np_image(x[i]), float(f)) for i, f in enumerate(factors)]))


def images(gen, b=4, h=9, w=11):
    return torch.rand(b, 3, h, w, generator=gen)


# ---- each transform against its per-image reference ----------------------------------------------------

@pytest.mark.parametrize("name, fn, ref, lo, hi, edges", [
    ("brightness", R.adjust_brightness, ref_brightness, 0.0, 2.0, [0.0, 1.0, 3.0]),
    ("contrast", R.adjust_contrast, ref_contrast, 0.0, 2.0, [0.0, 1.0, 3.0]),
    ("saturation", R.adjust_saturation, ref_saturation, 0.0, 2.0, [0.0, 1.0, 3.0]),
    ("hue", R.adjust_hue, ref_hue, -0.5, 0.5, [-0.5, 0.5, 0.25, -1e-7]),
])
def test_jitter_transform_matches_per_image_definition(name, fn, ref, lo, hi, edges, seed):
    gen = torch.Generator().manual_seed(seed)
    x = images(gen, b=4 + len(edges))
    factors = torch.cat([lo + (hi - lo) * torch.rand(4, generator=gen), torch.tensor(edges)])
    got = fn(x, factors)
    want = per_image(ref, x, factors)
    torch.testing.assert_close(got.double(), want, atol=ATOL * (8 if name == "hue" else 1), rtol=0)


def test_edge_values_are_exact(seed):
    gen = torch.Generator().manual_seed(seed)
    x = images(gen)
    zeros, ones = torch.zeros(4), torch.ones(4)
    assert torch.equal(R.adjust_brightness(x, zeros), torch.zeros_like(x))             # black
    c0 = R.adjust_contrast(x, zeros)                                                  # constant = mean gray
    torch.testing.assert_close(c0, R.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x))
    s0 = R.adjust_saturation(x, zeros)                                                # gray, 3 channels
    assert torch.equal(s0[:, 0], s0[:, 1]) and torch.equal(s0[:, 1], s0[:, 2])
    for fn in (R.adjust_brightness, R.adjust_contrast, R.adjust_saturation):         # factor 1: untouched
        assert torch.equal(fn(x, ones), x)
    assert torch.equal(R.adjust_hue(x, zeros), x)
    # +0.5 and -0.5 are the same rotation (wrap-around), and a full turn of 2 x 0.5 returns the image
    torch.testing.assert_close(R.adjust_hue(x, ones * 0.5), R.adjust_hue(x, -ones * 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(R.adjust_hue(R.adjust_hue(x, ones * 0.5), ones * 0.5), x, atol=1e-5, rtol=0)


def test_hue_wraps_around_the_colour_circle():
    # pure red shifted by +1/3 is green, by -1/3 is blue; hue 0.9 + 0.2 wraps to 0.1
    red = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    third = torch.tensor([1 / 3])
    torch.testing.assert_close(R.adjust_hue(red, third).flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(R.adjust_hue(red, -third).flatten(), torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    px = torch.tensor(colorsys.hsv_to_rgb(0.9, 0.8, 0.7), dtype=torch.float32).reshape(1, 3, 1, 1)
    want = torch.tensor(colorsys.hsv_to_rgb(0.1, 0.8, 0.7), dtype=torch.float32)
    torch.testing.assert_close(R.adjust_hue(px, torch.tensor([0.2])).flatten(), want, atol=1e-6, rtol=0)


def test_grayscale_uses_itu_601_weights(seed):
    x = images(torch.Generator().manual_seed(seed))
    flag = torch.tensor([True, False, True, False])
    got = R.grayscale(x, flag)
    for i in range(4):
        want = ref_grayscale(np_image(x[i])) if flag[i] else np_image(x[i])
        torch.testing.assert_close(got[i].double(), torch.from_numpy(want), atol=ATOL, rtol=0)
    red = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    assert torch.allclose(R.grayscale(red, torch.tensor([1])), torch.full((1, 3, 1, 1), 0.299))


def test_blur_matches_separable_gaussian_with_reflect_padding(seed):
    gen = torch.Generator().manual_seed(seed)
    x = images(gen, b=4, h=13, w=17)
    sigma = torch.tensor([0.1, 2.0, 0.0, 0.1 + 1.9 * float(torch.rand((), generator=gen))])
    got = R.gaussian_blur(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        want = ref_blur(np_image(x[i]), s) if s > 0 else np_image(x[i])
        torch.testing.assert_close(got[i].double(), torch.from_numpy(want), atol=ATOL, rtol=0)
    assert torch.equal(got[2], x[2])  # sigma 0: untouched
    assert R.blur_radius(2.0) == 6 and R.blur_radius(0.1) == 1 and R.blur_radius(0.0) == 0


def test_blur_kernel_is_normalised_and_truncated_at_3_sigma():
    taps = R.gaussian_taps(torch.tensor([0.5, 1.0, 2.0, 0.0]), 6)
    torch.testing.assert_close(taps.sum(1), torch.ones(4))
    assert taps[0, :4].abs().sum() == 0 and taps[0, 4] > 0        # sigma 0.5: radius 2 of a 6 window
    assert taps[3, 6] == 1 and taps[3].sum() == 1                  # sigma 0: identity


def test_solarize_threshold_edges():
    half_below = 0.5 - 2.0 ** -24
    x = torch.tensor([0.0, half_below, 0.5, 0.75, 1.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5).contiguous()
    on = torch.tensor([1])
    assert R.solarize(x, on, torch.tensor([0.5]))[0, 0, 0].tolist() == [0.0, half_below, 0.5, 0.25, 0.0]
    assert R.solarize(x, on, torch.tensor([0.0]))[0, 0, 0].tolist() == [1.0, 1 - half_below, 0.5, 0.25, 0.0]
    assert R.solarize(x, on, torch.tensor([1.0]))[0, 0, 0].tolist() == [0.0, half_below, 0.5, 0.75, 0.0]
    assert torch.equal(R.solarize(x, on, torch.tensor([1.5])), x)
    assert torch.equal(R.solarize(x, torch.tensor([0]), torch.tensor([0.0])), x)


def test_whole_chain_matches_per_image_composition(seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, 3, 8, 10, generator=gen) * 255).round().to(torch.uint8)
    p = pack_params(3, brightness=torch.tensor([0.7, 1.3, 1.0]), contrast=torch.tensor([1.2, 0.6, 0.0]),
                    saturation=torch.tensor([0.9, 1.1, 0.0]), hue=torch.tensor([0.1, -0.5, 0.3]),
                    grayscale=torch.tensor([1.0, 0.0, 0.0]), blur_sigma=torch.tensor([0.0, 1.2, 0.6]),
                    solarize=torch.tensor([1.0, 0.0, 1.0]), solarize_threshold=0.5)
    got = R.photometric_unnormalized(x, p)
    for i in range(3):
        img = np_image(x[i]) / 255.0
        img = ref_brightness(img, float(p[i, 0]))
        img = ref_contrast(img, float(p[i, 1]))
        img = ref_saturation(img, float(p[i, 2]))
        img = ref_hue(img, float(p[i, 3]))
        if p[i, 4]:
            img = ref_grayscale(img)
        if p[i, 5] > 0:
            img = ref_blur(img, float(p[i, 5]))
        pre = img
        if p[i, 6]:
            img = ref_solarize(img, 0.5)
        far = torch.from_numpy(np.abs(pre - 0.5) > 1e-5)  # the threshold's discontinuity is not a tolerance
        torch.testing.assert_close(got[i].double()[far], torch.from_numpy(img)[far], atol=1e-5, rtol=0)


def test_identity_params_leave_images_untouched(seed):
    x = images(torch.Generator().manual_seed(seed))
    assert torch.equal(R.photometric_unnormalized(x, pack_params(4)), x)


# ---- sampling, determinism, action ---------------------------------------------------------------------

def test_make_views_is_deterministic_under_seed_and_step(seed):
    gen = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(6, 3, 20, 24, generator=gen) * 255).to(torch.uint8)
    cfg = A.AugmentConfig(out_size=16, jitter_p=0.5, blur_p=0.5, grayscale_p=0.5, solarize_p=0.5)
    a = A.make_views(imgs, cfg, seed=seed, step=3)
    b = A.make_views(imgs, cfg, seed=seed, step=3)
    for x, y in ((a.source, b.source), (a.target, b.target), (a.action, b.action)):
        assert torch.equal(x, y)
    c = A.make_views(imgs, cfg, seed=seed, step=4)
    d = A.make_views(imgs, cfg, seed=seed + 1, step=3)
    assert not torch.equal(a.action, c.action) and not torch.equal(a.action, d.action)
    assert a.source.shape == (6, 3, 16, 16) and a.source.dtype == torch.float32
    assert a.action.shape == (6, A.ACTION_DIM)


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_views_backends_agree(backend, seed):
    imgs = (torch.rand(5, 3, 15, 13, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    cfg = A.AugmentConfig(out_size=11, blur_p=0.6, solarize_p=0.5, grayscale_p=0.5)
    want = A.make_views(imgs, cfg, seed=seed, step=0, backend="reference")
    got = A.make_views(imgs, cfg, seed=seed, step=0, backend=backend)
    assert torch.equal(got.action, want.action)
    torch.testing.assert_close(got.target, want.target, atol=3e-5, rtol=1e-5)
    x = A.crop_resize_flip(imgs, want.params.crop, want.params.flip, 11)
    pre = R.photometric_unnormalized(x, want.params.photometric_params("source") * torch.tensor([1.0] * 6 + [0, 1]))
    far = ((pre - want.params.solarize_threshold).abs() > 1e-5)
    torch.testing.assert_close(got.source[far], want.source[far], atol=3e-5, rtol=1e-5)


def test_sampled_parameters_respect_the_config(seed):
    cfg = A.AugmentConfig(out_size=32)
    p = A.sample_view_params(4000, cfg, torch.Generator().manual_seed(seed))
    for jit, applied in ((p.source_jitter, p.source_jitter_applied), (p.target_jitter, p.target_jitter_applied)):
        on = jit[applied]
        assert (on[:, 0] >= 0.6).all() and (on[:, 0] <= 1.4).all()
        assert (on[:, 1] >= 0.6).all() and (on[:, 1] <= 1.4).all()
        assert (on[:, 2] >= 0.8).all() and (on[:, 2] <= 1.2).all()
        assert (on[:, 3].abs() <= 0.1).all()
        assert torch.equal(jit[~applied], torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(int((~applied).sum()), 4))
        assert abs(applied.float().mean() - 0.8) < 0.04
    for flag, prob in ((p.grayscale, 0.2), (p.blur, 0.2), (p.solarize, 0.1)):
        assert abs(flag.float().mean() - prob) < 0.04
    assert (p.blur_sigma >= 0.1).all() and (p.blur_sigma <= 2.0).all()
    # no geometry is drawn with the photometric parameters: the crop comes from the loader
    assert torch.equal(p.crop, torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(4000, 4)) and not p.flip.any()


def test_sampled_crops_follow_torchvision_rule(seed):
    """The one crop sampler (iwm.geometry, the loader's): area, aspect and flip rate within the config."""
    from iwm.geometry import Geometry, crop_fractions, crop_generator, sample_geometry

    drawn = [sample_geometry(600, 800, crop_generator(seed, 3, i), scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3),
                             flip_p=0.5) for i in range(2000)]
    boxes = torch.tensor([box for box, _ in drawn], dtype=torch.float64)
    assert abs(sum(f for _, f in drawn) / 2000 - 0.5) < 0.04
    p = Geometry.from_samples([crop_fractions(box, 600, 800) for box, _ in drawn], [f for _, f in drawn])
    top, left, h, w = (p.crop[:, i] for i in range(4))
    assert torch.equal((h * 600).round(), boxes[:, 2].float())  # integer pixel boxes, as torchvision's
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    area, aspect = h * w, (w * 800) / (h * 600)
    assert (area >= 0.3 - 0.005).all() and (area <= 1 + 1e-6).all()
    assert (aspect >= 0.75 - 0.005).all() and (aspect <= 4 / 3 + 0.005).all()


def test_probabilities_zero_and_one():
    from iwm.geometry import crop_generator, sample_geometry

    never = A.AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0)
    p = A.sample_view_params(64, never, torch.Generator().manual_seed(0))
    assert not (p.grayscale.any() or p.blur.any() or p.solarize.any())
    for flip_p in (0.0, 1.0):
        flips = {sample_geometry(20, 30, crop_generator(0, 0, i), scale=(0.3, 1.0), ratio=(0.75, 1.33),
                                 flip_p=flip_p)[1] for i in range(64)}
        assert flips == {bool(flip_p)}
    assert torch.equal(A.action_from_params(p), torch.zeros(64, A.ACTION_DIM))
    always = A.AugmentConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0, solarize_p=1.0, flip_p=1.0)
    p = A.sample_view_params(64, always, torch.Generator().manual_seed(0))
    assert p.grayscale.all() and p.blur.all() and p.solarize.all()
    assert p.source_jitter_applied.all() and p.target_jitter_applied.all()


def test_action_layout_and_zero_action(seed):
    p = A.sample_view_params(50, A.AugmentConfig(), torch.Generator().manual_seed(seed))
    a = A.action_from_params(p)
    assert a.shape == (50, 7) and a.dtype == torch.float32
    assert A.ACTION_LAYOUT == ("brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize")
    torch.testing.assert_close(a[:, :4], p.target_jitter - p.source_jitter)
    assert torch.equal(a[:, 4], p.grayscale.float()) and torch.equal(a[:, 5], p.blur.float())
    assert torch.equal(a[:, 6], p.solarize.float())
    # identical views: zero action, and the two rendered views are equal
    same = A.ViewParams.identity(3, out_size=8)
    same.source_jitter = same.target_jitter = torch.tensor([[1.2, 0.8, 1.1, 0.05]]).repeat(3, 1)
    assert torch.equal(A.action_from_params(same), torch.zeros(3, 7))
    imgs = (torch.rand(3, 3, 8, 8) * 255).to(torch.uint8)
    assert torch.equal(A.apply_view(imgs, same, "source"), A.apply_view(imgs, same, "target"))


def test_identity_view_is_the_normalised_image(seed):
    imgs = (torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    cfg = A.AugmentConfig(out_size=10)
    got = A.apply_view(imgs, A.ViewParams.identity(2, out_size=10), "source", cfg=cfg, backend="reference")
    want = R.normalize(imgs.float() * (1.0 / 255.0), cfg.mean, cfg.std, torch.float32)
    assert torch.equal(got, want)


# ---- geometry -------------------------------------------------------------------------------------------

def _params_with_crop(crop, flip, out_size):
    p = A.ViewParams.identity(crop.shape[0], out_size=out_size)
    p.crop, p.flip = crop, flip
    return p


def test_identity_crop_is_exact_and_full_crop_equals_antialiased_resize(seed):
    x = torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(seed))
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(3, 1)
    no = torch.zeros(3, dtype=torch.bool)
    same = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(A.crop_resize_flip(same, full, no, 16), same)
    for size in (9, 16, 37):  # down- and up-sampling
        got = A.crop_resize_flip(x, full, no, size)
        want = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sub_crop_equals_resize_of_the_slice(seed):
    x = torch.rand(2, 3, 30, 40, generator=torch.Generator().manual_seed(seed))
    boxes = [(3, 5, 20, 17), (0, 12, 30, 28)]  # top, left, h, w in pixels
    crop = torch.tensor([[t / 30, l / 40, h / 30, w / 40] for t, l, h, w in boxes])
    got = A.crop_resize_flip(x, crop, torch.tensor([False, True]), 12)
    for i, (t, l, h, w) in enumerate(boxes):
        want = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(12, 12), mode="bilinear", antialias=True)
        if i == 1:
            want = want.flip(-1)
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)


def test_flip_mirrors_and_is_shared_by_both_views(seed):
    imgs = (torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)
    flip = torch.tensor([True, False, True, False])
    geo = A.crop_resize_flip(imgs, full, flip, 12)
    x = imgs.float() / 255
    assert torch.allclose(geo[flip], x[flip].flip(-1), atol=1e-6)
    assert torch.allclose(geo[~flip], x[~flip], atol=1e-6)
    p = _params_with_crop(full, flip, 12)
    src, tgt = A.apply_view(imgs, p, "source"), A.apply_view(imgs, p, "target")
    assert torch.equal(src, tgt)  # identity photometric parameters: the geometry is the same


# ---- the training loop's draft API and errors -----------------------------------------------------------

def test_slice_to_and_render_views(seed):
    cfg = A.AugmentConfig(out_size=9)
    p = A.sample_view_params(8, cfg, A.generator_for_step(seed, 5))
    q = A.sample_view_params(8, cfg, A.generator_for_step(seed, 5))
    assert torch.equal(p.crop, q.crop) and torch.equal(p.source_jitter, q.source_jitter)
    part = p.slice(2, 5).to("cpu")
    assert len(part) == 3 and torch.equal(part.target_jitter, p.target_jitter[2:5])
    imgs = (torch.rand(3, 3, 9, 9) * 255).to(torch.uint8)
    src, tgt = A.render_views(imgs, part, cfg, backend="reference")
    assert torch.equal(tgt, A.apply_view(imgs, part, "target", cfg=cfg, geometry=False, backend="reference"))
    assert torch.equal(src, A.apply_view(imgs, part, "source", cfg=cfg, geometry=False, backend="reference"))


@pytest.mark.parametrize("field, value", [
    ("jitter_p", 1.5), ("grayscale_p", -0.1), ("hue", 0.6), ("brightness", -1.0), ("blur_sigma", (2.0, 1.0)),
    ("crop_scale", (0.0, 1.0)), ("crop_ratio", (2.0, 1.0)), ("out_size", 0), ("std", (1.0, 0.0, 1.0)),
    ("mean", (0.5, 0.5)), ("solarize_threshold", float("nan")), ("out_dtype", torch.int32),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        A.AugmentConfig(**{field: value})


@pytest.mark.parametrize("case, match", [
    ("channels", "images: expected 3 channels"), ("dtype", "images: dtype"), ("ndim", "images: expected 4-D"),
    ("cfg", "cfg: expected an AugmentConfig"),
])
def test_make_views_errors(case, match):
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    cfg = A.AugmentConfig(out_size=8)
    if case == "channels":
        imgs = torch.zeros(2, 4, 8, 8, dtype=torch.uint8)
    elif case == "dtype":
        imgs = imgs.to(torch.int32)
    elif case == "ndim":
        imgs = imgs[0]
    elif case == "cfg":
        cfg = {"out_size": 8}
    with pytest.raises((ValueError, TypeError), match=match):
        A.make_views(imgs, cfg, seed=0, step=0)


def test_apply_view_errors():
    imgs = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="params: parameters for 3 samples"):
        A.apply_view(imgs, A.ViewParams.identity(3, out_size=8))
    with pytest.raises(ValueError, match="which"):
        A.apply_view(imgs, A.ViewParams.identity(2, out_size=8), "middle")


# ---- one settings class: the config's augment section and AugmentConfig ---------------------------------

@pytest.mark.parametrize("field, text, value", [
    ("blur_sigma", "[0.1,150]", (0.1, 150.0)),      # the augment API took up to 256, the config 100
    ("crop_ratio", "[0.0001,1]", (1e-4, 1.0)),      # the augment API took any positive ratio
    ("solarize_threshold", "2", 2.0),               # the augment API took any finite threshold
    ("hue", "0.6", 0.6), ("flip_p", "1.5", 1.5), ("brightness", "-1", -1.0),
])
def test_config_and_augment_share_one_set_of_bounds(field, text, value):
    from iwm.augment_settings import AugmentSettings
    from iwm.config import AugmentConfigSection, ConfigError, load_config

    assert issubclass(AugmentConfigSection, AugmentSettings) and issubclass(A.AugmentConfig, AugmentSettings)
    with pytest.raises(ConfigError, match=rf"^augment\.{field}:"):
        load_config(None, [f"augment.{field}={text}"])
    with pytest.raises(ValueError, match=rf"^{field}:"):
        A.AugmentConfig(**{field: value})


def test_run_augment_config_carries_every_augment_setting():
    from dataclasses import fields

    from iwm.augment_settings import AugmentSettings
    from iwm.builders import augment_config
    from iwm.config import load_config

    cfg = load_config(None, ["augment.flip_p=0.25", "augment.crop_ratio=[0.5,2]", "augment.hue=0.3",
                             "data.crop_scale=[0.4,0.9]", "data.crop_size=96", "mask.patch_size=16"])
    got = augment_config(cfg)
    for f in fields(AugmentSettings):
        assert getattr(got, f.name) == getattr(cfg.augment, f.name), f.name
    assert got.out_size == 96 and got.crop_scale == (0.4, 0.9) and got.flip_p == 0.25

"""iwm_kernels.photometric / photometric_two_view: every backend against the reference chain."""
import pytest
import torch

import iwm_kernels
from iwm_kernels.photometric import (IMAGENET_MEAN, IMAGENET_STD, NUM_PARAMS, PARAM_SOLARIZE, blur_plan,
                                     pack_params, reference)
from tests.helpers import backends_on

BACKENDS = backends_on("cpu")
FAST = backends_on("cpu", include_reference=False)

# Normalised outputs (|x| <= ~2.7). fp32: the HSV round trip turns one-ulp differences (e.g. in the
# contrast mean, summed in another order) into a few 1e-6; bf16/fp16: one rounding of the output.
TOL = {torch.float32: (3e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 2e-3)}


def random_params(batch, gen, *, extremes=True, blur=True):
    """Random parameters with the extremes mixed in: hue +-0.5, saturation/contrast/brightness 0,
    solarise thresholds 0 and 1, blur on some images only."""
    u = lambda: torch.rand(batch, generator=gen)  # noqa: E731
    p = pack_params(batch, brightness=0.5 + u(), contrast=0.5 + u(), saturation=0.5 + u(), hue=u() - 0.5,
                    grayscale=(u() < 0.3).float(), blur_sigma=torch.where(u() < 0.4, 0.1 + 1.9 * u(), 0.0) if blur
                    else 0.0, solarize=(u() < 0.5).float(), solarize_threshold=u())
    if extremes and batch >= 4:
        p[0, 3] = 0.5
        p[1, 3] = -0.5
        p[2, 2] = 0.0
        p[3, 1] = 0.0
        p[batch - 1, 0] = 0.0
        p[0, 6], p[0, 7] = 1.0, 0.0
        p[1, 6], p[1, 7] = 1.0, 1.0
    return p


def make_images(shape, dtype, gen):
    x = torch.rand(shape, generator=gen)
    if dtype == torch.uint8:
        return (x * 255).round().to(torch.uint8)
    return x.to(dtype)


def assert_matches_reference(got, images, params, out_dtype, mean=IMAGENET_MEAN, std=IMAGENET_STD, tol=None,
                             equal_nan=False):
    """got [B, 3, H, W] against the reference view, ignoring pixels within 1e-5 of a solarise threshold
    (a discontinuity: an ulp either side flips the pixel)."""
    want = reference.photometric(images, params, mean, std, out_dtype)
    no_sol = params.clone()
    no_sol[:, PARAM_SOLARIZE] = 0
    pre = reference.photometric_unnormalized(images, no_sol)
    thr = params[:, 7].reshape(-1, 1, 1, 1)
    near = ((pre - thr).abs() < 1e-5) & (params[:, 6].reshape(-1, 1, 1, 1) != 0)
    atol, rtol = tol or TOL[out_dtype]
    assert got.dtype == out_dtype and got.shape == want.shape
    torch.testing.assert_close(got[~near].float(), want[~near].float(), atol=atol, rtol=rtol, equal_nan=equal_nan)
    assert near.float().mean() < 0.25  # the comparison is not vacuous


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_two_view_against_reference(backend, in_dtype, out_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    images = make_images((5, 3, 13, 17), in_dtype, gen)  # odd H and W
    ps, pt = random_params(5, gen), random_params(5, gen, blur=False)
    src, tgt = iwm_kernels.photometric_two_view(images, ps, pt, out_dtype=out_dtype, backend=backend)
    assert_matches_reference(src, images, ps, out_dtype)
    assert_matches_reference(tgt, images, pt, out_dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_one_view_half_inputs_and_fp16_output(backend, in_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    images = make_images((4, 3, 7, 9), in_dtype, gen)
    p = random_params(4, gen)
    got = iwm_kernels.photometric(images, p, out_dtype=torch.float16, backend=backend)
    assert_matches_reference(got, images, p, torch.float16)


@pytest.mark.parametrize("backend", FAST)
def test_blur_on_both_views_large_sigma_and_tiny_images(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    for shape in [(3, 3, 1, 1), (3, 3, 2, 5)]:  # reflect padding folds many times
        images = make_images(shape, torch.uint8, gen)
        ps = random_params(3, gen, extremes=False)
        pt = random_params(3, gen, extremes=False)
        ps[:, 5] = torch.tensor([0.0, 3.0, 4.0])
        pt[:, 5] = torch.tensor([1.0, 0.0, 0.4])
        src, tgt = iwm_kernels.photometric_two_view(images, ps, pt, backend=backend)
        assert_matches_reference(src, images, ps, torch.float32)
        assert_matches_reference(tgt, images, pt, torch.float32)


@pytest.mark.parametrize("backend", FAST)
def test_every_image_blurred_with_custom_normalisation(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    images = make_images((3, 3, 11, 8), torch.float32, gen)
    p = random_params(3, gen)
    p[:, 5] = torch.tensor([0.1, 2.0, 1.3])
    mean, std = (0.5, 0.25, 0.0), (0.5, 2.0, 1.0)
    got = iwm_kernels.photometric(images, p, mean=mean, std=std, backend=backend)
    assert_matches_reference(got, images, p, torch.float32, mean, std)


@pytest.mark.parametrize("backend", FAST)
def test_solarise_threshold_edges_exact(backend):
    # float pixels exactly at / just under the threshold, identity jitter: >= is inclusive
    half_below = 0.5 - 2.0 ** -24
    row = torch.tensor([0.0, half_below, 0.5, 0.75, 1.0])
    images = row.reshape(1, 1, 1, 5).expand(3, 3, 1, 5).contiguous()
    p = pack_params(3, solarize=1.0, solarize_threshold=torch.tensor([0.5, 0.0, 1.0]))
    got = iwm_kernels.photometric(images, p, mean=(0, 0, 0), std=(1, 1, 1), backend=backend)
    assert got[0, 0, 0].tolist() == [0.0, half_below, 0.5, 0.25, 0.0]
    assert got[1, 0, 0].tolist() == [1.0, 1 - half_below, 0.5, 0.25, 0.0]
    assert got[2, 0, 0].tolist() == [0.0, half_below, 0.5, 0.75, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_params_give_the_normalised_image_exactly(backend, seed):
    images = make_images((2, 3, 5, 6), torch.uint8, torch.Generator().manual_seed(seed))
    got = iwm_kernels.photometric(images, pack_params(2), mean=(0, 0, 0), std=(1, 1, 1), backend=backend)
    assert torch.equal(got, images.float() * (1.0 / 255.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    images = torch.zeros(0, 3, 4, 4, dtype=torch.uint8)
    src, tgt = iwm_kernels.photometric_two_view(images, pack_params(0), pack_params(0), backend=backend)
    assert src.shape == (0, 3, 4, 4) and tgt.shape == (0, 3, 4, 4)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_pixels_match_reference(backend, in_dtype, out_dtype, seed):
    """NaN propagates as in torch (the reference): a NaN pixel makes its image's contrast mean NaN, so the
    whole image comes out NaN on every backend (not clamped to 0 on some); +-inf pixels are clamped like
    any other value (0 * inf, brightness 0, is NaN). The other images are untouched."""
    gen = torch.Generator().manual_seed(seed)
    batch, h, w = 6, 7, 9
    images = make_images((batch, 3, h, w), in_dtype, gen)
    flat = images.view(batch, -1)
    for b, value in [(0, float("nan")), (1, float("inf")), (2, float("-inf")), (3, float("nan"))]:
        where = torch.randint(0, 3 * h * w, (2,), generator=gen)
        flat[b, where] = value
    flat[3, int(torch.randint(0, 3 * h * w, (1,), generator=gen))] = float("inf")
    params = random_params(batch, gen)
    params[0, 3] = 0.3                     # the NaN image through the hue path
    params[3, 5] = 1.5                     # and through the blur
    params[1, 0], params[2, 0] = 0.0, 1.3  # 0 * inf: NaN; -inf * 1.3: clamped to 0
    got = iwm_kernels.photometric(images, params, out_dtype=out_dtype, backend=backend)
    assert_matches_reference(got, images, params, out_dtype, equal_nan=True)
    assert got[0].isnan().all() and got[1].isnan().all() and got[3].isnan().all()
    assert not got[2].isnan().any() and not got[4:].isnan().any()


def test_blur_plan():
    ps = pack_params(3, blur_sigma=torch.tensor([0.0, 2.0, 0.5]))
    pt = pack_params(3, blur_sigma=torch.tensor([1.0, 0.0, 0.0]))
    plan = blur_plan(torch.stack([ps, pt]))
    assert plan.slot_of.tolist() == [-1, 0, 1, 2, -1, -1]
    assert plan.slot_row.tolist() == [1, 2, 3]
    assert plan.taps.shape == (3, 13)  # common window: ceil(3 * 2.0) = 6 taps each side
    torch.testing.assert_close(plan.taps.sum(1), torch.ones(3))


@pytest.mark.parametrize("on_cuda", [True, False])
def test_triton_launch_grids_fit_cuda_limits(on_cuda):
    """CUDA allows 2^31 - 1 blocks on grid x but 65535 on y and z: a (B, chunks) grid broke above 8192 x 8192
    pixels. Every grid is 1-D now and covers its work exactly, for any image that fits in memory."""
    triton_kernels = pytest.importorskip("iwm_kernels.photometric.triton_kernels")
    from iwm_kernels._validate import MAX_GRID_X

    for batch, h, w in [(1, 8193, 8193), (1, 65536, 65536), (1, 1, 2**31 + 7), (2**31 // 4, 1, 1),
                        (4096, 224, 224), (3, 13, 17), (1, 1, 1)]:
        for slots in (0, 1, 2 * batch):
            g = triton_kernels.launch_grids(batch, h, w, slots, on_cuda)
            assert len(g.pixels) == 1 and 0 < g.pixels[0] <= MAX_GRID_X
            assert g.n_chunks * g.block >= h * w > (g.n_chunks - 1) * g.block
            assert g.pixels[0] == batch * g.n_chunks
            if slots:
                n_row_blocks = -(-(slots * 3 * h) // g.block_r)
                assert len(g.blur) == 1 and 0 < g.blur[0] <= MAX_GRID_X
                assert g.blur[0] == n_row_blocks * -(-w // g.block_w)
            else:
                assert g.blur == ()
    with pytest.raises(ValueError, match="images: too large for one kernel launch"):
        triton_kernels.launch_grids(2**40, 64, 64, 0, on_cuda)


@pytest.mark.slow
def test_triton_many_tiles_against_reference(seed):
    """Dozens of (image, chunk) tiles and of blur tiles per launch under the interpreter (ragged edges in
    both directions), against the reference."""
    if "triton" not in FAST:
        pytest.skip("triton not available")
    gen = torch.Generator().manual_seed(seed)
    images = make_images((2, 3, 37, 75), torch.uint8, gen)
    ps, pt = random_params(2, gen, extremes=False), random_params(2, gen, extremes=False, blur=False)
    ps[:, 5] = torch.tensor([0.0, 1.2])
    src, tgt = iwm_kernels.photometric_two_view(images, ps, pt, backend="triton")
    assert_matches_reference(src, images, ps, torch.float32)
    assert_matches_reference(tgt, images, pt, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_through_custom_op(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    images = make_images((3, 3, 6, 7), torch.uint8, gen)
    ps, pt = random_params(3, gen, extremes=False), random_params(3, gen, extremes=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def views(x, a, b):
        s, t = iwm_kernels.photometric_two_view(x, a, b, backend=backend)
        return s * 2, t + 1

    s, t = views(images, ps, pt)
    assert_matches_reference(s / 2, images, ps, torch.float32)
    assert_matches_reference(t - 1, images, pt, torch.float32)


# ---- errors: every one names the offending argument ------------------------------------------------

@pytest.mark.parametrize("case, match", [
    ("img_dtype", "images: dtype int32"),
    ("img_ndim", "images: expected 4-D"),
    ("img_channels", "images: expected 3 channels"),
    ("img_noncontig", "images: must be contiguous"),
    ("params_shape", r"params: expected shape \(2, 8\)"),
    ("params_dtype", "params: dtype float64"),
    ("hue", r"params: column 3 \(hue\) must be within \[-0.5, 0.5\]"),
    ("flag", r"params: column 4 \(grayscale\) must be 0 or 1"),
    ("sigma", r"params: column 5 \(blur_sigma\)"),
    ("nan", r"params: column 1 \(contrast\) is not finite"),
    ("negative", r"params: column 0 \(brightness\)"),
    ("mean", "mean: expected 3 numbers"),
    ("std", "std: values must be positive"),
    ("out_dtype", "out_dtype: expected one of"),
])
def test_errors_name_the_argument(case, match):
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    params = pack_params(2)
    kwargs = {}
    if case == "img_dtype":
        images = images.to(torch.int32)
    elif case == "img_ndim":
        images = images[0]
    elif case == "img_channels":
        images = torch.zeros(2, 4, 4, 4, dtype=torch.uint8)
    elif case == "img_noncontig":
        images = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    elif case == "params_shape":
        params = torch.ones(2, NUM_PARAMS - 1)
    elif case == "params_dtype":
        params = params.double()
    elif case == "hue":
        params[1, 3] = 0.7
    elif case == "flag":
        params[0, 4] = 0.5
    elif case == "sigma":
        params[0, 5] = -1.0
    elif case == "nan":
        params[1, 1] = float("nan")
    elif case == "negative":
        params[0, 0] = -0.5
    elif case == "mean":
        kwargs["mean"] = (0.5, 0.5)
    elif case == "std":
        kwargs["std"] = (0.5, 0.0, 0.5)
    elif case == "out_dtype":
        kwargs["out_dtype"] = torch.int64
    with pytest.raises((ValueError, TypeError), match=match):
        iwm_kernels.photometric(images, params, **kwargs)


def test_two_view_errors_name_the_view():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    bad = pack_params(2)
    bad[0, 3] = 1.0
    with pytest.raises(ValueError, match="target_params: column 3"):
        iwm_kernels.photometric_two_view(images, pack_params(2), bad)
    with pytest.raises(ValueError, match="source_params: expected shape"):
        iwm_kernels.photometric_two_view(images, pack_params(3), pack_params(2))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        iwm_kernels.photometric(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), pack_params(1), backend="fast")


# ---- GPU ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params_on", ["cpu", "cuda"])
def test_cuda_against_reference(backend, out_dtype, params_on, seed):
    gen = torch.Generator().manual_seed(seed)
    images = make_images((16, 3, 224, 224), torch.uint8, gen)
    ps, pt = random_params(16, gen), random_params(16, gen, blur=False)
    src, tgt = iwm_kernels.photometric_two_view(images.cuda(), ps.to(params_on), pt.to(params_on),
                                                out_dtype=out_dtype, backend=backend)
    # GPU division and FMA contraction round differently from the CPU reference: looser fp32 tolerance.
    tol = (1e-4, 1e-5) if out_dtype == torch.float32 else None
    assert_matches_reference(src.cpu(), images, ps, out_dtype, tol=tol)
    assert_matches_reference(tgt.cpu(), images, pt, out_dtype, tol=tol)

"""Triton photometric augmentation (imported only when the triton backend runs).

Launches, for V views of B images of H x W pixels:
  _gray_partial_kernel   (image, chunk) tiles: per view, partial sums of gray(brightness(x)) per chunk,
                         added up per (view, image) by one torch sum (a fixed order: deterministic)
  _photometric_kernel    (image, chunk) tiles: read a chunk of RGB once, every view's chain, write each view
                         (or, for a blurred (view, image) pair, its pre-blur fp32 image to a scratch slot)
  _blur_rows_kernel      (row block, col block) tiles of the slots * 3 * H rows: horizontal taps, scratch -> tmp
  _blur_cols_kernel      (same tiles): vertical taps, solarise, normalise -> output
Every grid is 1-D, its tiles numbered row-major: CUDA allows 2^31 - 1 blocks on grid x but only 65535 on
y and z, a limit a (B, chunks) grid broke above 8192 x 8192 pixels (`launch_grids` computes them). The blur
launches run only when some pair blurs. Arithmetic is fp32 throughout; pixel offsets are int64, so images
past 2^31 pixels work.

NaN pixels propagate as in torch and the reference (min/max/clamp with NaN give NaN): a NaN makes the
contrast mean NaN, hence its whole image, instead of being silently clamped to 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .._validate import check_grid_x
from .reference import NUM_PARAMS

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _clamp01(x):
    # torch.clamp's NaN semantics (the reference's): NaN stays NaN.
    return tl.minimum(tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max3(a, b, c):
    return tl.maximum(tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL), c, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min3(a, b, c):
    return tl.minimum(tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL), c, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_rgb(img_ptr, base, HW, offs, mask, IS_UINT8: tl.constexpr):
    r = tl.load(img_ptr + base + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(img_ptr + base + HW + offs, mask=mask, other=0).to(tl.float32)
    b = tl.load(img_ptr + base + 2 * HW + offs, mask=mask, other=0).to(tl.float32)
    if IS_UINT8:
        r = r * (1.0 / 255.0)
        g = g * (1.0 / 255.0)
        b = b * (1.0 / 255.0)
    return r, g, b


@triton.jit
def _gray(r, g, b):
    return 0.299 * r + 0.587 * g + 0.114 * b


@triton.jit
def _adjust_hue(r, g, b, shift):
    # torchvision's RGB -> HSV -> RGB, hue rotated by `shift` with wrap-around; shift 0 leaves x as is.
    maxc = _max3(r, g, b)
    minc = _min3(r, g, b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    d = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / d
    gc = (maxc - g) / d
    bc = (maxc - b) / d
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = h * (1.0 / 6.0) + 1.0
    h = tl.where(h >= 1.0, h - 1.0, h)  # fmod(h, 1) for h in [5/6, 11/6]
    h = h + shift
    h = tl.where(h < 0.0, h + 1.0, tl.where(h >= 1.0, h - 1.0, h))  # (h + shift) mod 1
    h6 = h * 6.0
    h6 = tl.where(h6 >= 0.0, h6, 0.0)  # only a NaN fails; any sector then gives NaN (maxc, p, q, t are NaN)
    i = h6.to(tl.int32)  # h6 >= 0: truncation is floor
    f = h6 - i.to(tl.float32)
    i = tl.where(i >= 6, i - 6, i)
    p = _clamp01(maxc * (1.0 - s))
    q = _clamp01(maxc * (1.0 - s * f))
    t = _clamp01(maxc * (1.0 - s * (1.0 - f)))
    # (R, G, B) per sector 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    ro = tl.where((i == 0) | (i == 5), maxc, tl.where(i == 1, q, tl.where(i == 4, t, p)))
    go = tl.where(i == 0, t, tl.where((i == 1) | (i == 2), maxc, tl.where(i == 3, q, p)))
    bo = tl.where(i <= 1, p, tl.where(i == 2, t, tl.where(i == 5, q, maxc)))
    on = shift != 0.0
    return tl.where(on, ro, r), tl.where(on, go, g), tl.where(on, bo, b)


@triton.jit
def _reflect(i, n):
    # torch's "reflect" padding (edge pixel not repeated), folded as often as needed.
    period = tl.maximum(2 * (n - 1), 1)
    m = i % period
    m = tl.where(m < 0, m + period, m)
    return tl.where(m > n - 1, period - m, m)


@triton.jit
def _pixel_tile(n_chunks, HW, BLOCK: tl.constexpr):
    """(image, chunk, pixel offsets, mask) of this program's (image, chunk) tile; int64 throughout."""
    tile = tl.program_id(0).to(tl.int64)
    chunk = tile % n_chunks
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return tile // n_chunks, chunk, offs, offs < HW


@triton.jit
def _gray_partial_kernel(img_ptr, params_ptr, partial_ptr, B, HW, n_chunks,
                         V: tl.constexpr, NP: tl.constexpr, IS_UINT8: tl.constexpr, BLOCK: tl.constexpr):
    b, chunk, offs, mask = _pixel_tile(n_chunks, HW, BLOCK)
    base = b * 3 * HW
    r, g, bl = _load_rgb(img_ptr, base, HW, offs, mask, IS_UINT8)
    for v in tl.static_range(V):
        row = v * B + b
        bright = tl.load(params_ptr + row * NP + 0)
        gray = _gray(_clamp01(bright * r), _clamp01(bright * g), _clamp01(bright * bl))
        gray = tl.where(mask, gray, 0.0)
        tl.store(partial_ptr + row * n_chunks + chunk, tl.sum(gray, axis=0))


@triton.jit
def _photometric_kernel(img_ptr, params_ptr, gmean_ptr, slot_ptr, out_ptr, scratch_ptr,
                        B, HW, n_chunks, mean0, mean1, mean2, std0, std1, std2,
                        V: tl.constexpr, NP: tl.constexpr, IS_UINT8: tl.constexpr, OUT_DTYPE: tl.constexpr,
                        BLOCK: tl.constexpr):
    b, _, offs, mask = _pixel_tile(n_chunks, HW, BLOCK)
    r, g, bl = _load_rgb(img_ptr, b * 3 * HW, HW, offs, mask, IS_UINT8)
    for v in tl.static_range(V):
        row = v * B + b
        pp = params_ptr + row * NP
        bright = tl.load(pp + 0)
        contrast = tl.load(pp + 1)
        sat = tl.load(pp + 2)
        hue = tl.load(pp + 3)
        to_gray = tl.load(pp + 4)
        solar = tl.load(pp + 6)
        thr = tl.load(pp + 7)
        gmean = tl.load(gmean_ptr + row)
        # brightness (blend with black)
        x0 = _clamp01(bright * r)
        x1 = _clamp01(bright * g)
        x2 = _clamp01(bright * bl)
        # contrast (blend with the mean gray value)
        k = (1.0 - contrast) * gmean
        x0 = _clamp01(contrast * x0 + k)
        x1 = _clamp01(contrast * x1 + k)
        x2 = _clamp01(contrast * x2 + k)
        # saturation (blend with the gray image)
        gk = (1.0 - sat) * _gray(x0, x1, x2)
        x0 = _clamp01(sat * x0 + gk)
        x1 = _clamp01(sat * x1 + gk)
        x2 = _clamp01(sat * x2 + gk)
        x0, x1, x2 = _adjust_hue(x0, x1, x2, hue)
        gy = _gray(x0, x1, x2)
        is_gray = to_gray != 0.0
        x0 = tl.where(is_gray, gy, x0)
        x1 = tl.where(is_gray, gy, x1)
        x2 = tl.where(is_gray, gy, x2)
        slot = tl.load(slot_ptr + row) + tl.zeros([BLOCK], dtype=tl.int32)  # as a block: masks need one
        # blurred pair: park the pre-blur image in its scratch slot; the blur passes finish it
        smask = mask & (slot >= 0)
        sbase = tl.maximum(tl.load(slot_ptr + row), 0).to(tl.int64) * 3 * HW
        tl.store(scratch_ptr + sbase + offs, x0, mask=smask)
        tl.store(scratch_ptr + sbase + HW + offs, x1, mask=smask)
        tl.store(scratch_ptr + sbase + 2 * HW + offs, x2, mask=smask)
        # solarise, normalise, write
        thr = tl.where(solar != 0.0, thr, float("inf"))  # no solarise: nothing reaches the threshold
        x0 = tl.where(x0 >= thr, 1.0 - x0, x0)
        x1 = tl.where(x1 >= thr, 1.0 - x1, x1)
        x2 = tl.where(x2 >= thr, 1.0 - x2, x2)
        omask = mask & (slot < 0)
        obase = row * 3 * HW
        tl.store(out_ptr + obase + offs, ((x0 - mean0) / std0).to(OUT_DTYPE), mask=omask)
        tl.store(out_ptr + obase + HW + offs, ((x1 - mean1) / std1).to(OUT_DTYPE), mask=omask)
        tl.store(out_ptr + obase + 2 * HW + offs, ((x2 - mean2) / std2).to(OUT_DTYPE), mask=omask)


@triton.jit
def _blur_tile(n_rows, W, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """(rows, row mask, cols, mask) of this program's tile: BLOCK_R image rows (row = slot * 3 * H + c * H
    + y, clamped to 0 past n_rows) x BLOCK_W columns."""
    tile = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(W, BLOCK_W)
    rows = (tile // n_col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_rows
    rows = tl.where(rmask, rows, 0)
    cols = (tile % n_col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W).to(tl.int64)
    return rows, rmask, cols, rmask[:, None] & (cols < W)[None, :]


@triton.jit
def _blur_rows_kernel(src_ptr, dst_ptr, taps_ptr, n_rows, H, W, K, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    rows, rmask, cols, mask = _blur_tile(n_rows, W, BLOCK_R, BLOCK_W)
    slot = rows // (3 * H)
    radius = (K - 1) // 2
    base = rows[:, None] * W
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for k in range(0, K):
        w = tl.load(taps_ptr + slot * K + k, mask=rmask, other=0.0)
        idx = _reflect(cols + (k - radius), W)
        acc += w[:, None] * tl.load(src_ptr + base + idx[None, :], mask=mask, other=0.0)
    tl.store(dst_ptr + base + cols[None, :], acc, mask=mask)


@triton.jit
def _blur_cols_kernel(src_ptr, out_ptr, taps_ptr, slot_row_ptr, params_ptr, n_rows, H, W, K,
                      mean0, mean1, mean2, std0, std1, std2,
                      NP: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    rows, rmask, cols, mask = _blur_tile(n_rows, W, BLOCK_R, BLOCK_W)
    slot = rows // (3 * H)
    c = (rows // H) % 3
    y = rows % H
    radius = (K - 1) // 2
    plane = (slot * 3 + c) * H * W
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for k in range(0, K):
        w = tl.load(taps_ptr + slot * K + k, mask=rmask, other=0.0)
        yy = _reflect(y + (k - radius), H)
        src = src_ptr + (plane + yy * W)[:, None] + cols[None, :]
        acc += w[:, None] * tl.load(src, mask=mask, other=0.0)
    prow = tl.load(slot_row_ptr + slot, mask=rmask, other=0)  # the (view, image) pair: v * B + b
    solar = tl.load(params_ptr + prow * NP + 6, mask=rmask, other=0.0)
    thr = tl.load(params_ptr + prow * NP + 7, mask=rmask, other=0.0)
    thr = tl.where(solar != 0.0, thr, float("inf"))  # no solarise: nothing reaches the threshold
    x = tl.where(acc >= thr[:, None], 1.0 - acc, acc)
    m = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))
    s = tl.where(c == 0, std0, tl.where(c == 1, std1, std2))
    out = out_ptr + ((prow.to(tl.int64) * 3 + c) * H * W + y * W)[:, None] + cols[None, :]
    tl.store(out, ((x - m[:, None]) / s[:, None]).to(OUT_DTYPE), mask=mask)


@dataclass(frozen=True)
class LaunchGrids:
    """Block sizes and 1-D grids of one photometric call (`launch_grids`)."""
    block: int        # pixels per (image, chunk) tile
    n_chunks: int     # chunks per image
    pixels: tuple     # grid of the gray-partial and photometric kernels
    block_r: int      # image rows per blur tile
    block_w: int      # columns per blur tile
    blur: tuple       # grid of both blur kernels (empty when nothing blurs)


def launch_grids(batch: int, height: int, width: int, num_slots: int, on_cuda: bool) -> LaunchGrids:
    """Every launch's grid, each within CUDA's limits (a ValueError naming `images` past them)."""
    # Small blocks under the interpreter so tests cover several chunks and ragged tails.
    block = 1024 if on_cuda else 64
    n_chunks = triton.cdiv(height * width, block)
    block_w = min(256, triton.next_power_of_2(width)) if on_cuda else 16
    block_r = max(1, 1024 // block_w) if on_cuda else 8
    pixels = check_grid_x(batch * n_chunks, "images")
    blur = (check_grid_x(triton.cdiv(num_slots * 3 * height, block_r) * triton.cdiv(width, block_w), "images")
            if num_slots else ())
    return LaunchGrids(block, n_chunks, pixels, block_r, block_w, blur)


def photometric_views(images: torch.Tensor, params: torch.Tensor, plan, mean: Sequence[float],
                      std: Sequence[float], out_dtype: torch.dtype) -> torch.Tensor:
    """images [B, 3, H, W] (contiguous), params [V, B, NUM_PARAMS] on images' device -> [V, B, 3, H, W]."""
    device = images.device
    V, B = params.shape[0], params.shape[1]
    H, W = images.shape[2], images.shape[3]
    HW = H * W
    out = torch.empty((V, B, 3, H, W), dtype=out_dtype, device=device)
    if B == 0:
        return out
    params = params.to(torch.float32).contiguous()
    nb = plan.num_slots
    grids = launch_grids(B, H, W, nb, device.type == "cuda")
    block, n_chunks = grids.block, grids.n_chunks
    partial = torch.empty((V * B, n_chunks), dtype=torch.float32, device=device)
    is_uint8 = images.dtype == torch.uint8
    _gray_partial_kernel[grids.pixels](images, params, partial, B, HW, n_chunks,
                                       V=V, NP=NUM_PARAMS, IS_UINT8=is_uint8, BLOCK=block, num_warps=4)
    # Summed apart, not by every program of the next kernel: that re-read all n_chunks partials per
    # program (work quadratic in the image size) and needed them in one block (a tensor-size limit).
    gray_mean = partial.sum(dim=1) / HW
    slot_of = plan.slot_of.to(device)
    scratch = torch.empty((max(nb, 1) * 3 * HW if nb else 1,), dtype=torch.float32, device=device)
    m0, m1, m2 = (float(v) for v in mean)
    s0, s1, s2 = (float(v) for v in std)
    _photometric_kernel[grids.pixels](images, params, gray_mean, slot_of, out, scratch, B, HW, n_chunks,
                                      m0, m1, m2, s0, s1, s2, V=V, NP=NUM_PARAMS, IS_UINT8=is_uint8,
                                      OUT_DTYPE=_TL_DTYPE[out_dtype], BLOCK=block, num_warps=4)
    if nb:
        taps = plan.taps.to(device=device, dtype=torch.float32).contiguous()
        K = int(taps.shape[1])
        tmp = torch.empty_like(scratch)
        n_rows = nb * 3 * H
        _blur_rows_kernel[grids.blur](scratch, tmp, taps, n_rows, H, W, K, BLOCK_R=grids.block_r,
                                      BLOCK_W=grids.block_w, num_warps=4)
        _blur_cols_kernel[grids.blur](tmp, out, taps, plan.slot_row.to(device), params, n_rows, H, W, K,
                                      m0, m1, m2, s0, s1, s2, NP=NUM_PARAMS, OUT_DTYPE=_TL_DTYPE[out_dtype],
                                      BLOCK_R=grids.block_r, BLOCK_W=grids.block_w, num_warps=4)
    return out

"""Triton gather: one fused forward kernel, and a backward of two kernels (layer-norm backward per
selected row, then a deterministic segment sum).

Imported only when the triton backend runs, so `import iwm_kernels` never needs triton.

Forward: each program takes ROWS selected rows; a row finds its sample by a branch-free binary search
over `cu_seqlens` (or `row // K` for a rectangular index), loads x[b, i] (+ pos[i]) (+ bias[b]) in
fp32, normalises it when asked and stores it once. Rows up to MAX_FUSED_D features stay in registers;
wider rows are streamed in BLOCK_D chunks (two extra passes when normalising).

Backward, and why it sums without atomics. The gradient of a gather is a scatter-add: every selected
row adds into dx[b, i], dpos[i] and dbias[b], and rows that repeat a destination collide (always for
dpos and for a shared [1, N, D] x: every sample of the batch hits the same N rows). Atomics would need
an fp32 buffer zero-filled and converted afterwards (three passes over dx for bf16), make the sums
depend on timing (run-to-run differences in the last bits) and serialise on the hot rows. Instead the
rows are listed per destination (a CSR: offsets, plus a stable permutation when the keys are not
already sorted; the sampler's indices are, so that case needs no sort at all), and one program per
destination row sums its sources in a fixed order and writes the row exactly once, zeros included,
so dx needs no zero fill and the result is bitwise reproducible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._validate import check_grid_x
from .reference import accumulate_dtype

MAX_FUSED_D = 8192   # widest row kept whole in registers
SUM_ROWS = 8         # source rows loaded together by the segment-sum kernel

_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _row_sample(rows, cu_ptr, row_len, num_seqs, RECT: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Sample of each row: row // row_len, or the largest s with cu[s] <= row (binary search)."""
    if RECT:
        sample = rows // row_len
    else:
        sample = tl.zeros_like(rows)  # invariant: cu[sample] <= row < cu[hi]
        hi = tl.zeros_like(rows) + num_seqs
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (sample + hi) // 2
            start = tl.load(cu_ptr + mid).to(tl.int64)
            right = start <= rows
            sample = tl.where(right, mid, sample)
            hi = tl.where(right, hi, mid)
    return sample


@triton.jit
def _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask,
               HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    v = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_POS:
        v += tl.load(pos_ptr + pos_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        v += tl.load(bias_ptr + bias_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    return v


@triton.jit
def _row_addresses(idx_ptr, cu_ptr, T, row_len, num_seqs, stride_xb, stride_xn, stride_pn, stride_bb,
                   RECT: tl.constexpr, X_BATCHED: tl.constexpr, SEARCH_STEPS: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < T
    tok = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    b = _row_sample(rows, cu_ptr, row_len, num_seqs, RECT, SEARCH_STEPS)
    if X_BATCHED:
        x_row = b * stride_xb + tok * stride_xn
    else:
        x_row = tok * stride_xn
    return rows, row_ok, x_row, tok * stride_pn, b * stride_bb


@triton.jit
def _row_moments(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, row_ok, D,
                 HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean and 1/sqrt(var + eps) inputs of rows wider than one block (two streamed passes)."""
    total = tl.zeros([ROWS], ACC)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        v = _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask, HAS_POS, HAS_BIAS, ACC)
        total += tl.sum(v, axis=1)
    mean = total / D
    sq = tl.zeros([ROWS], ACC)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        v = _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask, HAS_POS, HAS_BIAS, ACC)
        c = tl.where(mask, v - mean[:, None], 0.0)
        sq += tl.sum(c * c, axis=1)
    return mean, sq / D


@triton.jit
def _whole_row(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, row_ok, D, eps, HAS_POS: tl.constexpr,
               HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows that fit one BLOCK_D chunk: (cols, mask, v, rstd), v = x (+ pos) (+ bias), layer-normed with
    NORMALIZE (rstd is 0 without)."""
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    v = _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask, HAS_POS, HAS_BIAS, ACC)
    if NORMALIZE:
        mean = tl.sum(v, axis=1) / D
        c = tl.where(mask, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=1) / D + eps)
        v = c * rstd[:, None]
    else:
        rstd = tl.zeros([ROWS], dtype=ACC)
    return cols, mask, v, rstd


@triton.jit
def _gather_fwd_kernel(x_ptr, idx_ptr, cu_ptr, pos_ptr, bias_ptr, out_ptr,
                       T, D, row_len, num_seqs, stride_xb, stride_xn, stride_pn, stride_bb, eps,
                       RECT: tl.constexpr, X_BATCHED: tl.constexpr, HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       NORMALIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_D: tl.constexpr, WHOLE_ROW: tl.constexpr, ACC: tl.constexpr):
    rows, row_ok, x_row, pos_row, bias_row = _row_addresses(
        idx_ptr, cu_ptr, T, row_len, num_seqs, stride_xb, stride_xn, stride_pn, stride_bb,
        RECT, X_BATCHED, SEARCH_STEPS, ROWS)
    out_row = rows * D
    if WHOLE_ROW:
        cols, mask, v, rstd = _whole_row(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, row_ok, D, eps,
                                         HAS_POS, HAS_BIAS, NORMALIZE, ACC, ROWS, BLOCK_D)
        tl.store(out_ptr + out_row[:, None] + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if NORMALIZE:
            mean, var = _row_moments(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, row_ok, D,
                                     HAS_POS, HAS_BIAS, ACC, ROWS, BLOCK_D)
            rstd = 1.0 / tl.sqrt(var + eps)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            v = _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask, HAS_POS, HAS_BIAS, ACC)
            if NORMALIZE:
                v = (v - mean[:, None]) * rstd[:, None]
            tl.store(out_ptr + out_row[:, None] + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(x_ptr, idx_ptr, cu_ptr, pos_ptr, bias_ptr, dy_ptr, ds_ptr,
                     T, D, row_len, num_seqs, stride_xb, stride_xn, stride_pn, stride_bb, eps,
                     RECT: tl.constexpr, X_BATCHED: tl.constexpr, HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SEARCH_STEPS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                     WHOLE_ROW: tl.constexpr, ACC: tl.constexpr):
    """ds = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)), the row statistics recomputed from x."""
    rows, row_ok, x_row, pos_row, bias_row = _row_addresses(
        idx_ptr, cu_ptr, T, row_len, num_seqs, stride_xb, stride_xn, stride_pn, stride_bb,
        RECT, X_BATCHED, SEARCH_STEPS, ROWS)
    out_row = rows * D
    if WHOLE_ROW:
        cols, mask, xhat, rstd = _whole_row(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, row_ok, D, eps,
                                            HAS_POS, HAS_BIAS, True, ACC, ROWS, BLOCK_D)
        dy = tl.load(dy_ptr + out_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean_dy = tl.sum(dy, axis=1) / D
        mean_dyx = tl.sum(dy * xhat, axis=1) / D
        ds = (dy - mean_dy[:, None] - xhat * mean_dyx[:, None]) * rstd[:, None]
        tl.store(ds_ptr + out_row[:, None] + cols[None, :], ds, mask=mask)
    else:
        mean, var = _row_moments(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, row_ok, D,
                                 HAS_POS, HAS_BIAS, ACC, ROWS, BLOCK_D)
        rstd = 1.0 / tl.sqrt(var + eps)
        sum_dy = tl.zeros([ROWS], ACC)
        sum_dyx = tl.zeros([ROWS], ACC)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            v = _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask, HAS_POS, HAS_BIAS, ACC)
            xhat = tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(dy_ptr + out_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            sum_dy += tl.sum(dy, axis=1)
            sum_dyx += tl.sum(dy * xhat, axis=1)
        mean_dy = sum_dy / D
        mean_dyx = sum_dyx / D
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            v = _row_chunk(x_ptr, pos_ptr, bias_ptr, x_row, pos_row, bias_row, cols, mask, HAS_POS, HAS_BIAS, ACC)
            xhat = (v - mean[:, None]) * rstd[:, None]
            dy = tl.load(dy_ptr + out_row[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
            ds = (dy - mean_dy[:, None] - xhat * mean_dyx[:, None]) * rstd[:, None]
            tl.store(ds_ptr + out_row[:, None] + cols[None, :], ds, mask=mask)


@triton.jit
def _segment_sum_kernel(src_ptr, perm_ptr, offs_ptr, out_ptr, D,
                        HAS_PERM: tl.constexpr, SUM_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[d] = sum of src[perm[j]] (or src[j]) for j in [offs[d], offs[d+1]); every out row written.
    One program per (destination row, column block), numbered row-major on a 1-D grid."""
    tile = tl.program_id(0).to(tl.int64)
    n_col_blocks = tl.cdiv(D, BLOCK_D)
    dest = tile // n_col_blocks
    cols = (tile % n_col_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    first = tl.load(offs_ptr + dest).to(tl.int64)
    last = tl.load(offs_ptr + dest + 1).to(tl.int64)
    acc = tl.zeros([SUM_ROWS, BLOCK_D], ACC)
    for j0 in range(first, last, SUM_ROWS):
        j = j0 + tl.arange(0, SUM_ROWS).to(tl.int64)
        j_ok = j < last
        if HAS_PERM:
            src_row = tl.load(perm_ptr + j, mask=j_ok, other=0).to(tl.int64)
        else:
            src_row = j
        mask = j_ok[:, None] & col_ok[None, :]
        acc += tl.load(src_ptr + src_row[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + dest * D + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)


def _launch_shape(dim: int, block_d: Optional[int]) -> tuple[int, int, bool, int]:
    """(ROWS, BLOCK_D, WHOLE_ROW, num_warps) for rows of `dim` features."""
    whole = triton.next_power_of_2(dim)
    if block_d is None and whole <= MAX_FUSED_D:
        block, is_whole = whole, True
    else:
        block, is_whole = min(block_d or 2048, whole), False
        is_whole = is_whole or block >= dim
    rows = max(1, min(16, 4096 // block))
    warps = 4 if rows * block <= 2048 else 8
    return rows, block, is_whole, warps


def row_grid(total: int, rows: int) -> tuple[int]:
    """Launch grid of the row kernels: one program per `rows` selected rows."""
    return check_grid_x(triton.cdiv(total, rows), "index")


def segment_sum_grid(num_dest: int, dim: int, block: int) -> tuple[int]:
    """Launch grid of the segment sum: (destination row, column block) tiles on grid x, where wide rows
    (dim > 65535 * block) and many destinations (B * N rows of dx) both fit."""
    return check_grid_x(num_dest * triton.cdiv(dim, block), "x")


def _row_args(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor], pos, bias):
    """Flattened index, row -> sample mapping arguments and strides shared by the row kernels."""
    flat = index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if index.dim() == 2:
        rect, row_len, num_seqs, cu = True, index.shape[1], index.shape[0], flat  # cu unused
    else:
        rect, row_len, num_seqs, cu = False, 1, cu_seqlens.numel() - 1, cu_seqlens.contiguous()
    steps = max(0, (num_seqs - 1).bit_length()) if not rect else 0
    dim = x.shape[-1]
    pos2 = pos.reshape(-1, dim) if pos is not None else None
    if pos2 is not None and pos2.stride(-1) != 1:
        pos2 = pos2.contiguous()
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    return dict(flat=flat, rect=rect, row_len=row_len, num_seqs=num_seqs, cu=cu, steps=steps,
                pos=pos2, bias=bias)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                  pos: Optional[torch.Tensor], bias: Optional[torch.Tensor], normalize: bool, eps: float,
                  block_d: Optional[int] = None) -> torch.Tensor:
    dim = x.shape[-1]
    out = torch.empty(index.numel(), dim, dtype=x.dtype, device=x.device)
    total = index.numel()
    if total == 0:
        return out.view(*index.shape, dim)
    if x.stride(-1) != 1:
        x = x.contiguous()
    a = _row_args(x, index, cu_seqlens, pos, bias)
    rows, block, whole, warps = _launch_shape(dim, block_d)
    p, q = a["pos"], a["bias"]
    _gather_fwd_kernel[row_grid(total, rows)](
        x, a["flat"], a["cu"], p if p is not None else x, q if q is not None else x, out,
        total, dim, a["row_len"], a["num_seqs"], x.stride(0), x.stride(1),
        p.stride(0) if p is not None else 0, q.stride(0) if q is not None else 0, eps,
        RECT=a["rect"], X_BATCHED=x.shape[0] != 1, HAS_POS=p is not None, HAS_BIAS=q is not None,
        NORMALIZE=normalize, SEARCH_STEPS=a["steps"], ROWS=rows, BLOCK_D=block, WHOLE_ROW=whole,
        ACC=_ACC[accumulate_dtype(x.dtype)], num_warps=warps)
    return out.view(*index.shape, dim)


def _segment_sum(src: torch.Tensor, perm: Optional[torch.Tensor], offsets: torch.Tensor, num_dest: int,
                 out: torch.Tensor, block_d: Optional[int]) -> torch.Tensor:
    dim = src.shape[-1]
    if num_dest == 0:
        return out
    block = min(block_d or 256, triton.next_power_of_2(dim))
    acc = _ACC[accumulate_dtype(out.dtype if out.dtype == torch.float64 else src.dtype)]
    _segment_sum_kernel[segment_sum_grid(num_dest, dim, block)](
        src, perm if perm is not None else offsets, offsets, out, dim,
        HAS_PERM=perm is not None, SUM_ROWS=SUM_ROWS, BLOCK_D=block, ACC=acc, num_warps=4)
    return out


def _csr(keys: torch.Tensor, num_dest: int, keys_sorted: bool) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(permutation or None when the keys are already sorted, offsets [num_dest + 1])."""
    perm = None
    if not keys_sorted:
        perm = torch.argsort(keys, stable=True)
        keys = keys[perm]
    bounds = torch.arange(num_dest + 1, device=keys.device, dtype=keys.dtype)
    return perm, torch.searchsorted(keys, bounds)


def gather_tokens_backward(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                           cu_seqlens: Optional[torch.Tensor], pos: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], normalize: bool, eps: float,
                           needs: tuple[bool, bool, bool], index_sorted: bool = False,
                           block_d: Optional[int] = None) -> tuple[Optional[torch.Tensor], ...]:
    """(dx, dpos, dbias). index_sorted: the caller checked that the keys of dx (sample * N + token, or
    token for a shared [1, N, D] x) never decrease, so dx needs no sort."""
    need_x, need_pos, need_bias = needs
    need_pos, need_bias = need_pos and pos is not None, need_bias and bias is not None
    dim, n_tok, total = x.shape[-1], x.shape[1], index.numel()
    device = x.device
    if x.stride(-1) != 1:
        x = x.contiguous()
    a = _row_args(x, index, cu_seqlens, pos, bias)
    acc_dtype = accumulate_dtype(x.dtype)
    grad = grad_out.reshape(-1, dim)
    if not grad.is_contiguous():
        grad = grad.contiguous()
    src = grad
    if normalize and total:
        src = torch.empty(total, dim, dtype=acc_dtype, device=device)
        rows, block, whole, warps = _launch_shape(dim, block_d)
        p, q = a["pos"], a["bias"]
        _norm_bwd_kernel[row_grid(total, rows)](
            x, a["flat"], a["cu"], p if p is not None else x, q if q is not None else x, grad, src,
            total, dim, a["row_len"], a["num_seqs"], x.stride(0), x.stride(1),
            p.stride(0) if p is not None else 0, q.stride(0) if q is not None else 0, eps,
            RECT=a["rect"], X_BATCHED=x.shape[0] != 1, HAS_POS=p is not None, HAS_BIAS=q is not None,
            SEARCH_STEPS=a["steps"], ROWS=rows, BLOCK_D=block, WHOLE_ROW=whole,
            ACC=_ACC[acc_dtype], num_warps=warps)

    tokens = a["flat"].long()
    num_seqs = a["num_seqs"]
    if a["rect"]:
        seg_offsets = torch.arange(num_seqs + 1, device=device, dtype=torch.int64) * a["row_len"]
    else:
        seg_offsets = cu_seqlens.long()
    dx = dpos = dbias = None
    if need_bias:
        dbias = _segment_sum(src, None, seg_offsets, num_seqs,
                             torch.empty(num_seqs, dim, dtype=bias.dtype, device=device), block_d)
    if need_x and x.shape[0] != 1:
        lengths = seg_offsets[1:] - seg_offsets[:-1]
        samples = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=total)
        perm, offsets = _csr(samples * n_tok + tokens, num_seqs * n_tok, index_sorted)
        dx = _segment_sum(src, perm, offsets, num_seqs * n_tok,
                          torch.empty(num_seqs, n_tok, dim, dtype=x.dtype, device=device), block_d)
    if need_pos or (need_x and x.shape[0] == 1):
        # Shared rows: sorted keys only when the caller said so for a shared x (the same keys).
        perm, offsets = _csr(tokens, n_tok, index_sorted and x.shape[0] == 1)
        wide = _segment_sum(src, perm, offsets, n_tok,
                            torch.empty(n_tok, dim, dtype=acc_dtype, device=device), block_d)
        if need_pos:
            dpos = wide.to(pos.dtype).view(pos.shape)
        if need_x and x.shape[0] == 1:
            dx = wide.to(x.dtype).view(1, n_tok, dim)
    return dx, dpos, dbias

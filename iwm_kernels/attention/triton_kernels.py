"""Triton flash attention over packed variable-length sequences with shared-context segments.

FlashAttention-2's structure: the forward walks the key tiles of one (sequence, head, query tile) with
an online softmax in fp32 and saves the row log-sum-exp (base 2); the backward recomputes the
probabilities from it, one kernel for dk/dv (a key tile walks the query tiles that can see it) and one
for dq (a query tile walks its key tiles), so no atomics. Scores live in the log2 domain
(qk_scale = scale * log2(e), exp2).

Tile skipping (see layout.py): a query tile walks [seq_start, ctx_end) and then [min lo, max hi) over
its rows, never the other blocks of its sequence; a key tile in segment g > 0 is visited only by the
query tiles of that segment. Elementwise masks apply the exact rule inside a boundary tile.

Imported only when the triton backend runs. Under TRITON_INTERPRET=1 (CPU tests) the tiles are small
fixed sizes and the matmul operands are upcast to fp32, because the interpreter computes bf16 dots
wrongly; the low-precision rounding of P before the PV product is still applied (`.to(IN_DTYPE)`).
On a GPU the block sizes come from a small autotune set valid on A100/H100 shared memory for head
dims up to 128; IWM_KERNELS_AUTOTUNE=0 uses one fixed config per kernel instead (fewer compiles, for
tests on a fresh machine).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._registry import triton_interpreter_enabled
from . import grid as launch_grid
from .layout import Layout

INTERPRET = triton_interpreter_enabled()
LOG2E = 1.4426950408889634
# Sizes that change with every batch: not specialized (Triton would compile a variant for values of 1 and
# multiples of 16).
_PER_BATCH_SIZES = ("num_seqs", "longest")
_NO_ROW = tl.constexpr(2**30)  # lo of a padding row: larger than any row, so it never widens a tile's key range

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Block sizes under the interpreter (tests use lengths around them). BLOCK_M != BLOCK_N on purpose.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 16


@triton.jit
def _program_tile(num_seq_heads, longest, BLOCK: tl.constexpr):
    """(sequence x head, row tile) of this program, from its linear number over the grid (grid.py). A
    program past the last tile gets tile ceil(longest / BLOCK), which starts past every sequence's end."""
    pid = (tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * tl.num_programs(0)
           + tl.program_id(2).to(tl.int64) * tl.num_programs(0) * tl.num_programs(1))
    num_tiles = tl.cdiv(longest, BLOCK)
    pid_t = tl.minimum(pid // num_seq_heads, num_tiles)
    return (pid % num_seq_heads).to(tl.int32), pid_t.to(tl.int32)


@triton.jit
def _tile_rows(CU, num_seqs, num_heads, longest, BLOCK: tl.constexpr):
    """The sequence, head and row tile of this program: rows [tile_start, tile_start + BLOCK) of the
    packed sequence [seq_start, seq_end). The caller returns when tile_start >= seq_end."""
    pid_sh, pid_t = _program_tile(num_seqs * num_heads, longest, BLOCK)
    seq = pid_sh // num_heads
    head = pid_sh % num_heads
    seq_start = tl.load(CU + seq)
    seq_end = tl.load(CU + seq + 1)
    tile_start = seq_start + pid_t * BLOCK
    offs = tile_start + tl.arange(0, BLOCK)
    return seq, head, seq_start, seq_end, tile_start, offs, offs < seq_end


@triton.jit
def _row_segments(CTX_END, SEG_LO, SEG_HI, seq, seq_end, offs, mask, HAS_SEGMENTS: tl.constexpr):
    """(ctx_end, lo, hi): where the context ends, and each row's own segment [lo, hi). Without segments
    the whole sequence is context and [lo, hi) is empty."""
    if HAS_SEGMENTS:
        ctx_end = tl.load(CTX_END + seq)
        lo = tl.load(SEG_LO + offs, mask=mask, other=_NO_ROW)
        hi = tl.load(SEG_HI + offs, mask=mask, other=0)
    else:
        ctx_end = seq_end
        lo = offs
        hi = offs
    return ctx_end, lo, hi


@triton.jit
def _key_tile_scores(q, k_ptr, stride_kt, start_n, end, lo, hi, offs_d, mask_d, qk_scale,
                     OWN_SEGMENT: tl.constexpr, BLOCK_N: tl.constexpr, MM_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Scores of a query tile against the key rows [start_n, start_n + BLOCK_N) below `end` (log2
    domain), which of them each query may see, and the key tile's rows and load mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_range = offs_n < end
    rows = offs_n[:, None].to(tl.int64)
    kv_mask = in_range[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + rows * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0).to(MM_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if OWN_SEGMENT:
        visible = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    else:
        visible = in_range[None, :]
    return s, visible, rows, kv_mask, k


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kt, stride_vt, start, end, lo, hi, offs_d, mask_d,
               qk_scale, OWN_SEGMENT: tl.constexpr, BLOCK_N: tl.constexpr, IN_DTYPE: tl.constexpr,
               MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of one query tile over the key rows [start, end). With OWN_SEGMENT, a row
    sees only the keys in its own [lo, hi); otherwise every key in range."""
    for start_n in range(start, end, BLOCK_N):
        s, visible, rows, kv_mask, k = _key_tile_scores(q, k_ptr, stride_kt, start_n, end, lo, hi, offs_d, mask_d,
                                                        qk_scale, OWN_SEGMENT, BLOCK_N, MM_DTYPE, DOT_PRECISION)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + rows * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0).to(MM_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(IN_DTYPE).to(MM_DTYPE), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_PER_BATCH_SIZES)
def _attn_fwd_kernel(Q, K, V, O, LSE, CU, CTX_END, SEG_LO, SEG_HI,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     total, num_seqs, num_heads, longest, qk_scale, SEQ_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_SEGMENTS: tl.constexpr, IN_DTYPE: tl.constexpr, MM_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    seq, head, seq_start, seq_end, m_start, offs_m, mask_m = _tile_rows(CU, num_seqs, num_heads, longest, BLOCK_M)
    if m_start >= seq_end:
        return
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + head * stride_qh + q_rows * stride_qt + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(MM_DTYPE)
    k_ptr = K + head * stride_kh
    v_ptr = V + head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ctx_end, lo, hi = _row_segments(CTX_END, SEG_LO, SEG_HI, seq, seq_end, offs_m, mask_m, HAS_SEGMENTS)
    # Every query sees the context (segment 0; the whole sequence without segments)...
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kt, stride_vt, seq_start, ctx_end, lo, hi,
                               offs_d, mask_d, qk_scale, False, BLOCK_N, IN_DTYPE, MM_DTYPE, DOT_PRECISION)
    # ... and a query in segment g > 0 its own segment: the tile's segments are one row interval.
    if HAS_SEGMENTS:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kt, stride_vt, tl.min(lo, 0),
                                   tl.max(hi, 0), lo, hi, offs_d, mask_d, qk_scale, True, BLOCK_N, IN_DTYPE,
                                   MM_DTYPE, DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + head * stride_oh + q_rows * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + head.to(tl.int64) * total + offs_m, m_i + tl.log2(l_safe), mask=mask_m)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d O[t, h, d] * dO[t, h, d] (fp32): the rowsum term of the softmax backward."""
    pid_t = tl.program_id(0)
    head = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < total
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_t[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(O + head * stride_oh + rows * stride_ot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + head * stride_doh + rows * stride_dot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head.to(tl.int64) * total + offs_t, tl.sum(o * do, 1), mask=mask_t)


@triton.jit(do_not_specialize=_PER_BATCH_SIZES)
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, CTX_END, SEG_LO, SEG_HI,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                          stride_gt, stride_gh, total, num_seqs, num_heads, longest, qk_scale, sm_scale,
                          SEQ_BUCKET,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_SEGMENTS: tl.constexpr, IN_DTYPE: tl.constexpr,
                          MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (sequence, head, key tile of BLOCK_N rows): walk the query tiles (BLOCK_M rows) that can see
    it, accumulate dk and dv in fp32. DK and DV share the strides stride_gt, stride_gh."""
    seq, head, seq_start, seq_end, n_start, offs_n, mask_n = _tile_rows(CU, num_seqs, num_heads, longest, BLOCK_N)
    if n_start >= seq_end:
        return
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    k_rows = offs_n[:, None].to(tl.int64)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + head * stride_kh + k_rows * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0).to(MM_DTYPE)
    v = tl.load(V + head * stride_vh + k_rows * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0).to(MM_DTYPE)
    ctx_end, lo_k, hi_k = _row_segments(CTX_END, SEG_LO, SEG_HI, seq, seq_end, offs_n, mask_n, HAS_SEGMENTS)
    if HAS_SEGMENTS:
        # A context key is seen by the whole sequence; a segment-g key only by segment g's queries.
        q_lo = tl.where(n_start < ctx_end, seq_start, tl.min(lo_k, 0))
        q_hi = tl.where(n_start < ctx_end, seq_end, tl.max(hi_k, 0))
    else:
        q_lo = seq_start
        q_hi = seq_end
    q_ptr = Q + head * stride_qh
    do_ptr = DO + head * stride_doh
    lse_ptr = LSE + head.to(tl.int64) * total
    delta_ptr = DELTA + head.to(tl.int64) * total
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(q_lo, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_hi
        rows = offs_m[:, None].to(tl.int64)
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + rows * stride_qt + offs_d[None, :], mask=q_mask, other=0.0).to(MM_DTYPE)
        do = tl.load(do_ptr + rows * stride_dot + offs_d[None, :], mask=q_mask, other=0.0).to(MM_DTYPE)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale        # [BLOCK_N, BLOCK_M]
        visible = mask_n[:, None] & mask_m[None, :]
        if HAS_SEGMENTS:
            visible = visible & ((offs_n[:, None] < ctx_end)
                                 | ((offs_m[None, :] >= lo_k[:, None]) & (offs_m[None, :] < hi_k[:, None])))
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(IN_DTYPE).to(MM_DTYPE), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(IN_DTYPE).to(MM_DTYPE), q, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    out_offs = head * stride_gh + k_rows * stride_gt + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, start, end, lo, hi, offs_d, mask_d,
              qk_scale, OWN_SEGMENT: tl.constexpr, BLOCK_N: tl.constexpr, IN_DTYPE: tl.constexpr,
              MM_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        s, visible, rows, kv_mask, k = _key_tile_scores(q, k_ptr, stride_kt, start_n, end, lo, hi, offs_d, mask_d,
                                                        qk_scale, OWN_SEGMENT, BLOCK_N, MM_DTYPE, DOT_PRECISION)
        v = tl.load(v_ptr + rows * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0).to(MM_DTYPE)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(IN_DTYPE).to(MM_DTYPE), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_PER_BATCH_SIZES)
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, CTX_END, SEG_LO, SEG_HI,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        stride_gt, stride_gh, total, num_seqs, num_heads, longest, qk_scale, sm_scale,
                        SEQ_BUCKET,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_SEGMENTS: tl.constexpr, IN_DTYPE: tl.constexpr, MM_DTYPE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    seq, head, seq_start, seq_end, m_start, offs_m, mask_m = _tile_rows(CU, num_seqs, num_heads, longest, BLOCK_M)
    if m_start >= seq_end:
        return
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = offs_m[:, None].to(tl.int64)
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + head * stride_qh + rows * stride_qt + offs_d[None, :], mask=q_mask, other=0.0).to(MM_DTYPE)
    do = tl.load(DO + head * stride_doh + rows * stride_dot + offs_d[None, :], mask=q_mask, other=0.0).to(MM_DTYPE)
    lse = tl.load(LSE + head.to(tl.int64) * total + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + head.to(tl.int64) * total + offs_m, mask=mask_m, other=0.0)
    k_ptr = K + head * stride_kh
    v_ptr = V + head * stride_vh
    ctx_end, lo, hi = _row_segments(CTX_END, SEG_LO, SEG_HI, seq, seq_end, offs_m, mask_m, HAS_SEGMENTS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, seq_start, ctx_end, lo, hi, offs_d,
                   mask_d, qk_scale, False, BLOCK_N, IN_DTYPE, MM_DTYPE, DOT_PRECISION)
    if HAS_SEGMENTS:
        dq = _dq_tiles(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, tl.min(lo, 0), tl.max(hi, 0),
                       lo, hi, offs_d, mask_d, qk_scale, True, BLOCK_N, IN_DTYPE, MM_DTYPE, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + head * stride_gh + rows * stride_gt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# ---- launch configuration ----------------------------------------------------------------------------------

def _configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


_AUTOTUNE_KEY = ["HEAD_DIM", "HAS_SEGMENTS", "SEQ_BUCKET"]
# (BLOCK_M, BLOCK_N, warps, stages) per kernel and padded head dim, a few each: every config is compiled
# once per autotune key on a fresh machine. Chosen from an offline sm_90 compile (triton.compile with
# GPUTarget("cuda", 90, 32), bf16, segments on) to avoid register spills: e.g. at head dim 128 the
# forward's 128x64 tile with 4 warps spills ~2 KB per thread, with 8 warps ~50 bytes, 64x64 with 8
# warps none. The first entry is the fixed config used without autotuning. For the dk/dv kernel
# BLOCK_N is the key tile a program owns and BLOCK_M the query tile it walks.
_CONFIGS = {
    "fwd": {32: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
            64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 64, 8, 3)],
            128: [(64, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)]},
    "dkdv": {32: [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (64, 128, 8, 2)],
             64: [(32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (32, 32, 4, 3)],
             128: [(32, 32, 4, 3), (64, 64, 8, 3), (32, 64, 8, 3)]},
    "dq": {32: [(64, 32, 4, 3), (128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
           64: [(64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
           128: [(64, 32, 4, 3), (32, 64, 4, 3), (64, 64, 8, 3)]},
}
# fp32 operands (exact "ieee" dots, tests and fp32 users) take small tiles without autotuning.
_FP32_FIXED = {"fwd": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)}
_JIT = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}

AUTOTUNE = os.environ.get("IWM_KERNELS_AUTOTUNE", "1") not in ("", "0")
_INTERPRET_BLOCKS = {"fwd": {"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N},
                     "dkdv": {"BLOCK_M": INTERPRET_BLOCK_N, "BLOCK_N": INTERPRET_BLOCK_M},
                     "dq": {"BLOCK_M": INTERPRET_BLOCK_M, "BLOCK_N": INTERPRET_BLOCK_N}}
_autotuned: dict = {}


def _kernel(name: str, dtype: torch.dtype, head_dim: int):
    """(kernel, launch kwargs): interpreter blocks, an autotuner (no kwargs), or one fixed config."""
    if INTERPRET:
        return _JIT[name], _INTERPRET_BLOCKS[name]
    configs = _CONFIGS[name][max(32, _block_d(head_dim))]
    if dtype == torch.float32:
        m, n, warps, stages = _FP32_FIXED[name]
    elif AUTOTUNE:  # pragma: no cover - needs a GPU
        key = (name, _block_d(head_dim))
        if key not in _autotuned:
            _autotuned[key] = triton.autotune(_configs(configs), key=_AUTOTUNE_KEY)(_JIT[name])
        return _autotuned[key], {}
    else:  # pragma: no cover - needs a GPU
        m, n, warps, stages = configs[0]
    return _JIT[name], {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _seq_bucket(longest: int) -> int:
    return max(16, triton.next_power_of_2(max(longest, 1)))


def _tile_grid(layout: Layout, num_heads: int, block_key: str):
    # Sized from the layout's real longest sequence (known on the host from validation, no extra sync),
    # never from max_seqlen, which may be far larger; grid.py keeps every dimension within CUDA's limits.
    return lambda meta: launch_grid.tile_grid(layout.num_seqs * num_heads, layout.longest, meta[block_key])


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _mm_dtype(dtype: torch.dtype):
    return tl.float32 if INTERPRET else _TL_DTYPE[dtype]


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _segment_args(layout: Layout):
    ctx_end, lo, hi = layout.bounds()
    if lo is None:  # unused by the kernels (HAS_SEGMENTS=False); any int32 pointer will do
        cu = layout.cu_seqlens_i32
        return cu, cu, cu, False
    return ctx_end, lo, hi, True


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, max_seqlen: int, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H, Dh] in q's dtype, lse [H, T] fp32 in base 2)."""
    q, k, v = (_rows_contiguous(x) for x in (q, k, v))
    T, H, D = q.shape
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    if T == 0 or layout.num_seqs == 0 or layout.longest == 0:
        return out, lse
    ctx_end, lo, hi, has_segments = _segment_args(layout)
    kernel, launch = _kernel("fwd", q.dtype, D)
    kernel[_tile_grid(layout, H, "BLOCK_M")](
               q, k, v, out, lse, layout.cu_seqlens_i32, ctx_end, lo, hi,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
               out.stride(1), T, layout.num_seqs, H, layout.longest, scale * LOG2E, _seq_bucket(layout.longest),
               HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_SEGMENTS=has_segments, IN_DTYPE=_TL_DTYPE[q.dtype],
               MM_DTYPE=_mm_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype), **launch)
    return out, lse


def backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, layout: Layout, max_seqlen: int, scale: float,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, grad_out = (_rows_contiguous(x) for x in (q, k, v, out, grad_out))
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    T, H, D = q.shape
    dq = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if T == 0 or layout.num_seqs == 0 or layout.longest == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(D)
    delta = torch.empty((H, T), dtype=torch.float32, device=q.device)
    block_t = 64
    _bwd_delta_kernel[(triton.cdiv(T, block_t), H)](out, grad_out, delta, out.stride(0), out.stride(1),
                                                   grad_out.stride(0), grad_out.stride(1), T,
                                                   HEAD_DIM=D, BLOCK_D=block_d, BLOCK_T=block_t)
    ctx_end, lo, hi, has_segments = _segment_args(layout)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, HAS_SEGMENTS=has_segments, IN_DTYPE=_TL_DTYPE[q.dtype],
                  MM_DTYPE=_mm_dtype(q.dtype), DOT_PRECISION=_dot_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1))
    sizes = (T, layout.num_seqs, H, layout.longest, scale * LOG2E, scale, _seq_bucket(layout.longest))
    cu = layout.cu_seqlens_i32
    kernel, launch = _kernel("dkdv", q.dtype, D)
    kernel[_tile_grid(layout, H, "BLOCK_N")](q, k, v, grad_out, lse, delta, dk, dv, cu, ctx_end, lo, hi, *strides,
                                             *sizes, **common, **launch)
    kernel, launch = _kernel("dq", q.dtype, D)
    kernel[_tile_grid(layout, H, "BLOCK_M")](q, k, v, grad_out, lse, delta, dq, cu, ctx_end, lo, hi, *strides,
                                             *sizes, **common, **launch)
    return dq, dk, dv

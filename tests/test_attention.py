"""varlen_attention: every backend against the per-sequence SDPA reference, forward and backward, on
random ragged packs (lengths 0, 1, around the interpreter's block sizes, above 256) and every segment
layout; the errors; torch.compile through the custom op; and the tile skipping of the Triton kernels."""
import pytest
import torch

import iwm_kernels
from iwm_kernels.attention import reference
from tests.helpers import TOLERANCES, backends_on

BACKENDS = backends_on("cpu")
FAST = [b for b in BACKENDS if b != "reference"]
HAS_TRITON = "triton" in BACKENDS
if HAS_TRITON:
    from iwm_kernels.attention.triton_kernels import INTERPRET_BLOCK_M as BM, INTERPRET_BLOCK_N as BN
else:  # the lengths below still cover ragged edges
    BM, BN = 32, 16

# Sequence lengths around the interpreter's tiles (BLOCK_M=32 query rows, BLOCK_N=16 key rows).
EDGE_LENGTHS = [0, 1, 2, BN - 1, BN, BN + 1, BM - 1, BM, BM + 1, 2 * BN + 3]


def layout_from_parts(parts_per_seq):
    """parts_per_seq: per sequence, the lengths of its segments in order (first = segment 0, may be 0).
    Returns cu_seqlens, segment_ids, max_seqlen."""
    lengths, seg = [], []
    for parts in parts_per_seq:
        lengths.append(sum(parts))
        for g, n in enumerate(parts):
            seg += [g] * n
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)
    return cu, torch.tensor(seg, dtype=torch.int64), max(lengths + [0])


def plain_layout(lengths):
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int64)
    return cu, max(lengths + [0])


def random_plain_lengths(gen, n=6):
    picks = torch.randint(len(EDGE_LENGTHS), (n,), generator=gen).tolist()
    return [EDGE_LENGTHS[i] for i in picks] + [0, 1]


def random_segment_parts(gen, n=4):
    """Predictor-like sequences: a context of 0..40 tokens then 1..4 blocks of 1..20, plus the edge
    layouts: a sequence with only segment 0 and one with no segment 0."""
    seqs = []
    for _ in range(n):
        ctx = int(torch.randint(0, 41, (1,), generator=gen))
        num_blocks = int(torch.randint(1, 5, (1,), generator=gen))
        blocks = [int(torch.randint(1, 21, (1,), generator=gen)) for _ in range(num_blocks)]
        seqs.append([ctx] + blocks)
    seqs += [[int(torch.randint(1, 40, (1,), generator=gen))], [0, 7, BN + 1], [BM + 1, 1]]
    order = torch.randperm(len(seqs), generator=gen).tolist()
    return [seqs[i] for i in order]


def qkv(T, H, D, dtype, gen, requires_grad=True):
    return [torch.randn(T, H, D, generator=gen).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def run_fwd_bwd(fn, q, k, v, grad):
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out, dq, dk, dv


def assert_matches_reference(backend, q, k, v, cu, max_seqlen, seg, dtype, gen, scale=None):
    grad = torch.randn(q.shape, generator=gen).to(dtype=dtype, device=q.device)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    want = run_fwd_bwd(lambda a, b, c: reference.varlen_attention(a, b, c, cu, seg, s), q, k, v, grad)
    got = run_fwd_bwd(lambda a, b, c: iwm_kernels.varlen_attention(a, b, c, cu, max_seqlen, segment_ids=seg,
                                                                   scale=scale, backend=backend), q, k, v, grad)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        atol, rtol = tolerance(dtype, w)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"{backend} {name}: {m}")


def tolerance(dtype, want):
    """The dtype's (atol, rtol), atol scaled by the largest reference value: each entry is a sum of
    products rounded at the scale of its largest terms (in bf16/fp16, P and dS are rounded to the input
    dtype before the matmuls; in fp32 the summation order differs), so a near-zero entry carries the
    error of its big neighbours."""
    atol, rtol = TOLERANCES[dtype]
    atol *= max(1.0, float(want.detach().abs().max()) if want.numel() else 1.0)
    return atol, rtol


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_ragged_pack(backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = random_plain_lengths(gen)
    cu, max_seqlen = plain_layout(lengths)
    q, k, v = qkv(int(cu[-1]), 2, 32, dtype, gen)
    assert_matches_reference(backend, q, k, v, cu, max_seqlen, None, dtype, gen)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segmented_ragged_pack(backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts(random_segment_parts(gen))
    q, k, v = qkv(int(cu[-1]), 2, 32, dtype, gen)
    assert_matches_reference(backend, q, k, v, cu, max_seqlen, seg.to(torch.int32), dtype, gen)


LAYOUTS = {
    "only segment 0": [[23], [1], [BM]],
    "context + one block": [[20, 9], [BN, BN]],
    "context + four blocks": [[40, 12, 9, 15, 11]],
    "no context": [[0, 10, 30], [0, 1]],
    "blocks of one token": [[5, 1, 1, 1], [1, 1]],
    "tile-aligned segments": [[BM, BM, BN, BN]],
    "segment straddling tiles": [[BN - 1, BM + 2, 3], [BM - 1, 2]],
    "empty sequences between": [[0], [7, 3], [0], [2, 2]],
    "non-consecutive ids": "custom",
}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_segment_layout(backend, name, seed):
    gen = torch.Generator().manual_seed(seed)
    if name == "non-consecutive ids":  # ids need not be 1..M: only contiguity and "0 first" matter
        cu, seg, max_seqlen = layout_from_parts([[6, 5, 4]])
        seg = torch.tensor([0] * 6 + [7] * 5 + [3] * 4)
    else:
        cu, seg, max_seqlen = layout_from_parts(LAYOUTS[name])
    q, k, v = qkv(int(cu[-1]), 1, 32, torch.float32, gen)
    assert_matches_reference(backend, q, k, v, cu, max_seqlen, seg, torch.float32, gen)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("segmented", [False, True])
def test_long_sequences_above_256(backend, segmented, seed):
    gen = torch.Generator().manual_seed(seed)
    if segmented:
        cu, seg, max_seqlen = layout_from_parts([[170, 41, 40, 50], [9, 3]])
        assert max_seqlen > 256
    else:
        cu, max_seqlen = plain_layout([300, 17])
        seg = None
    q, k, v = qkv(int(cu[-1]), 1, 32, torch.float32, gen)
    assert_matches_reference(backend, q, k, v, cu, max_seqlen, seg, torch.float32, gen)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("head_dim", [20, 64, 128])
def test_head_dims(backend, head_dim, seed):
    """32/64/128 run unpadded; 20 is zero-padded inside the kernel to 32."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[10, 7, BN + 1], [BM + 1]])
    q, k, v = qkv(int(cu[-1]), 1, head_dim, torch.float32, gen)
    assert_matches_reference(backend, q, k, v, cu, max_seqlen, seg, torch.float32, gen, scale=0.3)


@pytest.mark.parametrize("backend", FAST)
def test_float16(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[12, 9, 14], [BM + 3]])
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float16, gen)
    assert_matches_reference(backend, q, k, v, cu, max_seqlen, seg, torch.float16, gen)


@pytest.mark.parametrize("backend", FAST)
def test_strided_views_of_one_qkv_tensor(backend, seed):
    """The module hands over q, k, v as views of one [T, 3, H, Dh] tensor: no copy, same result."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[9, 4, 6], [BN + 2, 3]])
    T = int(cu[-1])
    packed = torch.randn(T, 3, 2, 32, generator=gen, requires_grad=True)
    q, k, v = packed.unbind(1)
    assert not q.is_contiguous()
    grad = torch.randn(T, 2, 32, generator=gen)
    out = iwm_kernels.varlen_attention(q, k, v, cu, max_seqlen, segment_ids=seg, backend=backend)
    (g,) = torch.autograd.grad(out, packed, grad)
    qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q, k, v))
    want = reference.varlen_attention(qc, kc, vc, cu, seg, 32 ** -0.5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, torch.stack(torch.autograd.grad(want, (qc, kc, vc), grad), 1), atol=1e-5, rtol=1e-5)


def test_reference_gradcheck_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[3, 2, 2], [0, 2], [4]])
    q, k, v = qkv(int(cu[-1]), 2, 4, torch.float64, gen)
    def fn(a, b, c):
        return iwm_kernels.varlen_attention(a, b, c, cu, max_seqlen, segment_ids=seg, backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_explicit_backward_matches_autograd(backend, seed):
    """The textbook backward the custom op uses under torch.compile, against autograd (float64)."""
    from iwm_kernels.attention import native, prepare
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[5, 3, 4], [0, 2, 2], [6], []])
    q, k, v = qkv(int(cu[-1]), 2, 8, torch.float64, gen)
    grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(reference.varlen_attention(q, k, v, cu, seg, 0.4), (q, k, v), grad)
    if backend == "reference":
        got = reference.varlen_attention_backward(grad, q, k, v, cu, seg, 0.4)
    else:
        got = native.varlen_attention_backward(grad, q, k, v, prepare(cu, seg, q.shape[0], max_seqlen), 0.4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_segments_change_the_result(seed):
    """The comparisons have teeth: ignoring the segments, or a 25 % different softmax scale, is outside
    the bf16 tolerance they use (the kernels stay within about half of it)."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, _ = layout_from_parts([[12, 9, 14]])
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float32, gen, requires_grad=False)
    base = reference.varlen_attention(q, k, v, cu, seg, 32 ** -0.5)
    atol, rtol = tolerance(torch.bfloat16, base)
    for other in (reference.varlen_attention(q, k, v, cu, None, 32 ** -0.5),
                  reference.varlen_attention(q, k, v, cu, seg, 1.25 * 32 ** -0.5)):
        assert not torch.allclose(other, base, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for cu in (torch.tensor([0]), torch.tensor([0, 0, 0])):
        q, k, v = (torch.zeros(0, 2, 32, requires_grad=True) for _ in range(3))
        out = iwm_kernels.varlen_attention(q, k, v, cu, 0, backend=backend)
        assert out.shape == (0, 2, 32)
        out.sum().backward()
        assert q.grad.shape == (0, 2, 32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_triton_skips_invisible_tiles(seed):
    """Poison what a tile-skipping kernel never reads: V rows of segment 2 and Q rows of segment 2 are
    NaN. Masked loads would still multiply 0 * NaN = NaN, so finite results for the context and
    segment 1 prove their tiles were skipped, not masked. Segments are whole tiles here."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[BM, 2 * BM, 2 * BM]])
    T = int(cu[-1])
    q, k, v = qkv(T, 1, 32, torch.float32, gen, requires_grad=False)
    seg2 = seg == 2
    q_bad, v_bad = q.clone(), v.clone()
    q_bad[seg2] = float("nan")
    v_bad[seg2] = float("nan")
    q_bad.requires_grad_()
    k.requires_grad_()
    v_bad.requires_grad_()
    out = iwm_kernels.varlen_attention(q_bad, k, v_bad, cu, max_seqlen, segment_ids=seg, backend="triton")
    keep = ~seg2
    assert torch.isnan(out[seg2]).all()
    want = reference.varlen_attention(q, k.detach(), v, cu, seg, 32 ** -0.5)
    torch.testing.assert_close(out[keep], want[keep], atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    grad[seg2] = 0
    dq, dk, dv = torch.autograd.grad(out, (q_bad, k, v_bad), grad)
    seg1 = seg == 1
    # dq of context and segment-1 queries, dk/dv of segment-1 keys: none touches a segment-2 tile.
    assert torch.isfinite(dq[keep]).all() and torch.isfinite(dk[seg1]).all() and torch.isfinite(dv[seg1]).all()


def test_layout_cache_notices_in_place_changes():
    q, k, v = (torch.randn(6, 1, 32) for _ in range(3))
    cu = torch.tensor([0, 3, 6])
    iwm_kernels.varlen_attention(q, k, v, cu, 3, backend="reference")
    cu[1] = 7  # invalid now: the cached validation must not hide it
    with pytest.raises(ValueError, match="cu_seqlens"):
        iwm_kernels.varlen_attention(q, k, v, cu, 7, backend="reference")


# ---- errors: every one names the offending argument -----------------------------------------------------

def _args(T=10, H=2, D=32):
    q, k, v = (torch.randn(T, H, D) for _ in range(3))
    return dict(q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 4, 10]), max_seqlen=6,
                segment_ids=torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 2, 2]))


@pytest.mark.parametrize("case, match", [
    ("q_not_tensor", "q: expected a torch.Tensor"),
    ("q_2d", "q: expected 3-D"),
    ("q_int", "q: dtype int64 is not supported"),
    ("k_dtype", "k: dtype float64 differs from q's float32"),
    ("v_shape", r"v: shape \(10, 2, 16\) differs from q's"),
    ("k_device", "k: on meta"),
    ("cu_dtype", "cu_seqlens: dtype float32 is not supported"),
    ("cu_2d", "cu_seqlens: expected 1-D"),
    ("cu_start", "cu_seqlens: must start at 0"),
    ("cu_not_monotone", "cu_seqlens: must be non-decreasing"),
    ("cu_end", "cu_seqlens: must end at 10"),
    ("cu_device", "cu_seqlens: on meta"),
    ("max_seqlen_type", "max_seqlen: expected a Python int"),
    ("max_seqlen_short", "max_seqlen: 5 is shorter than the longest sequence"),
    ("max_seqlen_negative", "max_seqlen: must be >= 0"),
    ("seg_dtype", "segment_ids: dtype float32 is not supported"),
    ("seg_length", "segment_ids: expected 10 entries"),
    ("seg_negative", "segment_ids: negative segment id"),
    ("seg_zero_late", "segment_ids: segment 0 must come first"),
    ("seg_not_contiguous", "segment_ids: segment 1 of sequence 1 is not contiguous"),
    ("scale", "scale: must be finite"),
    ("scale_type", "scale: expected a float"),
    ("backend", "backend: unknown backend 'cuda'"),
])
def test_errors_name_the_argument(case, match):
    a = _args()
    if case == "q_not_tensor":
        a["q"] = a["q"].tolist()
    elif case == "q_2d":
        a["q"] = a["q"][:, 0]
    elif case == "q_int":
        a["q"] = a["q"].long()
    elif case == "k_dtype":
        a["k"] = a["k"].double()
    elif case == "v_shape":
        a["v"] = a["v"][..., :16]
    elif case == "k_device":
        a["k"] = a["k"].to("meta")
    elif case == "cu_dtype":
        a["cu_seqlens"] = a["cu_seqlens"].float()
    elif case == "cu_2d":
        a["cu_seqlens"] = a["cu_seqlens"][None]
    elif case == "cu_start":
        a["cu_seqlens"] = torch.tensor([1, 4, 10])
    elif case == "cu_not_monotone":
        a["cu_seqlens"] = torch.tensor([0, 6, 4, 10])
    elif case == "cu_end":
        a["cu_seqlens"] = torch.tensor([0, 4, 9])
    elif case == "cu_device":
        a["cu_seqlens"] = a["cu_seqlens"].to("meta")
    elif case == "max_seqlen_type":
        a["max_seqlen"] = 6.0
    elif case == "max_seqlen_short":
        a["max_seqlen"] = 5
    elif case == "max_seqlen_negative":
        a["max_seqlen"] = -1
    elif case == "seg_dtype":
        a["segment_ids"] = a["segment_ids"].float()
    elif case == "seg_length":
        a["segment_ids"] = a["segment_ids"][:9]
    elif case == "seg_negative":
        a["segment_ids"][3] = -1
    elif case == "seg_zero_late":
        a["segment_ids"] = torch.tensor([0, 1, 0, 1, 0, 0, 0, 1, 2, 2])
    elif case == "seg_not_contiguous":
        a["segment_ids"] = torch.tensor([0, 0, 1, 1, 0, 1, 2, 1, 2, 2])
    elif case == "scale":
        a["scale"] = float("inf")
    elif case == "scale_type":
        a["scale"] = "0.1"
    elif case == "backend":
        a["backend"] = "cuda"
    q, k, v, cu, ms = a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens"), a.pop("max_seqlen")
    with pytest.raises((ValueError, TypeError), match=match):
        iwm_kernels.varlen_attention(q, k, v, cu, ms, **a)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_limits_are_clear_errors():
    q = torch.randn(4, 1, 160)
    with pytest.raises(ValueError, match="q: head dim 160 is not supported by the triton backend"):
        iwm_kernels.varlen_attention(q, q, q, torch.tensor([0, 4]), 4, backend="triton")
    q = torch.randn(4, 1, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="q: dtype float64 is not supported by the triton backend"):
        iwm_kernels.varlen_attention(q, q, q, torch.tensor([0, 4]), 4, backend="triton")


# ---- torch.compile through the custom op ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_through_custom_op(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[9, 5, 3], [0, 4], [BN + 1]])
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float32, gen)
    grad = torch.randn(q.shape, generator=gen)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return iwm_kernels.varlen_attention(q * 1.0, k, v, cu, max_seqlen, segment_ids=seg, backend=backend)

    got = run_fwd_bwd(f, q, k, v, grad)
    want = run_fwd_bwd(lambda a, b, c: reference.varlen_attention(a, b, c, cu, seg, 32 ** -0.5), q, k, v, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_custom_op_passes_opcheck(seed):
    """Schema, fake implementation and autograd registration, checked by torch.library.opcheck."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[3, 2], [4]])
    q, k, v = qkv(int(cu[-1]), 2, 8, torch.float32, gen)
    for s in (seg, None):
        torch.library.opcheck(torch.ops.iwm.varlen_attention.default, (q, k, v, cu, max_seqlen, s, 0.3, "reference"))
        torch.library.opcheck(torch.ops.iwm.varlen_attention.default, (q, k, v, cu, max_seqlen, s, 0.3, "native"))


# ---- GPU (skipped without one) --------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                                             (torch.float16, 64), (torch.float32, 64), (torch.float32, 128)])
def test_cuda_triton_against_reference(dtype, head_dim, seed):
    """Compiled kernels on a real GPU (each (dtype, head dim, segments) compiles three kernels; run with
    IWM_KERNELS_AUTOTUNE=0 on a fresh machine, as scripts/gpu_check.sh does)."""
    gen = torch.Generator().manual_seed(seed)
    parts = random_segment_parts(gen, n=24) + [[150, 40, 35, 38, 42]]
    for segmented in (False, True):
        cu, seg, max_seqlen = layout_from_parts(parts)
        q, k, v = (x.detach().cuda().requires_grad_() for x in qkv(int(cu[-1]), 4, head_dim, dtype, gen))
        seg = seg.cuda() if segmented else None
        assert_matches_reference("triton", q, k, v, cu.cuda(), max_seqlen, seg, dtype, gen)


@pytest.mark.gpu
def test_cuda_module_shared_mode_bf16_autocast(seed):
    """The predictor's path on a GPU: packing, VarlenSelfAttention under bf16 autocast, backward."""
    from iwm_kernels import VarlenSelfAttention, pack_predictor_sequences, unpack_targets
    gen = torch.Generator().manual_seed(seed)
    B, M, D = 8, 4, 384
    ctx = torch.randint(80, 120, (B,), generator=gen).tolist()
    blk = torch.randint(25, 40, (B * M,), generator=gen).tolist()
    off = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), device="cuda")  # noqa: E731
    context = torch.randn(sum(ctx), D, device="cuda", requires_grad=True)
    targets = torch.randn(sum(blk), D, device="cuda", requires_grad=True)
    attn = VarlenSelfAttention(D, 12).cuda()
    outs = {}
    for backend in ("triton", "reference"):
        p = pack_predictor_sequences(context, off(ctx), targets, off(blk), M, shared_context=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = unpack_targets(attn(p.x, p.cu_seqlens, p.max_seqlen, p.segment_ids, backend=backend), p)
        outs[backend] = (y.float(), *torch.autograd.grad(y.float().square().mean(), (context, targets)))
    for got, want in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(got, want, atol=3e-2 * max(1.0, float(want.abs().max())), rtol=3e-2)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_kernels_compile_for_sm90():
    """The interpreter does not compile: build the three kernels for an H100 with triton's own ptxas
    (no driver needed), so a construct only the compiler rejects fails here, not on the GPU machine."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton ships no NVIDIA ptxas")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(root / "scripts" / "compile_triton_sm90.py"), "--head-dims", "32",
                          "--segments", "1"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(": ok in") == 3

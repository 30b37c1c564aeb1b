"""varlen_attention where it meets the rest of PyTorch: inference mode, autocast, double backward, and the
Triton launch grid for a loose max_seqlen or a layout too large for one CUDA grid dimension."""
import pytest
import torch

import iwm_kernels
from iwm_kernels import VarlenSelfAttention, pack_predictor_sequences
from iwm_kernels.attention import grid, reference
from tests.helpers import backends_on
from tests.test_attention import BM, BN, layout_from_parts, qkv, tolerance

BACKENDS = backends_on("cpu")
HAS_TRITON = "triton" in BACKENDS
PARTS = [[9, 5, BN + 1], [0, 4], [BM + 3, 2]]


def _attention(backend, q, k, v, cu, max_seqlen, seg):
    return iwm_kernels.varlen_attention(q, k, v, cu, max_seqlen, segment_ids=seg, backend=backend)


# ---- inference mode ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segmented", [False, True])
def test_inference_tensors(backend, segmented, seed):
    """Inputs made under torch.inference_mode have no version counter: the layout cache must not read it."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts(PARTS)
    seg = seg if segmented else None
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float32, gen, requires_grad=False)
    want = reference.varlen_attention(q, k, v, cu, seg, 32 ** -0.5)
    with torch.inference_mode():
        qi, ki, vi, cui = (t.clone() for t in (q, k, v, cu))
        segi = seg.clone() if seg is not None else None
        assert cui.is_inference()
        for _ in range(2):  # the second call is where a cache hit would be
            got = _attention(backend, qi, ki, vi, cui, max_seqlen, segi)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        cui[1] = int(cui[2]) + 1  # an in-place change cannot be seen on an inference tensor: never cached
        with pytest.raises(ValueError, match="cu_seqlens"):
            _attention(backend, qi, ki, vi, cui, 10 ** 6, segi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_inference_mode(backend, seed):
    """The predictor's path at evaluation: packing and VarlenSelfAttention inside torch.inference_mode."""
    gen = torch.Generator().manual_seed(seed)
    B, M, D = 3, 2, 32
    ctx, blk = torch.randint(0, 12, (B,), generator=gen), torch.randint(1, 7, (B * M,), generator=gen)
    off = lambda n: torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])  # noqa: E731
    batch = dict(context=torch.randn(int(ctx.sum()), D, generator=gen), context_cu=off(ctx),
                 targets=torch.randn(int(blk.sum()), D, generator=gen), target_cu=off(blk), num_targets=M)
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(D, 2).eval()
    p = pack_predictor_sequences(**batch, shared_context=True)
    with torch.no_grad():
        want = attn(p.x, p.cu_seqlens, p.max_seqlen, p.segment_ids, backend="reference")
    with torch.inference_mode():
        pi = pack_predictor_sequences(**{k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()},
                                      shared_context=True)
        assert pi.cu_seqlens.is_inference()
        got = attn(pi.x, pi.cu_seqlens, pi.max_seqlen, pi.segment_ids, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- autocast ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_autocast_keeps_the_input_dtype(backend, compiled, seed):
    """Every backend does what the reference does under autocast: fp32 in, fp32 out (and gradients), at
    fp32 accuracy; autocast lowers the inputs of attention (the projections), not attention itself."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts(PARTS)
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float32, gen)
    grad = torch.randn(q.shape, generator=gen)

    def fn(a, b, c):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _attention(backend, a, b, c, cu, max_seqlen, seg)
    if compiled:
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.varlen_attention(q, k, v, cu, seg, 32 ** -0.5)
    got = fn(q, k, v)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_cpu_autocast_matches_reference_dtype(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts(PARTS)
    torch.manual_seed(seed)
    attn = VarlenSelfAttention(64, 2)
    x = torch.randn(int(cu[-1]), 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = attn(x, cu, max_seqlen, seg, backend="reference")
        got = attn(x, cu, max_seqlen, seg, backend=backend)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


# ---- double backward -----------------------------------------------------------------------------------

def _second_order(backend, q, k, v, cu, max_seqlen, seg, w):
    """Gradients of a gradient penalty: d/d(q, k, v) of |d loss / d(q, k, v)|^2 plus a term of its own,
    taken with autograd.grad(inputs=...), which drops whatever the graph does not connect."""
    out = _attention(backend, q, k, v, cu, max_seqlen, seg)
    first = torch.autograd.grad((out * w).square().sum(), (q, k, v), create_graph=True)
    penalty = sum(g.square().sum() for g in first) + q.square().sum()
    return first, torch.autograd.grad(penalty, (q, k, v))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_double_backward_matches_reference_or_raises(backend, seed):
    """The Triton backward kernels are not differentiable; a create_graph backward must not return
    their results as constants (the penalty's gradient would silently lose its main term)."""
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts(PARTS)
    q, k, v = qkv(int(cu[-1]), 2, 16, torch.float32, gen)
    w = torch.randn(q.shape, generator=gen)
    want_first, want = _second_order("reference", q, k, v, cu, max_seqlen, seg, w)
    try:
        got_first, got = _second_order(backend, q, k, v, cu, max_seqlen, seg, w)
    except RuntimeError as exc:  # a clear refusal is acceptable (native: SDPA's own backward)
        assert backend == "native" and "not implemented" in str(exc), exc
        return
    for g, r in zip(got_first + got, want_first + want):
        torch.testing.assert_close(g, r, atol=tolerance(torch.float32, r)[0] * 10, rtol=1e-4)


# ---- the Triton launch grid ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_seq_heads, longest, block", [
    (1, 1, 16), (7, 33, 32), (12 * 8, 200, 64), (65535, 65535 * 16, 16), (65536, 65535 * 16 + 1, 16),
    (2**31 - 1, 10, 16), (2**31, 1, 16), (3, 2**31 - 1, 16), (16 * 4096, 2**31 - 1, 32), (12, 10**9, 16),
])
def test_tile_grid_stays_within_cuda_limits(num_seq_heads, longest, block):
    x, y, z = grid.tile_grid(num_seq_heads, longest, block)
    assert 1 <= x <= 2**31 - 1 and 1 <= y <= 65535 and 1 <= z <= 65535
    tiles = -(-longest // block)
    programs = num_seq_heads * tiles
    assert programs <= x * y * z < programs + x * y  # every program launched; at most one partial z-slice spare
    if num_seq_heads <= 2**31 - 1 and tiles <= 65535:
        assert (x, y, z) == (num_seq_heads, tiles, 1)  # the common launch is unchanged


def test_tile_grid_numbering_covers_every_tile_once(monkeypatch):
    """The kernels' decoding (_program_tile) of a split grid, with tiny limits so that all three grid
    dimensions are used: each (sequence x head, tile) pair gets exactly one live program."""
    monkeypatch.setattr(grid, "GRID_X_LIMIT", 5)
    monkeypatch.setattr(grid, "GRID_YZ_LIMIT", 3)
    num_seq_heads, longest, block = 7, 50, 16
    x, y, z = grid.tile_grid(num_seq_heads, longest, block)
    assert x <= 5 and y <= 3 and z <= 3 and z > 1
    tiles = grid.num_row_tiles(longest, block)
    live = []
    for pid in range(x * y * z):
        tile = min(pid // num_seq_heads, tiles)
        if tile < tiles:
            live.append((pid % num_seq_heads, tile))
    assert sorted(live) == [(sh, t) for sh in range(num_seq_heads) for t in range(tiles)]
    with pytest.raises(ValueError, match="more programs than a CUDA grid holds"):
        grid.tile_grid(10**6, 10**6, 16)


def _record_launches(monkeypatch, max_programs):
    """Wrap the attention kernels so every launch's grid (as the launcher evaluates it) is logged and
    checked, before the kernel runs, against CUDA's limits and the number of programs the layout needs."""
    from iwm_kernels.attention import triton_kernels as tk
    launches = []
    original = tk._kernel

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid_fn):
            def launch(*args, **kwargs):
                shape = tuple(grid_fn(kwargs) if callable(grid_fn) else grid_fn) + (1, 1)
                launches.append(shape[:3])
                assert shape[0] <= 2**31 - 1 and shape[1] <= 65535 and shape[2] <= 65535, shape
                assert shape[0] * shape[1] * shape[2] <= max_programs, f"grid {shape}: more programs than tiles"
                return self.kernel[grid_fn](*args, **kwargs)
            return launch

    monkeypatch.setattr(tk, "_kernel", lambda *a: (Recorder(original(*a)[0]), original(*a)[1]))
    return launches


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
@pytest.mark.parametrize("max_seqlen", [2**31 - 1, 10**6])
def test_triton_grid_is_sized_from_the_longest_sequence(max_seqlen, monkeypatch, seed):
    """max_seqlen is only a bound: a huge one (legal) must not size the grid (on a GPU, 2^31 / 32 row
    tiles exceed grid y's 65535; under the interpreter it would run for hours)."""
    launches = _record_launches(monkeypatch, max_programs=2 * 2 * 4)  # 2 sequences x 2 heads x 4 tiles of 16
    gen = torch.Generator().manual_seed(seed)
    cu, seg, _ = layout_from_parts([[BM + 5, 7], [3, 2]])        # longest 44 rows
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float32, gen)
    grad = torch.randn(q.shape, generator=gen)
    out = _attention("triton", q, k, v, cu, max_seqlen, seg)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    want_out = reference.varlen_attention(q, k, v, cu, seg, 32 ** -0.5)
    want = (want_out, *torch.autograd.grad(want_out, (q, k, v), grad))
    assert len(launches) == 3  # forward, dk/dv, dq
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available")
def test_triton_split_grid_matches_reference(monkeypatch, seed):
    """With tiny grid limits every kernel runs on a 3-D split grid with spare programs: same results."""
    monkeypatch.setattr(grid, "GRID_X_LIMIT", 5)
    monkeypatch.setattr(grid, "GRID_YZ_LIMIT", 2)
    launches = _record_launches(monkeypatch, max_programs=2 * 3 * 2 * 4)  # 2x spare at most
    gen = torch.Generator().manual_seed(seed)
    cu, seg, max_seqlen = layout_from_parts([[BM + 5, 7], [3, 2], [BM + 1]])   # 3 sequences x 2 heads
    q, k, v = qkv(int(cu[-1]), 2, 32, torch.float32, gen)
    grad = torch.randn(q.shape, generator=gen)
    out = _attention("triton", q, k, v, cu, max_seqlen, seg)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    want_out = reference.varlen_attention(q, k, v, cu, seg, 32 ** -0.5)
    want = (want_out, *torch.autograd.grad(want_out, (q, k, v), grad))
    assert launches and all(z > 1 for _, _, z in launches), launches
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)

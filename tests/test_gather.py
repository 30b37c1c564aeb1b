"""gather_tokens / apply_masks: every backend against the reference (forward and backward), the packed
layout against a per-sample loop, I-JEPA parity, determinism, torch.compile, and the argument checks."""
import gc

import pytest
import torch
import torch.nn.functional as F

import iwm_kernels
from iwm.masks import MultiBlockMaskSampler
from iwm_kernels.gather import reference
from tests.helpers import TOLERANCES, backends_on

BACKENDS = backends_on("cpu")
FAST = backends_on("cpu", include_reference=False)
# Gradients are sums over up to a few dozen rows, in a different order than the reference's.
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float64: (1e-10, 1e-10)}


def ragged_index(gen, batch, n, max_len, *, sort=False):
    """Packed random indices with repeats, an empty sequence and a length-1 one (when batch allows)."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=gen)
    if batch >= 3:
        lengths[0], lengths[1] = 0, 1
        lengths[2] = max(int(lengths[2]), 3)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    index = torch.randint(0, n, (int(cu[-1]),), generator=gen, dtype=torch.int32)
    if batch >= 3:  # a guaranteed repeat inside sample 2
        index[int(cu[2]) + 1] = index[int(cu[2])]
    if sort:
        index = torch.cat([index[int(a):int(b)].sort().values for a, b in zip(cu[:-1], cu[1:])])
    return index, cu


def make_case(gen, dtype, *, packed, shared, extras, batch=4, n=11, dim=37, sort=False):
    """x, index, cu_seqlens, pos, bias, normalize for one test case (D=37: not a multiple of any block)."""
    x = torch.randn(1 if shared else batch, n, dim, generator=gen).to(dtype)
    if packed:
        index, cu = ragged_index(gen, batch, n, 9, sort=sort)
    else:
        index = torch.randint(0, n, (batch, 6), generator=gen)
        if sort:
            index = index.sort(dim=1).values
        cu = None
    pos_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # an fp32 pos with a bf16 x is allowed
    pos = torch.randn(n, dim, generator=gen).to(pos_dtype) if "pos" in extras else None
    bias = torch.randn(batch, dim, generator=gen).to(dtype) if "bias" in extras else None
    return x, index, cu, pos, bias, "norm" in extras


def loop_reference(x, index, cu, pos, bias, normalize, eps=1e-5):
    """One sample at a time, the obvious way (the packed layout checked against a loop)."""
    rows = []
    batch = cu.numel() - 1 if index.dim() == 1 else index.shape[0]
    for b in range(batch):
        idx = (index[int(cu[b]):int(cu[b + 1])] if index.dim() == 1 else index[b]).long()
        r = x[b if x.shape[0] > 1 else 0, idx].double()
        if pos is not None:
            r = r + pos.reshape(-1, x.shape[-1])[idx].double()
        if bias is not None:
            r = r + bias[b].double()
        if normalize:
            r = F.layer_norm(r, (x.shape[-1],), eps=eps)
        rows.append(r)
    out = torch.cat(rows) if index.dim() == 1 else torch.stack(rows)
    return out.to(x.dtype)


EXTRAS = ["", "pos", "bias", "pos+bias", "norm", "pos+bias+norm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rect"])
@pytest.mark.parametrize("shared", [False, True], ids=["x[B]", "x[1]"])
def test_forward_backward_against_reference(backend, dtype, packed, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    atol, rtol = TOLERANCES[dtype]
    gatol, grtol = GRAD_TOL[dtype]
    for i, extras in enumerate(EXTRAS):
        # Sorted indices (the sampler's) take the Triton backward's no-sort path; unsorted ones the sort.
        x, index, cu, pos, bias, norm = make_case(gen, dtype, packed=packed, shared=shared, extras=extras,
                                                  sort=i % 2 == 0)
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, pos, bias)]
        out = iwm_kernels.gather_tokens(leaves[0], index, cu, pos=leaves[1], bias=leaves[2], normalize=norm,
                                        backend=backend)
        want = reference.gather_tokens(x, index, cu, pos=pos, bias=bias, normalize=norm)
        assert out.shape == want.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, want, atol=atol, rtol=rtol, msg=lambda m: f"{extras}: {m}")
        torch.testing.assert_close(out.double(), loop_reference(x, index, cu, pos, bias, norm).double(),
                                   atol=atol * 2, rtol=rtol * 2)
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(grad)
        needs = (True, pos is not None, bias is not None)
        ref = reference.gather_tokens_backward(grad, x, index, cu, pos, bias, norm, 1e-5, needs)
        for name, leaf, r in zip(("x", "pos", "bias"), leaves, ref):
            if leaf is None:
                continue
            assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
            torch.testing.assert_close(leaf.grad, r, atol=gatol, rtol=grtol,
                                       msg=lambda m: f"{extras}: grad {name}: {m}")


@pytest.mark.parametrize("extras", EXTRAS)
def test_reference_backward_is_autograd_of_reference_forward(extras, seed):
    gen = torch.Generator().manual_seed(seed)
    for packed, shared in [(True, False), (False, True)]:
        x, index, cu, pos, bias, norm = make_case(gen, torch.float64, packed=packed, shared=shared, extras=extras)
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, pos, bias)]
        out = reference.gather_tokens(leaves[0], index, cu, pos=leaves[1], bias=leaves[2], normalize=norm)
        grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out.backward(grad)
        got = reference.gather_tokens_backward(grad, x, index, cu, pos, bias, norm, 1e-5, (True, True, True))
        for leaf, g in zip(leaves, got):
            assert (leaf is None) == (g is None)
            if leaf is not None:
                torch.testing.assert_close(g, leaf.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    for packed, shared, extras in [(True, False, "pos+bias+norm"), (False, True, "pos+bias"), (True, True, "norm")]:
        x, index, cu, pos, bias, norm = make_case(gen, torch.float64, packed=packed, shared=shared, extras=extras,
                                                  batch=3, n=5, dim=6)
        inputs = [t.requires_grad_() for t in (x, pos, bias) if t is not None]

        def fn(*args, pos=pos, bias=bias, x=x, index=index, cu=cu, norm=norm):
            it = iter(args)
            xs = next(it)
            ps = next(it) if pos is not None else None
            bs = next(it) if bias is not None else None
            return iwm_kernels.gather_tokens(xs, index, cu, pos=ps, bias=bs, normalize=norm, backend=backend)

        # The full Jacobian on the reference; random projections (fast mode) on the kernels, whose
        # interpreter runs make each of gradcheck's many evaluations slow.
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=backend != "reference")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("normalize", [False, True])
def test_backward_is_deterministic_with_many_repeats(backend, normalize, seed):
    """Every sample hits the same few rows of a shared x (the predictor's case): sums must not depend
    on scheduling, so two backward passes agree bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 5, 33, generator=gen, requires_grad=True)
    pos = torch.randn(5, 33, generator=gen, requires_grad=True)
    index = torch.randint(0, 5, (12, 7), generator=gen)
    grad = torch.randn(12, 7, 33, generator=gen)
    grads = []
    for _ in range(2):
        x.grad = pos.grad = None
        iwm_kernels.gather_tokens(x, index, pos=pos, normalize=normalize, backend=backend).backward(grad)
        grads.append((x.grad.clone(), pos.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert x.grad.untyped_storage().data_ptr() != pos.grad.untyped_storage().data_ptr()


@pytest.mark.parametrize("block_d", [4, 16])
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_streamed_rows(block_d, normalize, seed):
    """Rows wider than one block (the path for very wide D), forced on a small D not a multiple of it."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available")
    from iwm_kernels.gather import triton_kernels

    gen = torch.Generator().manual_seed(seed)
    x, index, cu, pos, bias, _ = make_case(gen, torch.float32, packed=True, shared=False, extras="pos+bias", dim=37)
    out = triton_kernels.gather_tokens(x, index, cu, pos, bias, normalize, 1e-5, block_d=block_d)
    want = reference.gather_tokens(x, index, cu, pos=pos, bias=bias, normalize=normalize)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    got = triton_kernels.gather_tokens_backward(grad, x, index, cu, pos, bias, normalize, 1e-5, (True, True, True),
                                                block_d=block_d)
    ref = reference.gather_tokens_backward(grad, x, index, cu, pos, bias, normalize, 1e-5, (True, True, True))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_matches_layer_norm(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 10, 24, generator=gen) * 3 + 1
    index = torch.randint(0, 10, (3, 5), generator=gen)
    out = iwm_kernels.gather_tokens(x, index, normalize=True, backend=backend)
    want = F.layer_norm(torch.gather(x, 1, index[..., None].expand(-1, -1, 24)), (24,))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_degenerate(backend):
    x = torch.randn(2, 4, 8, requires_grad=True)
    empty = iwm_kernels.gather_tokens(x, torch.zeros(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                                      normalize=True, backend=backend)
    assert empty.shape == (0, 8)
    empty.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    rect = iwm_kernels.gather_tokens(x, torch.zeros(2, 0, dtype=torch.int64), backend=backend)
    assert rect.shape == (2, 0, 8)
    # every sequence empty but one of length 1
    one = iwm_kernels.gather_tokens(x, torch.tensor([3]), torch.tensor([0, 0, 1]), backend=backend)
    assert torch.equal(one, x[1, 3:4].detach())


# A child process runs every call on an [B, 0, D] x: an empty token axis with indices into it must raise
# a ValueError naming x, never reach a kernel (clamping into an empty axis read out of bounds: rc -11).
_EMPTY_AXIS_SCRIPT = """
import sys
import torch
import iwm_kernels
from iwm_kernels import _native

backend, backward = sys.argv[1], sys.argv[2] == "backward"
torch.manual_seed(int(sys.argv[3]))
x = torch.randn(3, 0, 5, requires_grad=backward)
rect = torch.randint(-4, 4, (3, 2))
calls = {
    "gather rect": lambda cv: iwm_kernels.gather_tokens(x, rect, backend=backend, check_values=cv),
    "gather packed": lambda cv: iwm_kernels.gather_tokens(x, rect.reshape(-1), torch.tensor([0, 2, 2, 6]),
                                                          normalize=True, backend=backend, check_values=cv),
    "apply_masks": lambda cv: iwm_kernels.apply_masks(x, [rect, rect], backend=backend, check_values=cv),
}
for name, call in calls.items():
    for check_values in (False, True):
        try:
            out = call(check_values)
            if backward:
                out.sum().backward()
        except ValueError as exc:
            assert str(exc).startswith("x: the token axis (dim 1) is empty"), (name, str(exc))
        else:
            raise AssertionError(f"{name}, check_values={check_values}: no error")
if backend == "native":  # the raw op guards itself too
    try:
        _native.ops().gather_tokens_fwd(x.detach(), rect.reshape(-1), None, 2, 3, None, None, False, 1e-5)
    except RuntimeError as exc:
        assert "x: the token axis (dim 1) is empty" in str(exc), str(exc)
    else:
        raise AssertionError("raw native op: no error")
print("checked")
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_empty_token_axis_raises_instead_of_crashing(backend, direction, seed):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _EMPTY_AXIS_SCRIPT, backend, direction, str(seed)],
                         cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"rc {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.strip().endswith("checked")


def test_clamp_index_refuses_an_empty_axis():
    from iwm_kernels._validate import clamp_index
    with pytest.raises(ValueError, match="index: 2 indices into an empty axis"):
        clamp_index(torch.tensor([0, 3]), 0)
    assert clamp_index(torch.zeros(0, dtype=torch.int64), 0).numel() == 0
    assert clamp_index(torch.tensor([-2, 1, 9]), 4).tolist() == [0, 1, 3]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_values", [True, False])
def test_empty_batch_forward_and_backward(backend, check_values, seed):
    """B = 0 with gradients: every layout gives the reference's empty outputs and zero-size/zero grads."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = 6, 5
    cases = [
        ("rect", torch.randn(0, n, dim, generator=gen), torch.zeros(0, 3, dtype=torch.int64), None),
        ("packed", torch.randn(0, n, dim, generator=gen), torch.zeros(0, dtype=torch.int32),
         torch.zeros(1, dtype=torch.int32)),
        ("shared x", torch.randn(1, n, dim, generator=gen), torch.zeros(0, 4, dtype=torch.int64), None),
    ]
    for name, x, index, cu in cases:
        for normalize in (False, True):
            pos = torch.randn(n, dim, generator=gen)
            bias = torch.randn(0, dim, generator=gen)
            leaves = [t.clone().requires_grad_() for t in (x, pos, bias)]
            out = iwm_kernels.gather_tokens(leaves[0], index, cu, pos=leaves[1], bias=leaves[2], normalize=normalize,
                                            backend=backend, check_values=check_values)
            refs = [t.clone().requires_grad_() for t in (x, pos, bias)]
            want = reference.gather_tokens(refs[0], index, cu, pos=refs[1], bias=refs[2], normalize=normalize)
            assert out.shape == want.shape and out.dtype == want.dtype, name
            out.sum().backward()
            want.sum().backward()
            for leaf, ref in zip(leaves, refs):
                assert leaf.grad is not None and torch.equal(leaf.grad, ref.grad), name
    x = torch.randn(0, n, dim, generator=gen, requires_grad=True)
    got = iwm_kernels.apply_masks(x, [torch.zeros(0, 3, dtype=torch.int64)] * 2, backend=backend,
                                  check_values=check_values)
    assert got.shape == (0, 3, dim)
    got.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_dim_one_with_any_last_stride(backend, dtype, seed):
    """D = 1: the last stride is meaningless (torch calls the tensor contiguous whatever it is)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 7, generator=gen).to(dtype).transpose(1, 2)  # [3, 7, 1], strides (7, 1, 7)
    assert x.is_contiguous() and x.stride(-1) != 1
    index, cu = ragged_index(gen, 3, 7, 5)
    pos = torch.randn(7, 1, generator=gen)
    bias = torch.randn(3, 1, generator=gen).to(dtype)
    for normalize in (False, True):
        leaves = [t.clone().requires_grad_() if t is not x else x.detach().requires_grad_() for t in (x, pos, bias)]
        assert leaves[0].stride() == x.stride()
        out = iwm_kernels.gather_tokens(leaves[0], index, cu, pos=leaves[1], bias=leaves[2], normalize=normalize,
                                        backend=backend)
        want = reference.gather_tokens(x, index, cu, pos=pos, bias=bias, normalize=normalize)
        torch.testing.assert_close(out, want, atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(grad)
        ref = reference.gather_tokens_backward(grad, x, index, cu, pos, bias, normalize, 1e-5, (True, True, True))
        for leaf, r in zip(leaves, ref):
            torch.testing.assert_close(leaf.grad, r, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])


def test_triton_grids_fit_cuda_limits():
    """Every launch is a 1-D grid (x allows 2^31 - 1 blocks; y and z only 65535), even for rows wider than
    65535 column blocks or more destination rows than 65535."""
    triton_kernels = pytest.importorskip("iwm_kernels.gather.triton_kernels")
    from iwm_kernels._validate import MAX_GRID_X

    for num_dest, dim, block in [(1, 2**25 + 3, 256), (64 * 196, 768, 256), (2**20, 1, 1), (3, 37, 4)]:
        grid = triton_kernels.segment_sum_grid(num_dest, dim, block)
        assert len(grid) == 1 and 0 < grid[0] <= MAX_GRID_X
        assert grid[0] == num_dest * -(-dim // block)  # one program per (destination, column block)
    for total, rows in [(2**33, 16), (5, 16), (196 * 4096, 1)]:
        grid = triton_kernels.row_grid(total, rows)
        assert len(grid) == 1 and grid[0] * rows >= total and (grid[0] - 1) * rows < total
    with pytest.raises(ValueError, match="x: too large for one kernel launch"):
        triton_kernels.segment_sum_grid(2**31, 2, 1)
    with pytest.raises(ValueError, match="index: too large for one kernel launch"):
        triton_kernels.row_grid(2**40, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_against_sampler_masks(backend, seed):
    """Context and targets of a real MaskBatch (ragged), gathered packed, against the per-sample loop."""
    batch = MultiBlockMaskSampler(6, num_targets=3, min_keep=4, seed=seed).sample(5, step=seed % 1000)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 36, 16, generator=gen)
    pos = torch.randn(1, 36, 16, generator=gen)
    ctx = iwm_kernels.gather_tokens(x, batch.context_index, batch.context_cu, pos=pos, backend=backend)
    torch.testing.assert_close(ctx, loop_reference(x, batch.context_index, batch.context_cu, pos, None, False))
    tgt = iwm_kernels.gather_tokens(x, batch.target_index, batch.target_cu_per_sample, normalize=True, backend=backend)
    torch.testing.assert_close(tgt, loop_reference(x, batch.target_index, batch.target_cu_per_sample, None, None, True),
                               atol=1e-5, rtol=1e-5)


# ---- apply_masks: I-JEPA parity ---------------------------------------------------------------------

def ijepa_apply_masks(x, masks):
    """I-JEPA's formula (src/masks/utils.py): a repeated int64 index and torch.gather per mask."""
    out = []
    for m in masks:
        out.append(torch.gather(x, dim=1, index=m.unsqueeze(-1).repeat(1, 1, x.size(-1))))
    return torch.cat(out, dim=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_masks", [1, 4])
def test_apply_masks_matches_ijepa(backend, dtype, num_masks, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 13, 21, generator=gen).to(dtype)
    masks = [torch.randint(0, 13, (3, 7), generator=gen) for _ in range(num_masks)]
    if num_masks == 1:
        masks = [masks[0].sort(dim=1).values]  # the sampler's (sorted) form takes the no-sort path
    masks[0][0, 1] = masks[0][0, 0]            # a repeat
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = iwm_kernels.apply_masks(xa, masks, backend=backend)
    want = ijepa_apply_masks(xb, masks)
    assert torch.equal(got, want)  # a gather copies: values are exact in any dtype
    grad = torch.randn(want.shape, generator=gen).to(dtype)
    got.backward(grad)
    want.backward(grad)
    gatol, grtol = GRAD_TOL[dtype]
    torch.testing.assert_close(xa.grad, xb.grad, atol=gatol, rtol=grtol)


def test_apply_masks_int32_and_ijepa_collated_masks(seed):
    batch = MultiBlockMaskSampler(8, context_mode="block", seed=seed).sample(4, step=1)
    masks_enc, masks_pred = batch.to_ijepa()
    x = torch.randn(4, 64, 10)
    for masks in (masks_enc, masks_pred, [m.int() for m in masks_pred]):
        assert torch.equal(iwm_kernels.apply_masks(x, masks), ijepa_apply_masks(x, [m.long() for m in masks]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_values_are_clamped_not_read_out_of_bounds(backend, seed):
    """check_values=False: no host round trip; bad values are clamped on the device (wrong rows, never
    an out-of-bounds access)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    bias = torch.randn(3, 8, generator=gen, requires_grad=True)
    index = torch.tensor([0, -7, 4, 99, 2, 1])
    cu = torch.tensor([3, 9, 1, 40])
    out = iwm_kernels.gather_tokens(x, index, cu, bias=bias, normalize=True, backend=backend, check_values=False)
    safe_index, safe_cu = torch.tensor([0, 0, 4, 4, 2, 1]), torch.tensor([0, 6, 6, 6])
    torch.testing.assert_close(out, reference.gather_tokens(x, safe_index, safe_cu, bias=bias, normalize=True),
                               atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    want = reference.gather_tokens_backward(grad, x.detach(), safe_index, safe_cu, None, bias.detach(), True, 1e-5,
                                            (True, False, True))
    torch.testing.assert_close(x.grad, want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias.grad, want[2], atol=1e-4, rtol=1e-4)
    masks = [torch.tensor([[0, 9], [-1, 2], [4, 4]])]
    got = iwm_kernels.apply_masks(x.detach(), masks, backend=backend, check_values=False)
    assert torch.equal(got, ijepa_apply_masks(x.detach(), [torch.tensor([[0, 4], [0, 2], [4, 4]])]))


def test_unchecked_under_torch_compile(seed):
    gen = torch.Generator().manual_seed(seed)
    x, index, cu, pos, bias, _ = make_case(gen, torch.float32, packed=True, shared=False, extras="pos")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x):
        return iwm_kernels.gather_tokens(x, index, cu, pos=pos, check_values=False)

    torch.testing.assert_close(fn(x), reference.gather_tokens(x, index, cu, pos=pos))


# ---- memory and the output pool ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_gather_does_not_keep_x_alive(backend, seed):
    x = torch.randn(4, 50, 64, requires_grad=True)
    y = x * 2  # an activation nothing else keeps
    index = torch.randint(0, 50, (4, 10))
    out = iwm_kernels.gather_tokens(y, index, backend=backend)
    kept = [t for t in out.grad_fn.saved_tensors if t is not None and t.is_floating_point()]
    assert kept  # the x stand-in (else the size check below would pass on nothing)
    assert all(t.untyped_storage().nbytes() <= 64 * 4 for t in kept)
    grad = torch.randn(out.shape)
    out.backward(grad)
    want = reference.gather_tokens_backward(grad, y.detach(), index, None, None, None, False, 1e-5,
                                            (True, False, False))[0]
    torch.testing.assert_close(x.grad, 2 * want)


def test_native_output_pool_reuses_blocks():
    if "native" not in BACKENDS:
        pytest.skip("native backend not available")
    from iwm_kernels.gather import native

    x = torch.randn(1, 64, 4096)
    index = torch.randint(0, 64, (2, 1100))  # 2*1100*4096*4 bytes = 34 MB: pooled (from 32 MB up)
    old = native.set_output_pool_limit(64 << 20)
    try:
        out = iwm_kernels.gather_tokens(x, index, backend="native")
        ptr = out.data_ptr()
        del out
        gc.collect()
        before = native.output_pool_stats()
        again = iwm_kernels.gather_tokens(x, index, backend="native")
        after = native.output_pool_stats()
        assert after["hits"] == before["hits"] + 1 and again.data_ptr() == ptr
        torch.testing.assert_close(again, reference.gather_tokens(x, index))
        again.resize_(2 * 1100 * 4096 * 2)  # pooled storage behaves like any other (resizable)
        del again
        native.set_output_pool_limit(0)
        assert native.output_pool_stats()["cached_bytes"] == 0
        fresh = iwm_kernels.gather_tokens(x, index, backend="native")
        torch.testing.assert_close(fresh, reference.gather_tokens(x, index))
    finally:
        native.set_output_pool_limit(old)


# ---- torch.compile ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_through_custom_op(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    x, index, cu, pos, bias, _ = make_case(gen, torch.float32, packed=True, shared=False, extras="pos+bias")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, pos, bias):
        out = iwm_kernels.gather_tokens(x, index, cu, pos=pos, bias=bias, normalize=True, backend=backend)
        return (out * out).sum()

    leaves = [t.clone().requires_grad_() for t in (x, pos, bias)]
    step(*leaves).backward()
    refs = [t.clone().requires_grad_() for t in (x, pos, bias)]
    out = reference.gather_tokens(refs[0], index, cu, pos=refs[1], bias=refs[2], normalize=True)
    (out * out).sum().backward()
    for a, b in zip(leaves, refs):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_apply_masks_and_runtime_checks(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 8, generator=gen, requires_grad=True)
    masks = [torch.randint(0, 9, (3, 4), generator=gen) for _ in range(2)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x, masks):
        return iwm_kernels.apply_masks(x, masks, backend=backend)

    out = fn(x, masks)
    assert torch.equal(out, ijepa_apply_masks(x, masks))
    out.sum().backward()
    xr = x.detach().clone().requires_grad_()
    ijepa_apply_masks(xr, masks).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    bad = [masks[0], masks[1].clone()]
    bad[1][0, 0] = 9  # in range of the flattened B*N tokens, out of range of a sample's N
    with pytest.raises(ValueError, match="index"):
        fn(x, bad)


# ---- errors: every one names the offending argument ----------------------------------------------------

def _args():
    return dict(x=torch.randn(3, 5, 4), index=torch.tensor([0, 4, 1, 2]), cu_seqlens=torch.tensor([0, 1, 3, 4]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, match", [
    ("negative", "index: negative index -1"),
    ("too_large", "index: index 5 out of range for size 5"),
    ("cu_not_monotone", "cu_seqlens: must be non-decreasing"),
    ("cu_wrong_end", "cu_seqlens: must end at 4"),
    ("cu_wrong_start", "cu_seqlens: must start at 0"),
    ("cu_count", "x: batch 3 must be 1"),
    ("cu_missing", "cu_seqlens: required"),
    ("cu_with_rect", "cu_seqlens: must be None"),
    ("cu_float", "cu_seqlens: dtype float32"),
    ("index_float", "index: dtype float32"),
    ("index_3d", "index: expected 1-D or 2-D"),
    ("x_int", "x: dtype int64"),
    ("x_2d", "x: expected 3-D"),
    ("x_zero_dim", "x: the feature dimension"),
    ("pos_shape", r"pos: expected shape \(5, 4\)"),
    ("pos_int", "pos: dtype int32"),
    ("bias_shape", r"bias: expected shape \(3, 4\)"),
    ("index_device", "index: on meta"),
    ("pos_device", "pos: on meta"),
    ("eps", "eps: must be finite and > 0"),
    ("normalize", "normalize: expected a bool"),
    ("rect_batch", "x: batch 3 must be 1"),
    ("no_sequences", "cu_seqlens: holds no sequence"),
    ("check_values", "check_values: expected a bool"),
])
def test_errors_name_the_argument(backend, case, match):
    a = _args()
    kw = {}
    if case == "negative":
        a["index"][2] = -1
    elif case == "too_large":
        a["index"][1] = 5
    elif case == "cu_not_monotone":
        a["cu_seqlens"] = torch.tensor([0, 3, 1, 4])
    elif case == "cu_wrong_end":
        a["cu_seqlens"] = torch.tensor([0, 1, 3, 5])
    elif case == "cu_wrong_start":
        a["cu_seqlens"] = torch.tensor([1, 1, 3, 4])
    elif case == "cu_count":
        a["cu_seqlens"] = torch.tensor([0, 1, 4])
    elif case == "cu_missing":
        a["cu_seqlens"] = None
    elif case == "cu_with_rect":
        a["index"] = torch.zeros(3, 2, dtype=torch.int64)
    elif case == "cu_float":
        a["cu_seqlens"] = a["cu_seqlens"].float()
    elif case == "index_float":
        a["index"] = a["index"].float()
    elif case == "index_3d":
        a["index"] = torch.zeros(3, 1, 1, dtype=torch.int64)
    elif case == "x_int":
        a["x"] = torch.ones(3, 5, 4, dtype=torch.int64)
    elif case == "x_2d":
        a["x"] = torch.randn(5, 4)
    elif case == "x_zero_dim":
        a["x"] = torch.randn(3, 5, 0)
    elif case == "pos_shape":
        kw["pos"] = torch.randn(4, 4)
    elif case == "pos_int":
        kw["pos"] = torch.ones(5, 4, dtype=torch.int32)
    elif case == "bias_shape":
        kw["bias"] = torch.randn(2, 4)
    elif case == "index_device":
        a["index"] = a["index"].to("meta")
    elif case == "pos_device":
        kw["pos"] = torch.randn(5, 4, device="meta")
    elif case == "eps":
        kw["eps"] = 0.0
    elif case == "normalize":
        kw["normalize"] = 1
    elif case == "rect_batch":
        a["index"], a["cu_seqlens"] = torch.zeros(2, 2, dtype=torch.int64), None
    elif case == "no_sequences":
        a["x"], a["cu_seqlens"] = torch.randn(1, 5, 4), torch.zeros(1, dtype=torch.int64)
    elif case == "check_values":
        kw["check_values"] = "no"
    with pytest.raises((ValueError, TypeError), match=match):
        iwm_kernels.gather_tokens(a["x"], a["index"], a["cu_seqlens"], backend=backend, **kw)


@pytest.mark.parametrize("case, match", [
    ("bare_tensor", "masks: expected a list"),
    ("empty", "masks: empty list"),
    ("rows", r"masks\[1\]: 2 rows, but x has batch 3"),
    ("lengths", r"masks\[1\]: 3 indices per row"),
    ("range", r"masks\[1\]: index 5 out of range"),
    ("negative", r"masks\[0\]: negative index"),
    ("dtype", r"masks\[0\]: dtype float32"),
    ("x", "x: expected 3-D"),
])
def test_apply_masks_errors(case, match):
    x = torch.randn(3, 5, 4)
    masks = [torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64)]
    if case == "bare_tensor":
        masks = masks[0]
    elif case == "empty":
        masks = []
    elif case == "rows":
        masks[1] = masks[1][:2]
    elif case == "lengths":
        masks[1] = torch.zeros(3, 3, dtype=torch.int64)
    elif case == "range":
        masks[1][2, 1] = 5
    elif case == "negative":
        masks = [masks[0].clone()]
        masks[0][1, 0] = -2
    elif case == "dtype":
        masks[0] = masks[0].float()
    elif case == "x":
        x = x[0]
    with pytest.raises((ValueError, TypeError), match=match):
        iwm_kernels.apply_masks(x, masks)


def test_check_index_values_reports_order():
    from iwm_kernels._validate import check_index_values
    idx = torch.tensor([0, 2, 2, 1, 3, 0])
    assert not check_index_values(idx, "i", 4)
    assert check_index_values(idx, "i", 4, segment_starts=torch.tensor([0, 3, 5, 6]))
    assert not check_index_values(idx, "i", 4, segment_starts=torch.tensor([3]))
    assert not check_index_values(idx, "i", 4, segment_starts=torch.tensor([0, 3, 5]), want_order=False)
    with pytest.raises(ValueError, match="i: index 3 out of range for size 3"):
        check_index_values(idx, "i", 3, want_order=False)


def test_native_backend_has_no_cuda_path():
    from iwm_kernels._backend import resolve_backend
    with pytest.raises(RuntimeError, match="no native code for cuda"):
        resolve_backend("native", torch.device("cuda"), "gather_tokens")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        iwm_kernels.gather_tokens(torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.int64), backend="fast")


# ---- GPU -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_against_reference(backend, dtype, seed):
    from iwm_kernels import _backend
    if not _backend.runs_on(backend, torch.device("cuda")).available:
        pytest.skip(f"{backend} not available on CUDA")
    gen = torch.Generator().manual_seed(seed)
    atol, rtol = TOLERANCES[dtype]
    gatol, grtol = GRAD_TOL[dtype]
    for packed, shared, extras, dim in [(True, False, "pos+bias+norm", 768), (False, False, "", 1280),
                                        (True, True, "bias", 384), (False, False, "pos+norm", 37)]:
        x, index, cu, pos, bias, norm = make_case(gen, dtype, packed=packed, shared=shared, extras=extras,
                                                  batch=64, n=196, dim=dim, sort=packed)
        cpu = (x, index, cu, pos, bias)
        x, index, cu, pos, bias = [t.cuda() if t is not None else None for t in cpu]
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, pos, bias)]
        out = iwm_kernels.gather_tokens(leaves[0], index, cu, pos=leaves[1], bias=leaves[2], normalize=norm,
                                        backend=backend)
        want = reference.gather_tokens(*cpu[:3], pos=cpu[3], bias=cpu[4], normalize=norm)
        torch.testing.assert_close(out.cpu(), want, atol=atol, rtol=rtol)
        grad = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(grad.cuda())
        ref = reference.gather_tokens_backward(grad, *cpu[:3], cpu[3], cpu[4], norm, 1e-5,
                                               (True, pos is not None, bias is not None))
        for leaf, r in zip(leaves, ref):
            if leaf is not None:
                torch.testing.assert_close(leaf.grad.cpu(), r, atol=gatol, rtol=grtol)
    masks = [torch.randint(0, 196, (64, 50), device="cuda") for _ in range(4)]
    xm = torch.randn(64, 196, 768, device="cuda", dtype=dtype)
    assert torch.equal(iwm_kernels.apply_masks(xm, masks, backend=backend), ijepa_apply_masks(xm, masks))

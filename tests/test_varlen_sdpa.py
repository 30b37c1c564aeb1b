"""The C++ extension's varlen_sdpa (csrc/varlen_sdpa.cpp): ragged plain layouts on the CPU, each run of
equal-length sequences one flash call on one thread. Against the reference (float64) and against SDPA
called per sequence from Python (the same kernel: the same numbers), forward and backward, float32 and
bfloat16, zero-length sequences, thread counts; bad input named; where it is chosen over padding."""
import random

import pytest
import torch
import torch.nn.functional as F

from iwm_kernels import _native
from iwm_kernels.attention import native, prepare, reference

pytestmark = pytest.mark.skipif(not _native.status().available, reason="native extension not built")


def _lengths(rng, seqs, lo, hi, zeros=True, runs=True):
    out = []
    while len(out) < seqs:
        n = rng.randint(lo, hi)
        out += [n] * (rng.randint(1, 4) if runs else 1)  # runs of equal lengths, as the repeated predictor's blocks
    if zeros:
        out[rng.randrange(len(out))] = 0
        out.insert(0, 0)
    return out


def _layout(lengths):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    return prepare(cu, None, sum(lengths), max(lengths), check_values=False,
                   host_lengths=torch.tensor(lengths)), cu


def _qkv(T, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 3, H, D, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(T, H, D, generator=g).to(dtype)
    return qkv, grad


def _ours(qkv, grad, layout, scale):
    q, k, v = qkv.unbind(1)  # strided views of one tensor, as the model's qkv projection gives them
    assert native.uses_per_sequence(layout, q)
    out = native.varlen_attention(q, k, v, layout, scale)
    (d,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), d


def _per_sequence_sdpa(qkv, grad, lengths, scale):
    """SDPA once per sequence from Python (the kernel varlen_sdpa calls)."""
    q, k, v = qkv.unbind(1)
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        if qs.shape[0]:
            o = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (qs, ks, vs)), scale=scale)
            outs.append(o[0].transpose(0, 1))
    out = torch.cat(outs)
    (d,) = torch.autograd.grad(out, qkv, grad)
    return out.detach(), d


def _reference(qkv, grad, cu, scale):
    x = qkv.detach().double().requires_grad_()
    out = reference.varlen_attention(*x.unbind(1), cu, None, scale)
    (d,) = torch.autograd.grad(out, x, grad.double())
    return out.detach(), d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(3, 64), (3, 32), (2, 16)])
def test_equals_sdpa_per_sequence_and_the_reference(seed, dtype, heads, head_dim):
    rng = random.Random(seed)
    lengths = _lengths(rng, rng.randint(3, 24), 20, 130)
    layout, cu = _layout(lengths)
    qkv, grad = _qkv(sum(lengths), heads, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    out, d = _ours(qkv, grad, layout, scale)
    assert out.dtype == dtype and d.dtype == dtype and out.shape == (sum(lengths), heads, head_dim)
    same_out, same_d = _per_sequence_sdpa(qkv, grad, lengths, scale)
    torch.testing.assert_close(out, same_out, rtol=0, atol=0)
    torch.testing.assert_close(d, same_d, rtol=0, atol=0)
    ref_out, ref_d = _reference(qkv, grad, cu, scale)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(d.double(), ref_d, **tol)


def test_the_same_bits_at_any_thread_count(seed):
    rng = random.Random(seed)
    lengths = _lengths(rng, 20, 40, 120)
    layout, _ = _layout(lengths)
    qkv, grad = _qkv(sum(lengths), 3, 32, torch.float32, seed)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ours(qkv, grad, layout, 0.2)
        torch.set_num_threads(2)
        two = _ours(qkv, grad, layout, 0.2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_many_sequences_beyond_the_python_loops_limit(seed):
    """More sequences than the Python loop takes (LOOP_MAX_SEQS): varlen_sdpa still serves them."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(native.LOOP_MAX_SEQS + 40)]
    layout, cu = _layout(lengths)
    qkv, grad = _qkv(sum(lengths), 2, 16, torch.float32, seed)
    out, d = _ours(qkv, grad, layout, 0.25)
    ref_out, ref_d = _reference(qkv, grad, cu, 0.25)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=1e-5)


def test_separate_and_strided_q_k_v_and_a_strided_upstream_gradient(seed):
    """q, k, v that are not views of one tensor, k with a head-dim stride of 2 (copied for the op, its
    gradient still reaching the wide tensor), and a strided upstream gradient."""
    lengths = [70, 70, 33, 0, 101]
    layout, cu = _layout(lengths)
    g = torch.Generator().manual_seed(seed)
    q, v = (torch.randn(sum(lengths), 3, 32, generator=g, requires_grad=True) for _ in range(2))
    wide_k = torch.randn(sum(lengths), 3, 64, generator=g, requires_grad=True)
    k = wide_k[..., ::2]
    assert k.stride(-1) == 2 and native.uses_per_sequence(layout, q)
    out = native.varlen_attention(q, k, v, layout, 0.3)
    wide = torch.randn(sum(lengths), 3, 64, generator=g)
    dq, dwide_k, dv = torch.autograd.grad(out, (q, wide_k, v), wide[..., ::2])  # a non-unit head-dim stride
    x = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.varlen_attention(*x, cu, None, 0.3)
    ref_grads = torch.autograd.grad(ref, x, wide[..., ::2].double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert dwide_k[..., 1::2].eq(0).all()
    for a, b in zip((dq, dwide_k[..., ::2], dv), ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_once_differentiable():
    layout, _ = _layout([40, 90])
    qkv = torch.randn(130, 3, 2, 16, requires_grad=True)
    out = native.varlen_attention(*qkv.unbind(1), layout, 0.25)
    (d,) = torch.autograd.grad(out.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        d.sum().backward()


def test_bad_input_is_named():
    ops = _native.ops()
    q = torch.randn(10, 2, 8)
    with pytest.raises(RuntimeError, match="lengths sum to 9 but the tensors have 10 rows"):
        ops.varlen_sdpa_fwd(q, q, q, [4, 5], 0.3)
    with pytest.raises(RuntimeError, match="non-negative"):
        ops.varlen_sdpa_fwd(q, q, q, [12, -2], 0.3)
    with pytest.raises(RuntimeError, match="one shape"):
        ops.varlen_sdpa_fwd(q, q[:9], q, [10], 0.3)
    with pytest.raises(RuntimeError, match="unit last-dim stride"):
        ops.varlen_sdpa_fwd(torch.randn(10, 2, 16)[..., ::2], q, q, [10], 0.3)
    out, lse = ops.varlen_sdpa_fwd(q, q, q, [3, 7], 0.3)
    with pytest.raises(RuntimeError, match="lse must be float32"):
        ops.varlen_sdpa_bwd(q, q, q, q, out, lse[:5], [3, 7], 0.3)


def test_where_it_runs_and_where_padding_does(monkeypatch):
    long, _ = _layout([66 + (37 * i) % 57 for i in range(32)])  # ViT-Ti/16's ragged contexts
    many_short, _ = _layout([10 + i % 11 for i in range(64)])   # padding saves too little per call
    q = torch.empty(0, 3, 64)
    assert native._runs_in_native(q, 0.0) and native.uses_per_sequence(long, q)
    assert not native.uses_per_sequence(many_short, torch.empty(0, 3, 8))
    assert not native._runs_in_native(q, 0.1)                          # dropout: the padded SDPA path
    assert not native._runs_in_native(q.double(), 0.0)                 # float64: the Python loop
    monkeypatch.setattr(_native, "status", lambda: _native.Availability(False, "disabled"))
    assert not native._runs_in_native(q, 0.0)                          # no extension: the Python loop

"""iwm_kernels.linear: oneDNN's fp32 CPU linear (forward, input, weight, bias and residual gradients)
against F.linear, the eager reference; where it must not take the call, exactly F.linear. Every test of
the oneDNN path first checks that oneDNN ran (a test that silently took F.linear would compare F.linear
with itself)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iwm_kernels import use_backend
from iwm_kernels.gemm import MIN_ROWS, Linear, linear, onednn_available
from tests.helpers import OpNames as _Ops

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch has no oneDNN linear")


def _run(fn, tensors, grad_seed):
    """fn()'s output and the gradients of `tensors` (those that require grad) for a random output grad."""
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)))
    return out.detach(), [t.grad for t in tensors]


def _leaf(*shape, requires_grad=True):
    return torch.randn(*shape).requires_grad_(requires_grad)


def _close(got, want):
    # fp32 products of a few hundred terms summed in another order: relative 1e-5 of the output's scale
    scale = want.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * scale)


# (rows, K, N): N > K and N < K take the two orientations of the weight gradient; N == K either
@pytest.mark.parametrize("lead", [(MIN_ROWS,), (3, 2 * MIN_ROWS // 3 + 5), (1100,)], ids=["2d", "3d", "rows1100"])
@pytest.mark.parametrize("k,n", [(96, 288), (384, 96), (64, 64)], ids=["wide", "narrow", "square"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_f_linear_forward_and_backward(seed, lead, k, n, bias):
    x, w = _leaf(*lead, k), _leaf(n, k) * 0.1
    w = w.detach().requires_grad_()
    b = _leaf(n) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    ops = _Ops()
    with ops:
        got, g_got = _run(lambda: linear(x, w, b), leaves, seed)
    assert ops.onednn
    want, g_want = _run(lambda: F.linear(x, w, b), leaves, seed)
    assert got.shape == want.shape == (*lead, n)
    _close(got, want)
    for a, e in zip(g_got, g_want):
        assert a.shape == e.shape
        _close(a, e)


@pytest.mark.parametrize("lead", [(MIN_ROWS + 3,), (4, 100)], ids=["2d", "3d"])
def test_residual_is_added_in_the_product(seed, lead):
    x, w, b = _leaf(*lead, 48), _leaf(80, 48), _leaf(80)
    r = _leaf(*lead, 80)
    ops = _Ops()
    with ops:
        got, g_got = _run(lambda: linear(x, w, b, residual=r), [x, w, b, r], seed)
    assert ops.onednn
    want, g_want = _run(lambda: r + F.linear(x, w, b), [x, w, b, r], seed)
    _close(got, want)
    for a, e in zip(g_got, g_want):
        _close(a, e)
    assert not got.equal(r.detach())


def test_strided_inputs_and_a_sliced_weight(seed):
    """x a transposed view, the weight a column slice (the action MLP's split fc1), the residual a
    transposed view: the same values and gradients as F.linear on them."""
    base_x = _leaf(40, MIN_ROWS, 1)[..., 0].t()      # [MIN_ROWS, 40], strides (1, MIN_ROWS)
    x = base_x.detach().requires_grad_()
    xt = torch.randn(40, MIN_ROWS).t().requires_grad_()   # a leaf that is itself a transposed view
    full = _leaf(24, 47)
    r = torch.randn(24, MIN_ROWS).t()
    assert not xt.is_contiguous() and not r.is_contiguous()
    for inp in (x, xt):
        ops = _Ops()
        with ops:
            got, g_got = _run(lambda: linear(inp, full[:, :40], residual=r), [inp, full], seed)
        assert ops.onednn
        want, g_want = _run(lambda: r + F.linear(inp, full[:, :40]), [inp, full], seed)
        _close(got, want)
        for a, e in zip(g_got, g_want):
            _close(a, e)
        assert full.grad[:, 40:].abs().max() == 0


@pytest.mark.parametrize("needs", ["x", "weight", "bias", "none"])
def test_only_the_gradients_asked_for(seed, needs):
    x = _leaf(MIN_ROWS, 32, requires_grad=needs == "x")
    w = _leaf(16, 32, requires_grad=needs == "weight")
    b = _leaf(16, requires_grad=needs == "bias")
    out = linear(x, w, b)
    _close(out.detach(), F.linear(x, w, b).detach())
    if needs == "none":
        assert not out.requires_grad
        return
    out.sum().backward()
    for name, t in (("x", x), ("weight", w), ("bias", b)):
        assert (t.grad is not None) == (name == needs)
    leaf = {"x": x, "weight": w, "bias": b}[needs]
    ones = torch.ones(MIN_ROWS, 16)   # the gradient of out.sum()
    want = {"x": ones @ w.detach(), "weight": ones.t() @ x.detach(), "bias": ones.sum(0)}[needs]
    _close(leaf.grad, want)


def test_no_grad_forward_and_in_place_writes_into_the_output(seed):
    x, w, b = _leaf(MIN_ROWS, 32), _leaf(24, 32), _leaf(24)
    with torch.no_grad():
        _close(linear(x, w, b), F.linear(x, w, b))
    out = linear(x, w, b)
    out.mul_(2.0)                       # a fresh tensor, not a view made inside the Function
    out.sum().backward()
    _close(x.grad, 2 * torch.ones(MIN_ROWS, 24) @ w.detach())


_X, _W, _B = torch.randn(MIN_ROWS, 32), torch.randn(24, 32), torch.randn(24)
_PLAIN = {  # (x, weight, bias) that oneDNN must leave to F.linear
    "few rows": (_X[:MIN_ROWS - 1], _W, _B),
    "empty": (_X[:0], _W, _B),
    "float64": (_X.double(), _W.double(), _B.double()),
    "bfloat16": (_X.bfloat16(), _W.bfloat16(), _B.bfloat16()),
}


@pytest.mark.parametrize("case", list(_PLAIN))
def test_plain_form_where_onednn_does_not_take_the_call(case):
    args = _PLAIN[case]
    ops = _Ops()
    with ops:
        got = linear(*args)
    assert not ops.onednn
    assert got.equal(F.linear(*args))


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_reference_backend_autocast_and_disabled_onednn_take_f_linear():
    x, w, b, r = torch.randn(MIN_ROWS, 32), torch.randn(24, 32), torch.randn(24), torch.randn(MIN_ROWS, 24)
    for ctx in (lambda: use_backend("reference"), lambda: torch.backends.mkldnn.flags(enabled=False)):
        ops = _Ops()
        with ctx(), ops:
            got, got_r = linear(x, w, b), linear(x, w, b, residual=r)
        assert not ops.onednn
        assert got.equal(F.linear(x, w, b))
        torch.testing.assert_close(got_r, r + F.linear(x, w, b), rtol=1e-6, atol=1e-6)
    ops = _Ops()
    with torch.autocast("cpu", dtype=torch.bfloat16), ops:
        got = linear(x, w, b)
    assert not ops.onednn and got.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert got.equal(F.linear(x, w, b))


def test_shape_errors_are_torchs():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(torch.randn(MIN_ROWS, 31), torch.randn(24, 32))


def test_double_backward_equals_f_linears(seed):
    """A gradient penalty through the linear: the second derivative is autograd's own."""
    x, w, b, r = _leaf(MIN_ROWS, 8), _leaf(4, 8), _leaf(4), _leaf(MIN_ROWS, 4)
    got, want = [], []
    for fn, out in ((linear, got), (lambda *a, residual: residual + F.linear(*a), want)):
        for t in (x, w, b, r):
            t.grad = None
        y = fn(x, w, b, residual=r)
        gx, gw = torch.autograd.grad((y.tanh() * y).sum(), [x, w], create_graph=True)
        (gx.square().sum() + gw.square().sum()).backward()
        out.extend(t.grad.clone() for t in (x, w, b, r))
    for a, e in zip(got, want):
        _close(a, e)
    assert all(e.abs().max() > 0 for e in want)


def test_linear_module_is_nn_linear_with_the_same_keys(seed):
    plain = nn.Linear(32, 24)
    ours = Linear(32, 24)
    assert isinstance(ours, nn.Linear)
    ours.load_state_dict(plain.state_dict())
    assert list(ours.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, MIN_ROWS, 32)
    _close(ours(x).detach(), plain(x).detach())


def test_the_linear_suite_times_both_engines_and_checks_ours(monkeypatch):
    from benchmarks.suites import linear as suite

    monkeypatch.setattr(suite, "QUICK", (("small", MIN_ROWS, 32, 48),))
    monkeypatch.setattr(suite, "HEADLINE", "small")
    rows = suite.run(torch.device("cpu"), quick=True, progress=lambda msg: None)
    assert [r.impl for r in rows] == [suite.BASELINE, suite.OURS]
    assert all(r.ms and r.ms > 0 and not r.note and r.headline and r.baseline == suite.BASELINE for r in rows)
    assert rows[0].flops == 6 * MIN_ROWS * 32 * 48
    # a wrong product is a MISMATCH row, not a timing
    monkeypatch.setattr(suite, "linear", lambda x, w, b: F.linear(x, w, b) * 1.001)
    monkeypatch.setattr(suite, "implementations", lambda: {suite.BASELINE: F.linear, suite.OURS: suite.linear})
    bad = suite.run(torch.device("cpu"), quick=True, progress=lambda msg: None)[1]
    assert bad.ms is None and bad.note.startswith("MISMATCH")
    off = suite.run(torch.device("meta"), quick=True, progress=lambda msg: None)
    assert all(r.ms is None and "CPU only" in r.note for r in off)


_CACHE_PROBE = r"""
import ctypes, sys, torch
from iwm_kernels import linear
from iwm_kernels.gemm import bucket_rows
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
def in_use():
    m = libc.mallinfo2()
    return (m.uordblks + m.hblkhd) / 2**20
x = torch.randn(20000, 96)
weights = [torch.randn(n, 96) for n in (96, 192, 288, 384)]
linear(x[:256], weights[0])
before = in_use()
buckets = sorted({bucket_rows(rows) for rows in range(256, 20000)})
assert len(buckets) > 90, len(buckets)
for w in weights:
    for rows in buckets:   # ~100 row buckets per weight, each once: a compiled kernel each
        linear(x[:rows], w)
print(in_use() - before)
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="needs glibc's mallinfo2")
def test_onednn_kernel_caches_stay_small():
    """oneDNN and ideep keep a compiled kernel per shape (1024 each by default, ~0.5 MB apiece): gemm
    lowers both caches to 128 unless the environment sets them. Control: with 1024 the same ~400 shapes
    keep far more."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}

    def grown(env):
        run = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env={**base, **env}, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return float(run.stdout.split()[-1])

    ours = grown({})
    default = grown({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"})
    assert ours < 90, f"heap grew {ours:.0f} MB over ~400 shapes"
    assert default > 2 * ours, (default, ours)

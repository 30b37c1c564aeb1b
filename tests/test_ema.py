"""ema_update_: every backend against the reference, on random module trees and mixed-dtype lists."""
import copy

import pytest
import torch
from torch import nn

import iwm_kernels
from iwm_kernels.ema import reference
from tests.helpers import TOLERANCES, backends_on

BACKENDS = backends_on("cpu")
ODD_SIZES = [1, 2, 3, 7, 31, 127, 129, 1000, 1023, 4095, 4097, 5003, 40961]


def random_tensors(n, dtype, gen):
    """n tensors of odd shapes (1-element ones included, none a multiple of any block size)."""
    out = []
    for i in range(n):
        size = ODD_SIZES[int(torch.randint(len(ODD_SIZES), (1,), generator=gen))]
        shape = (size,) if i % 3 else (1, size) if i % 2 else (size, 1)
        out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype))
    return out


def random_module_tree(gen, n_tensors=210):
    """A nested module with n_tensors parameters of odd sizes."""
    root = nn.Module()
    node, made = root, 0
    while made < n_tensors:
        child = nn.Module()
        for j in range(int(torch.randint(1, 8, (1,), generator=gen))):
            size = ODD_SIZES[int(torch.randint(len(ODD_SIZES), (1,), generator=gen))]
            child.register_parameter(f"p{j}", nn.Parameter(torch.randn(size, generator=gen)))
            made += 1
        node.add_module(f"c{made}", child)
        if made % 3 == 0:
            node = child
    return root


def expected(targets, onlines, m):
    """fp32 arithmetic, one rounding into the target dtype (the contract of every backend)."""
    return [(t.float() * m + (1 - m) * o.float()).to(t.dtype) for t, o in zip(targets, onlines)]


def assert_close_list(got, want, dtype):
    atol, rtol = TOLERANCES[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_tree_fp32(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    target = random_module_tree(gen)
    online = copy.deepcopy(target)
    for p in online.parameters():
        p.data.normal_(generator=gen)
    assert sum(1 for _ in target.parameters()) >= 200
    m = float(torch.empty(()).uniform_(0.9, 0.9999, generator=gen))
    want = expected([p.detach() for p in target.parameters()], [p.detach() for p in online.parameters()], m)
    iwm_kernels.ema_update_(target, online, m, backend=backend)
    assert_close_list([p.detach() for p in target.parameters()], want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lists_against_reference(backend, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    targets = random_tensors(200, dtype, gen)
    onlines = [torch.randn(t.shape, generator=gen).to(dtype) for t in targets]
    m = float(torch.empty(()).uniform_(0.5, 0.999, generator=gen))
    want = expected(targets, onlines, m)  # the formula, not the reference: this also tests backend="reference"
    ref = [t.clone() for t in targets]
    reference.ema_update_(ref, onlines, m)
    iwm_kernels.ema_update_(targets, onlines, m, backend=backend)
    assert_close_list(targets, want, dtype)
    assert_close_list(ref, want, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_and_tensor_momentum(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    targets, onlines = [], []
    for i in range(60):
        size = ODD_SIZES[i % len(ODD_SIZES)]
        targets.append(torch.randn(size, generator=gen).to(dtypes[i % 3]))
        onlines.append(torch.randn(size, generator=gen).to(dtypes[(i // 3) % 3]))
    m = torch.tensor(0.97)
    want = expected(targets, onlines, 0.97)
    iwm_kernels.ema_update_(targets, onlines, m, backend=backend)
    for t, w in zip(targets, want):
        atol, rtol = TOLERANCES[t.dtype]
        torch.testing.assert_close(t, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_edges_are_exact(backend, m, seed):
    targets = random_tensors(20, torch.float32, torch.Generator().manual_seed(seed))
    onlines = [torch.randn_like(t) for t in targets]
    before = [t.clone() for t in targets]
    iwm_kernels.ema_update_(targets, onlines, m, backend=backend)
    for t, b, o in zip(targets, before, onlines):
        assert torch.equal(t, b if m == 1.0 else o)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_calls_reuse_plan_and_stay_correct(backend, seed):
    targets = random_tensors(30, torch.float32, torch.Generator().manual_seed(seed))
    onlines = [torch.randn_like(t) for t in targets]
    want = [t.clone() for t in targets]
    for m in (0.9, 0.99, 0.5):
        want = expected(want, onlines, m)
        iwm_kernels.ema_update_(targets, onlines, m, backend=backend)
    assert_close_list(targets, want, torch.float32)


def test_module_pairs_by_name_through_wrappers(seed):
    online = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))
    target = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3))

    class Wrapper(nn.Module):  # mimics DDP's `module.` prefix
        def __init__(self, module):
            super().__init__()
            self.module = module

    want = expected([p.detach() for p in target.parameters()], [p.detach() for p in online.parameters()], 0.9)
    iwm_kernels.ema_update_(target, Wrapper(online), 0.9, backend="reference")
    assert_close_list([p.detach() for p in target.parameters()], want, torch.float32)


def test_copy_buffers():
    online, target = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    online.running_mean.uniform_()
    iwm_kernels.ema_update_(target, online, 0.5, copy_buffers=True)
    assert torch.equal(target.running_mean, online.running_mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_zero_size(backend, seed):
    iwm_kernels.ema_update_([], [], 0.5, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.empty(0), torch.randn(6, generator=gen), torch.empty(0, 3)]
    onlines = [torch.empty(0), torch.randn(6, generator=gen), torch.empty(0, 3)]
    want = expected(targets, onlines, 0.5)
    iwm_kernels.ema_update_(targets, onlines, 0.5, backend=backend)
    assert_close_list(targets, want, torch.float32)


# ---- errors: every one names the offending argument ------------------------------------------------

def _pair(n=3):
    return [torch.randn(4) for _ in range(n)], [torch.randn(4) for _ in range(n)]


@pytest.mark.parametrize("case, match", [
    ("length", "target: 3 tensors but online has 2"),
    ("shape", r"target\[1\]: shape"),
    ("device", "momentum|online"),
    ("alias", "alias"),
    ("duplicate", "listed twice"),
    ("int_target", r"target\[0\]: integer"),
    ("int_online", r"online\[0\]: integer"),
    ("bare_tensor", "sequences of tensors"),
    ("mixed_kinds", "two nn.Modules"),
    ("noncontiguous", r"target\[0\]: must be contiguous"),
])
def test_errors_name_the_argument(case, match):
    t, o = _pair()
    if case == "length":
        o = o[:2]
    elif case == "shape":
        t[1] = torch.randn(5)
    elif case == "device":
        o[0] = torch.randn(4, device="meta")
        match = r"online\[0\]: on meta"
    elif case == "alias":
        o[2] = t[2].view(2, 2).view(4)
    elif case == "duplicate":
        t[1] = t[0]
    elif case == "int_target":
        t[0] = torch.ones(4, dtype=torch.int64)
    elif case == "int_online":
        o[0] = torch.ones(4, dtype=torch.int32)
    elif case == "bare_tensor":
        t, o = t[0], o[0]
    elif case == "mixed_kinds":
        t = nn.Linear(2, 2)
    elif case == "noncontiguous":
        t[0] = torch.randn(4, 4).t()
        o[0] = torch.randn(4, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        iwm_kernels.ema_update_(t, o, 0.9)


@pytest.mark.parametrize("momentum", [float("nan"), float("inf"), -0.1, 1.5, torch.tensor(1.5), torch.tensor([0.5]),
                                      torch.tensor(1, dtype=torch.int64), "0.9", True])
def test_bad_momentum(momentum):
    t, o = _pair()
    with pytest.raises((ValueError, TypeError), match="momentum"):
        iwm_kernels.ema_update_(t, o, momentum)


def test_unknown_backend(monkeypatch):
    t, o = _pair()
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda'"):
        iwm_kernels.ema_update_(t, o, 0.9, backend="cuda")
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="IWM_KERNELS_BACKEND: unknown backend 'fast'"):
        iwm_kernels.ema_update_(t, o, 0.9)


def test_env_var_selects_backend(monkeypatch):
    from iwm_kernels import _backend
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "reference")
    assert _backend.resolve_backend(None, torch.device("cpu"), "op") == "reference"
    assert _backend.resolve_backend("native", torch.device("cpu"), "op") in ("native",)


def test_available_backends_reports_reasons():
    avail = iwm_kernels.available_backends()
    assert set(avail) == {"reference", "triton", "native"}
    assert avail["reference"].available
    for status in avail.values():
        assert isinstance(status.detail, str) and status.detail


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_through_custom_op(backend, seed):
    target = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    online = nn.Sequential(nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))
    want = expected([p.detach() for p in target.parameters()], [p.detach() for p in online.parameters()], 0.8)
    tp = [p.detach() for p in target.parameters()]
    op = [p.detach() for p in online.parameters()]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        iwm_kernels.ema_update_(tp, op, m, backend=backend)

    step(torch.tensor(0.8))
    assert_close_list(tp, want, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_against_reference(backend, dtype, seed):
    from iwm_kernels import _backend
    if not _backend.runs_on(backend, torch.device("cuda")).available:
        pytest.skip(f"{backend} not available on CUDA")
    gen = torch.Generator().manual_seed(seed)
    targets = [t.cuda() for t in random_tensors(220, dtype, gen)]
    onlines = [torch.randn_like(t) for t in targets]
    want = expected(targets, onlines, 0.996)
    iwm_kernels.ema_update_(targets, onlines, torch.tensor(0.996, device="cuda"), backend=backend)
    assert_close_list(targets, want, dtype)
    assert all(bool(torch.isfinite(t).all()) for t in targets)

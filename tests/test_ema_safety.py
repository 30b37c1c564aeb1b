"""ema_update_ hardening: autograd visibility, the validation cache, memory overlap, precision at the
edges, momentum checks under torch.compile, and the device-side momentum rule."""
import numpy as np
import pytest
import torch

import iwm_kernels
import iwm_kernels.ema as ema
from iwm_kernels.ema import momentum_flag, reference, run_backend
from iwm_kernels.ema.overlap import byte_span, check_no_overlap
from tests.helpers import backends_on

BACKENDS = backends_on("cpu")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fresh_dynamo():
    """Each compile test defines the same inner function over new tensors: start from an empty cache so
    the recompile limit (which fullgraph=True turns into an error) counts this test only."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


# ---- 1. every backend is visible to autograd ----------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_update_of_a_saved_tensor_fails_the_pending_backward(backend, seed):
    gen = _gen(seed)
    w = torch.randn(37, generator=gen, requires_grad=True)
    loss = (w * w).sum()  # saves w for backward
    m = float(torch.empty(()).uniform_(0.5, 0.99, generator=gen))
    iwm_kernels.ema_update_([w.detach()], [torch.randn(37, generator=gen)], m, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_endpoints_also_count_as_modifications(backend, momentum, seed):
    w = torch.randn(5, generator=_gen(seed), requires_grad=True)
    loss = (w * w).sum()
    iwm_kernels.ema_update_([w.detach()], [torch.randn(5)], momentum, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_under_compile_is_visible_to_autograd(backend, seed, fresh_dynamo):
    w = torch.randn(9, generator=_gen(seed), requires_grad=True)
    online = [torch.randn(9, generator=_gen(seed + 1))]
    target = [w.detach()]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        iwm_kernels.ema_update_(target, online, m, backend=backend)

    loss = (w * w).sum()
    step(torch.tensor(0.9))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---- 2. the validation cache keys on everything the checks read ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_does_not_accept_a_transposed_target_at_the_same_address(backend, seed):
    gen = _gen(seed)
    t, o = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    iwm_kernels.ema_update_([t], [o], 0.9, backend=backend)
    before = t.clone()
    with pytest.raises(ValueError, match=r"target\[0\]: must be contiguous"):
        iwm_kernels.ema_update_([t.t()], [o.view(5, 4)], 0.9, backend=backend)
    assert torch.equal(t, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_does_not_accept_a_reshaped_online_at_the_same_address(backend, seed):
    gen = _gen(seed)
    t, o = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    iwm_kernels.ema_update_([t], [o], 0.9, backend=backend)
    with pytest.raises(ValueError, match=r"target\[0\]: shape \(4, 5\) differs from online's \(20,\)"):
        iwm_kernels.ema_update_([t], [o.view(20)], 0.9, backend=backend)


def test_cache_still_skips_the_checks_for_the_same_tensors(monkeypatch, seed):
    gen = _gen(seed)
    targets = [torch.randn(n, generator=gen) for n in (3, 300, 7)]
    onlines = [torch.randn(n, generator=gen) for n in (3, 300, 7)]
    iwm_kernels.ema_update_(targets, onlines, 0.9, backend="native" if "native" in BACKENDS else None)

    def fail(*args):
        raise AssertionError("checks ran again on a cached tensor set")

    monkeypatch.setattr(ema, "_validate", fail)
    monkeypatch.setattr(ema, "check_no_overlap", fail)
    want = [(t * 0.5 + o * 0.5) for t, o in zip(targets, onlines)]
    iwm_kernels.ema_update_(targets, onlines, 0.5, backend="native" if "native" in BACKENDS else None)
    for t, w in zip(targets, want):
        torch.testing.assert_close(t, w)


def test_non_tensor_entries_name_the_argument():
    with pytest.raises(TypeError, match=r"target\[0\]: expected a tensor, got float"):
        iwm_kernels.ema_update_([1.0], [torch.randn(1)], 0.5)
    with pytest.raises(TypeError, match=r"online\[0\]: expected a tensor, got NoneType"):
        iwm_kernels.ema_update_([torch.randn(1)], [None], 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_float_dtype_names_the_argument(backend):
    t = torch.zeros(4).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"target\[0\]: dtype torch.float8_e4m3fn is not supported"):
        iwm_kernels.ema_update_([t], [torch.randn(4)], 0.5, backend=backend)


# ---- 3. overlap by real byte ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_halves_of_one_buffer_are_accepted(backend, seed):
    buf = torch.randn(2 * 4099, generator=_gen(seed))
    target, online = buf[:4099], buf[4099:]
    want = target * 0.75 + online.clone() * 0.25
    iwm_kernels.ema_update_([target], [online], 0.75, backend=backend)
    torch.testing.assert_close(target, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlap_across_separate_storages_is_rejected(backend):
    data = np.random.default_rng().standard_normal(64).astype(np.float32)
    target, online = torch.from_numpy(data[0:40]), torch.from_numpy(data[24:64])
    assert target.untyped_storage().data_ptr() != online.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match=r"target\[0\]: overlaps online\[0\] in memory"):
        iwm_kernels.ema_update_([target], [online], 0.9, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_target_views_are_rejected(backend, seed):
    buf = torch.randn(80, generator=_gen(seed))
    before = buf.clone()
    with pytest.raises(ValueError, match=r"target\[1\]: overlaps target\[0\] in memory"):
        iwm_kernels.ema_update_([buf[0:60], buf[20:80]], [torch.randn(60), torch.randn(60)], 0.9, backend=backend)
    assert torch.equal(buf, before)


def test_a_target_overlapping_another_pairs_online_is_rejected(seed):
    buf = torch.randn(30, generator=_gen(seed))
    with pytest.raises(ValueError, match=r"target\[1\]: overlaps online\[0\] in memory"):
        iwm_kernels.ema_update_([torch.randn(10), buf[5:15]], [buf[0:10], torch.randn(10)], 0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_onlines_may_share_memory(backend, seed):
    gen = _gen(seed)
    online = torch.randn(11, generator=gen)
    targets = [torch.randn(11, generator=gen), torch.randn(11, generator=gen)]
    want = [t * 0.6 + online * 0.4 for t in targets]
    iwm_kernels.ema_update_(targets, [online, online], 0.6, backend=backend)
    for t, w in zip(targets, want):
        torch.testing.assert_close(t, w)


def test_byte_span_follows_strides():
    base = torch.zeros(10, 8)
    ptr, size = base.data_ptr(), base.element_size()
    assert byte_span(base) == (ptr, ptr + 80 * size)
    assert byte_span(base.t()) == (ptr, ptr + 80 * size)
    assert byte_span(base[2:4, 1:3]) == (ptr + 17 * size, ptr + (3 * 8 + 2 + 1) * size)
    assert byte_span(base[:, 7]) == (ptr + 7 * size, ptr + 80 * size)


def test_overlap_verdict_matches_brute_force(seed):
    gen = _gen(seed)
    buf = torch.zeros(400)
    for _ in range(200):
        n_t, n_o = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 6, (1,), generator=gen))
        spans = [(int(torch.randint(0, 380, (1,), generator=gen)), int(torch.randint(0, 20, (1,), generator=gen)))
                 for _ in range(n_t + n_o)]
        views = [buf[s:s + n] for s, n in spans]
        targets, onlines = views[:n_t], views[n_t:]

        def hit(a, b):
            (sa, na), (sb, nb) = a, b
            return na > 0 and nb > 0 and sa < sb + nb and sb < sa + na

        t_spans, o_spans = spans[:n_t], spans[n_t:]
        clash = any(hit(t_spans[i], t_spans[j]) for i in range(n_t) for j in range(i + 1, n_t))
        clash = clash or any(hit(t, o) for t in t_spans for o in o_spans)
        if clash:
            with pytest.raises(ValueError, match="target"):
                check_no_overlap(targets, onlines)
        else:
            check_no_overlap(targets, onlines)


# ---- 4. precision and the endpoints --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tensor_momentum", [False, True])
def test_fp64_pairs_are_computed_in_fp64(backend, tensor_momentum, seed):
    gen = _gen(seed)
    targets = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 4097, 1000)]
    onlines = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (5, 4097, 1000)]
    m = float(torch.empty((), dtype=torch.float64).uniform_(0.5, 0.999, generator=gen))
    want = [t * m + o * (1 - m) for t, o in zip(targets, onlines)]
    momentum = torch.tensor(m, dtype=torch.float64) if tensor_momentum else m
    iwm_kernels.ema_update_(targets, onlines, momentum, backend=backend)
    for t, w in zip(targets, want):  # fp32 arithmetic would be off by ~1e-8
        torch.testing.assert_close(t, w, atol=1e-14, rtol=1e-14)


def _huge_pair(dtype, gen, n=513):
    big = torch.finfo(dtype).max * 0.9
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    t = big * sign * torch.empty(n, dtype=dtype).uniform_(0.5, 1.0, generator=gen)
    o = -big * sign * torch.empty(n, dtype=dtype).uniform_(0.5, 1.0, generator=gen)
    t[:7], o[7:14] = -0.0, -0.0  # signed zeros must survive the exact endpoints too
    return t, o


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_endpoints_are_bit_exact_with_huge_values(backend, dtype, momentum, seed):
    t, o = _huge_pair(dtype, _gen(seed))
    want = (t if momentum == 1.0 else o).clone()
    iwm_kernels.ema_update_([t], [o], momentum, backend=backend)
    assert torch.equal(_bits(t), _bits(want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tensor_momentum", [False, True])
def test_huge_values_stay_finite(backend, dtype, tensor_momentum, seed):
    gen = _gen(seed)
    t, o = _huge_pair(dtype, gen)
    m = float(torch.empty((), dtype=torch.float64).uniform_(0.01, 0.99, generator=gen))
    want = t.double() * m + o.double() * (1 - m)  # in fp64 only where dtype is fp32: the fp64 case is exact math
    iwm_kernels.ema_update_([t], [o], torch.tensor(m, dtype=dtype) if tensor_momentum else m, backend=backend)
    assert torch.isfinite(t).all()
    # t and o have opposite signs: the result cancels, so the error is judged against the operands' size
    torch.testing.assert_close(t.double(), want, rtol=0, atol=torch.finfo(dtype).max * 1e-6)


# ---- 5. momentum under torch.compile ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_python_float_momentum_under_fullgraph_compile(backend, seed, fresh_dynamo):
    gen = _gen(seed)
    targets = [torch.randn(n, generator=gen) for n in (3, 129)]
    onlines = [torch.randn(n, generator=gen) for n in (3, 129)]
    want = [t.clone() for t in targets]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        iwm_kernels.ema_update_(targets, onlines, m, backend=backend)

    for m in (0.5, 0.7, 0.9):  # the second value makes torch.compile trace the float symbolically
        reference.ema_update_(want, onlines, m)
        step(m)
    for t, w in zip(targets, want):
        torch.testing.assert_close(t, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.25, 1.5])
def test_bad_momentum_tensor_under_compile_raises(backend, bad, seed, fresh_dynamo):
    target = [torch.randn(17, generator=_gen(seed))]
    online = [torch.randn(17)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        iwm_kernels.ema_update_(target, online, m, backend=backend)

    step(torch.tensor(0.9))
    before = target[0].clone()
    with pytest.raises(ValueError, match="momentum: must be finite and within"):
        step(torch.tensor(bad))
    assert torch.equal(target[0], before)


def test_bad_python_float_under_compile_raises(seed, fresh_dynamo):
    target, online = [torch.randn(6, generator=_gen(seed))], [torch.randn(6)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(m):
        iwm_kernels.ema_update_(target, online, m)

    step(0.5)
    step(0.6)
    before = target[0].clone()
    with pytest.raises(ValueError, match="momentum: must be finite and within"):
        step(1.5)
    assert torch.equal(target[0], before)


# ---- the device-side rule: a momentum read by the kernel skips the update and sets the flag -----------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "native"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), -0.5, 1.01])
def test_kernel_read_bad_momentum_leaves_targets_and_sets_flag(backend, bad, seed):
    gen = _gen(seed)
    targets = [torch.randn(n, generator=gen) for n in (5, 4097)]
    onlines = [torch.randn(n, generator=gen) for n in (5, 4097)]
    before = [t.clone() for t in targets]
    momentum_flag.momentum_error_flag("cpu").zero_()
    run_backend(backend, targets, onlines, float("nan"), torch.tensor(bad))  # the host checks bypassed
    for t, b in zip(targets, before):
        assert torch.equal(t, b)
    with pytest.raises(ValueError, match="momentum: a momentum tensor read on the device"):
        ema.raise_if_momentum_was_invalid("cpu")
    ema.raise_if_momentum_was_invalid("cpu")  # cleared by the read


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "native"])
def test_kernel_read_good_momentum_leaves_flag_clear(backend, seed):
    gen = _gen(seed)
    targets, onlines = [torch.randn(9, generator=gen)], [torch.randn(9, generator=gen)]
    momentum_flag.momentum_error_flag("cpu").zero_()
    run_backend(backend, targets, onlines, float("nan"), torch.tensor(0.3))
    assert int(momentum_flag.momentum_error_flag("cpu")) == 0


@pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")
def test_native_cpu_op_refuses_bad_momentum():
    t, o = torch.randn(8), torch.randn(8)
    before = t.clone()
    with pytest.raises(RuntimeError, match="momentum: must be finite"):
        run_backend("native", [t], [o], float("nan"), torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="momentum: must be finite"):
        run_backend("native", [t], [o], 2.0, None)
    assert torch.equal(t, before)


# ---- 6. CUDA only ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), 1.5])
def test_cuda_momentum_tensor_is_range_checked_on_device(backend, bad, seed):
    from iwm_kernels import _backend
    if not _backend.runs_on(backend, torch.device("cuda")).available:
        pytest.skip(f"{backend} not available on CUDA")
    gen = _gen(seed)
    targets = [torch.randn(n, generator=gen).cuda() for n in (5, 40961)]
    onlines = [torch.randn(n, generator=gen).cuda() for n in (5, 40961)]
    before = [t.clone() for t in targets]
    momentum_flag.momentum_error_flag("cuda").zero_()
    iwm_kernels.ema_update_(targets, onlines, torch.tensor(bad, device="cuda"), backend=backend)
    for t, b in zip(targets, before):
        assert torch.equal(t, b)
    with pytest.raises(ValueError, match="momentum"):
        ema.raise_if_momentum_was_invalid("cuda")
    iwm_kernels.ema_update_(targets, onlines, torch.tensor(0.5, device="cuda"), backend=backend)
    torch.testing.assert_close(targets[1], before[1] * 0.5 + onlines[1] * 0.5)
    ema.raise_if_momentum_was_invalid("cuda")


@pytest.mark.gpu
def test_cuda_table_op_refuses_non_contiguous_tables():
    from iwm_kernels import _backend, _native
    if not _backend.runs_on("native", torch.device("cuda")).available:
        pytest.skip("native not available on CUDA")
    ops = _native.ops()
    t = [torch.randn(8, device="cuda") for _ in range(2)]
    o = [torch.randn(8, device="cuda") for _ in range(2)]
    strided = torch.tensor([[x.data_ptr(), 0] for x in t], dtype=torch.int64, device="cuda")[:, 0]
    assert not strided.is_contiguous()
    onlines = torch.tensor([x.data_ptr() for x in o], dtype=torch.int64, device="cuda")
    numels = torch.tensor([8, 8], dtype=torch.int64, device="cuda")
    bt = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    bs = torch.zeros(2, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(RuntimeError, match="target_ptrs must be contiguous"):
        ops.ema_update_table_(strided, onlines, numels, bt, bs, 2, 4096, 0, 0, 0.5, None, None, stream)
    with pytest.raises(RuntimeError, match="block_tensor has 2 entries, expected 1"):
        ops.ema_update_table_(strided.contiguous(), onlines, numels, bt, bs[:1], 1, 4096, 0, 0, 0.5, None, None,
                              stream)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_fp64_and_endpoints(backend, seed):
    from iwm_kernels import _backend
    if not _backend.runs_on(backend, torch.device("cuda")).available:
        pytest.skip(f"{backend} not available on CUDA")
    gen = _gen(seed)
    t = torch.randn(5003, generator=gen, dtype=torch.float64).cuda()
    o = torch.randn(5003, generator=gen, dtype=torch.float64).cuda()
    want = t * 0.996 + o * (1 - 0.996)
    iwm_kernels.ema_update_([t], [o], 0.996, backend=backend)
    torch.testing.assert_close(t, want, atol=1e-14, rtol=1e-14)
    for momentum in (0.0, 1.0):
        a, b = (x.cuda() for x in _huge_pair(torch.float32, gen))
        expect = (a if momentum == 1.0 else b).clone()
        iwm_kernels.ema_update_([a], [b], momentum, backend=backend)
        assert torch.equal(_bits(a), _bits(expect))

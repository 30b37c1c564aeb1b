"""The native CPU attention's per-sequence path (lengths attached as Python ints by the caller): equal to
the reference and to the padded path, forward and backward, with and without segments."""
import random

import pytest
import torch

from iwm_kernels.attention import native, prepare, reference
from iwm_kernels.attention.layout import attach_lengths


def _layout_inputs(rng, shared, empty=False):
    seqs = rng.randint(1, 6)
    lengths, segments, seg_ids = [], [], []
    for _ in range(seqs):
        if shared:
            pieces = (rng.randint(1, 12),) + tuple(rng.randint(1, 7) for _ in range(rng.randint(1, 4)))
        else:
            pieces = (rng.randint(0 if empty else 1, 20),)
        segments.append(pieces)
        lengths.append(sum(pieces))
        seg_ids += [g for g, n in enumerate(pieces) for _ in range(n)]
    if empty and not shared:
        lengths.insert(0, 0)
        segments.insert(0, (0,))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    seg = torch.tensor(seg_ids, dtype=torch.int32) if shared else None
    return cu, seg, lengths, segments


def _run(fn, T, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, 3, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    out = fn(*qkv.unbind(1))
    out.backward(grad)
    return out.detach(), qkv.grad


@pytest.mark.parametrize("shared,with_segments", [(False, False), (True, True), (True, False)])
def test_per_sequence_equals_reference_and_padded(seed, shared, with_segments, monkeypatch):
    monkeypatch.setattr(native, "LOOP_MIN_SAVED_PAIRS", 0)  # these short layouts would run padded
    rng = random.Random(seed)
    cu, seg, lengths, segments = _layout_inputs(rng, shared, empty=not shared)
    T, scale = int(cu[-1]), 0.3
    attach_lengths(cu, lengths, segments if with_segments else None)
    layout = prepare(cu, seg, T, max(lengths), check_values=False)
    assert layout.host_lengths == tuple(lengths) and native.uses_per_sequence(layout, torch.empty(0, dtype=torch.float64))
    assert (layout.host_segments is not None) == with_segments
    ours = _run(lambda q, k, v: native.varlen_attention(q, k, v, layout, scale), T)
    ref = _run(lambda q, k, v: reference.varlen_attention(q, k, v, cu, seg, scale), T)
    padded_layout = prepare(cu.clone(), seg, T, max(lengths), check_values=False)  # no lengths attached
    assert padded_layout.host_lengths is None and not native.uses_per_sequence(padded_layout, torch.empty(0, dtype=torch.float64))
    padded = _run(lambda q, k, v: native.varlen_attention(q, k, v, padded_layout, scale), T)
    for a, b, c in zip(ours, ref, padded):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


def test_lengths_that_do_not_describe_the_layout_are_ignored():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    attach_lengths(cu, (3, 5))  # sums to 8, the layout has 7 rows
    assert prepare(cu, None, 7, 7, check_values=False).host_lengths is None
    cu2 = torch.tensor([0, 3, 7], dtype=torch.int32)
    attach_lengths(cu2, (3, 4))
    cu2[1] = 2  # changed in place after: the lengths are dropped
    assert prepare(cu2, None, 7, 7, check_values=False).host_lengths is None


def test_attach_lengths_refuses_bad_input():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match="lengths"):
        attach_lengths(cu, (3,))
    with pytest.raises(ValueError, match="lengths"):
        attach_lengths(cu, (3, -1))
    with pytest.raises(ValueError, match="segments"):
        attach_lengths(cu, (3, 4), [(3,), (1, 2)])


def test_checked_layouts_know_their_lengths():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert prepare(cu, None, 7, 4).host_lengths == (3, 4)


def test_uniform_shared_layout_runs_two_batched_calls(seed, monkeypatch):
    """Every sequence [context | M equal blocks] alike (the shared layout on truncated masks): two SDPA
    calls over only the visible pairs, equal to the reference forward and backward."""
    rng = random.Random(seed)
    seqs, c, m, t = rng.randint(1, 4), rng.randint(1, 9), rng.randint(1, 4), rng.randint(1, 6)
    L = c + m * t
    cu = torch.arange(seqs + 1, dtype=torch.int32) * L
    seg = torch.tensor([g for _ in range(seqs) for g in [0] * c + [j + 1 for j in range(m) for _ in range(t)]],
                       dtype=torch.int32)
    attach_lengths(cu, [L] * seqs, [(c,) + (t,) * m] * seqs)
    layout = prepare(cu, seg, seqs * L, L, check_values=False)
    calls = []
    sdpa = native.F.scaled_dot_product_attention
    monkeypatch.setattr(native.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    ours = _run(lambda q, k, v: native.varlen_attention(q, k, v, layout, 0.4), seqs * L, seed=seed)
    assert len(calls) == 2
    ref = _run(lambda q, k, v: reference.varlen_attention(q, k, v, cu, seg, 0.4), seqs * L, seed=seed)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_plain_varlen_runs_per_sequence_only_where_the_padding_saved_pays_for_the_calls(monkeypatch):
    """Many short sequences run padded (the calls' overhead exceeds the padded pairs they save; the
    `tiny` contexts lost 1.5x per sequence at two threads); long ragged ones run per sequence; the
    bar rises with the thread count (one padded call uses the threads better than many small ones)."""
    def layout(lengths):
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        attach_lengths(cu, lengths)
        return prepare(cu, None, sum(lengths), max(lengths), check_values=False)

    q = torch.empty(0, 3, 8, dtype=torch.float64)  # 3 heads; float64: the Python loop (no varlen_sdpa)
    short = layout([10 + i % 11 for i in range(64)])          # 64 sequences of 10-20 tokens
    long = layout([100 + (37 * i) % 150 for i in range(16)])  # 16 sequences of 100-249 tokens
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not native.uses_per_sequence(short, q) and native.uses_per_sequence(long, q)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert not native.uses_per_sequence(long, q)
    # a run of equal lengths is one call: four equal blocks per sample save the same pairs in a quarter of the calls
    blocks = layout([n for n in (40, 55, 70, 48, 62, 44, 66, 51) for _ in range(4)])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert native.uses_per_sequence(blocks, q)
    assert not native.uses_per_sequence(layout([40, 55, 70, 48, 62, 44, 66, 51]), q)

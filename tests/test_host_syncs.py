"""No host syncs in the training step: nothing between the loader's output and the next step reads a
tensor's value back into Python.

A value read is a device-to-host copy plus a stall on a GPU, so it is counted here on the CPU, where the
same code runs: every aten op that must look at values to produce a Python value or a data-dependent
shape (`_local_scalar_dense`, i.e. item/float/int/bool; nonzero; unique; masked_select; equal;
repeat_interleave without output_size), plus the Python-side readers that bypass the dispatcher
(Tensor.tolist/item/__bool__/__int__/__float__/__index__). The masks and the augmentation parameters
are made outside the counted window (in the loader workers and the parameter sampler, on the CPU, as
NumPy / Python values); everything the step does with them is inside it.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import iwm_kernels
from iwm import augment as aug
from iwm.masks import MultiBlockMaskSampler
from iwm.models import IWM
from tests.helpers import HostReadCounter, count_python_readers


@pytest.fixture
def count_reads(monkeypatch):
    """A context factory: `with count_reads() as c:` counts dispatcher reads and Python-side readers."""
    active = count_python_readers(monkeypatch.setattr)

    class _Window:
        def __enter__(self):
            self.counter = HostReadCounter()
            active.append(self.counter)
            self.counter.__enter__()
            return self.counter

        def __exit__(self, *exc):
            self.counter.__exit__(*exc)
            active.pop()
            return False
    return _Window


def _report(counter: HostReadCounter) -> str:
    return counter.report()


def test_counter_sees_every_kind_of_read(count_reads, seed):
    """The probe itself: each listed kind of read is counted (so a zero below means something)."""
    t = torch.randint(1, 4, (5,))
    reads = [lambda: t.max().item(), lambda: float(t.sum()), lambda: int(t[0]), lambda: bool(t.all()),
             lambda: t.tolist(), lambda: torch.nonzero(t), lambda: torch.unique(t), lambda: t.equal(t),
             lambda: t.masked_select(t > 1), lambda: torch.repeat_interleave(t),
             lambda: torch.arange(5).repeat_interleave(t)]
    for read in reads:
        with count_reads() as c:
            read()
        assert c.total >= 1, read
    with count_reads() as c:
        torch.arange(5).repeat_interleave(t, output_size=int(t.sum().numpy()))  # told the size: no read
        (t * 2).sum()
    assert c.total == 0, _report(c)


def _tiny_iwm(conditioning: str, shared: bool) -> IWM:
    return IWM.from_preset("tiny", conditioning=conditioning, shared_context=shared, img_size=32,
                           encoder_depth=1, pred_depth=2)


def _step_inputs(model: IWM, batch: int, seed: int):
    """What the loader and the parameter sampler deliver (made outside the counted window)."""
    size = model.encoder.img_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    cfg = aug.AugmentConfig(out_size=size, blur_p=0.5)
    params = aug.sample_view_params(batch, cfg, aug.generator_for_step(seed, 0))
    masks = MultiBlockMaskSampler(model.encoder.patch_embed.grid, seed=seed, min_keep=2).sample(batch, 3)
    return images, cfg, params, masks


def _one_step(model, optimizer, images, cfg, params, masks, backend=None):
    source, target = aug.render_views(images, params, cfg, backend=backend)
    action = aug.action_from_params(params) if model.conditioning != "none" else None
    loss, stats = model(source, target, masks, action, backend=backend)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iwm_kernels.ema_update_(model.target_encoder, model.encoder, 0.996, backend=backend)
    return loss, stats


@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
@pytest.mark.parametrize("shared", [False, True])
def test_training_step_reads_nothing_back(conditioning, shared, count_reads, seed):
    """Views, forward (both predictor layouts, every conditioning), backward, fused AdamW and the EMA
    update on the default CPU backend (native): zero value reads."""
    torch.manual_seed(seed)
    model = _tiny_iwm(conditioning, shared)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    images, cfg, params, masks = _step_inputs(model, 3, seed)
    _one_step(model, optimizer, images, cfg, params, masks)  # warm-up: lazy state (optimizer moments)
    images, cfg, params, masks = _step_inputs(model, 3, seed + 1)
    with count_reads() as c:
        loss, stats = _one_step(model, optimizer, images, cfg, params, masks)
    assert c.total == 0, f"{c.total} host reads in one training step:\n{_report(c)}"
    assert torch.isfinite(loss)
    assert stats["context_tokens"] == masks.context_index.numel()
    assert stats["target_tokens"] == masks.target_index.numel()


# ---- the pieces the step relies on ----------------------------------------------------------------------

def _random_masks(seed, batch=5, grid=6, mode="complement"):
    return MultiBlockMaskSampler(grid, seed=seed, min_keep=2, context_mode=mode).sample(batch, seed % 97)


@pytest.mark.parametrize("mode", ["complement", "block"])
def test_mask_batch_lengths_match_its_tensors(mode, seed):
    """The sampler's Python lengths are the tensors' lengths, through slice, truncated and to()."""
    masks = _random_masks(seed, mode=mode)
    for mb in (masks, masks.slice(1, 4), masks.slice(2, 2), masks.truncated(), masks.truncated().slice(0, 3),
               masks.to("cpu")):
        assert mb.validated
        assert list(mb.context_sizes) == (mb.context_cu[1:] - mb.context_cu[:-1]).tolist()
        assert list(mb.target_sizes) == (mb.target_cu[1:] - mb.target_cu[:-1]).tolist()
        assert mb.context_tokens == mb.context_index.numel() and mb.target_tokens == mb.target_index.numel()
        hand = replace(mb, context_sizes=None, target_sizes=None, validated=False)  # read from the tensors
        assert (mb.longest_context, mb.longest_target_block, mb.longest_sample_targets) == \
            (hand.longest_context, hand.longest_target_block, hand.longest_sample_targets)
        dim = 4
        for shared in (False, True):
            for extra in (0, 7):
                ex = torch.zeros(mb.batch_size * extra, dim) if extra else None
                ex_cu = torch.arange(mb.batch_size + 1, dtype=torch.int32) * extra if extra else None
                packed = iwm_kernels.pack_predictor_sequences(
                    torch.zeros(mb.context_tokens, dim), mb.context_cu, torch.zeros(mb.target_tokens, dim),
                    mb.target_cu, mb.num_targets, shared_context=shared, extra=ex, extra_cu=ex_cu)
                assert mb.predictor_max_seqlen(shared, extra) == packed.max_seqlen


def test_mask_batch_slice_and_move_read_nothing(count_reads, seed):
    masks = _random_masks(seed)
    with count_reads() as c:
        part = masks.slice(1, 3)
        part = part.to("cpu")
        part.predictor_max_seqlen(True, 7), part.predictor_max_seqlen(False), part.longest_context
    assert c.total == 0, _report(c)


def test_mask_batch_refuses_lengths_that_do_not_fit(seed):
    masks = _random_masks(seed)
    with pytest.raises(ValueError, match="context_sizes"):
        replace(masks, context_sizes=masks.context_sizes[:-1])
    with pytest.raises(ValueError, match="target_sizes"):
        replace(masks, target_sizes=(masks.target_sizes[0] + 1,) + masks.target_sizes[1:])


def _layout_case(gen, with_segments):
    """Random packed layout with empty sequences, contiguous segments and segment 0 first."""
    lengths, segs = [], []
    for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
        parts = torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        lengths.append(sum(parts))
        segs += [g for g, n in enumerate(parts) for _ in range(n)]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    seg = torch.tensor(segs, dtype=torch.int32) if with_segments else None
    return cu, seg, int(cu[-1]), max(lengths)


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
@pytest.mark.parametrize("with_segments", [False, True])
def test_unchecked_attention_equals_checked(backend, with_segments, seed):
    """check_values=False (a vouched layout, a loose max_seqlen bound) gives the checked result on every
    backend, forward and backward."""
    from tests.helpers import backends_on
    if backend not in backends_on("cpu"):
        pytest.skip(f"{backend} unavailable")
    gen = torch.Generator().manual_seed(seed)
    cu, seg, total, longest = _layout_case(gen, with_segments)
    q, k, v = (torch.randn(total, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    outs = []
    for check, bound in ((True, longest), (False, longest), (False, longest + 5)):
        out = iwm_kernels.varlen_attention(q, k, v, cu.clone(), bound, segment_ids=None if seg is None else seg.clone(),
                                           backend=backend, check_values=check)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v)) if total else ()
        outs.append((out.detach(), grads))
    for out, grads in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=1e-5, rtol=1e-4)
        for g, g0 in zip(grads, outs[0][1]):
            torch.testing.assert_close(g, g0, atol=1e-5, rtol=1e-4)


def test_layout_bounds_match_the_rule(seed):
    """The nonzero-free run bounds: lo/hi are each row's own segment run, ctx_end its sequence's context end."""
    from iwm_kernels.attention.layout import prepare
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        cu, seg, total, longest = _layout_case(gen, True)
        if total == 0:
            continue
        ctx_end, lo, hi = prepare(cu, seg, total, longest, check_values=False).bounds()
        bounds, labels = cu.tolist(), seg.tolist()
        for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
            assert ctx_end[s] == a + sum(1 for r in range(a, b) if labels[r] == 0)
            for r in range(a, b):
                if labels[r] == 0:
                    assert lo[r] == hi[r] == ctx_end[s]
                else:
                    run = [i for i in range(a, b) if labels[i] == labels[r]]
                    assert (lo[r], hi[r]) == (run[0], run[-1] + 1)


def test_checked_attention_still_refuses_bad_offsets(seed):
    q = torch.randn(6, 1, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        iwm_kernels.varlen_attention(q, q, q, torch.tensor([0, 4, 3, 6], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        iwm_kernels.varlen_attention(q, q, q, torch.tensor([0, 5, 6], dtype=torch.int32), 2)


def test_photometric_plan_from_sigmas_and_unchecked_tables(seed):
    from iwm_kernels.photometric import blur_plan, blur_plan_from_sigmas
    cfg = aug.AugmentConfig(out_size=16, blur_p=0.6)
    params = aug.sample_view_params(6, cfg, aug.generator_for_step(seed, 1))
    assert params.validated and len(params.source_blur) == 6
    source, target = params.photometric_params("source"), params.photometric_params("target")
    from_table = blur_plan(torch.stack([source, target]))
    from_numbers = blur_plan_from_sigmas([params.source_blur, (0.0,) * 6])
    for a, b in zip((from_table.slot_of, from_table.slot_row, from_table.taps),
                    (from_numbers.slot_of, from_numbers.slot_row, from_numbers.taps)):
        torch.testing.assert_close(a, b)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    checked = iwm_kernels.photometric_two_view(images, source, target)
    vouched = aug.render_views(images, params, cfg)
    part = aug.render_views(images[2:5], params.slice(2, 5), cfg)
    torch.testing.assert_close(vouched[0], checked[0]), torch.testing.assert_close(vouched[1], checked[1])
    torch.testing.assert_close(part[0], checked[0][2:5])
    bad = source.clone()
    bad[0, 3] = 0.9  # hue out of range: refused when checked (the default), not read when vouched for
    with pytest.raises(ValueError, match="hue"):
        iwm_kernels.photometric(images, bad)
    iwm_kernels.photometric(images, bad, check_values=False, plan=blur_plan_from_sigmas([params.source_blur]))
    with pytest.raises(ValueError, match="plan"):
        iwm_kernels.photometric(images, source, plan=from_numbers)  # a two-view plan for one view

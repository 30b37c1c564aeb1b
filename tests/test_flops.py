"""benchmarks.flops: hand-counted shapes, the packed layouts' pair counts, and torch's own FLOP counter
on the real model (attention forced to SDPA's math path, whose matmuls the counter sees)."""
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import flops
from benchmarks.ijepa_baseline import IJEPAForward
from iwm.masks import MultiBlockMaskSampler
from iwm.models import IWM
from iwm_kernels import pack_predictor_sequences, use_backend
from iwm_kernels.attention import prepare


def test_block_flops_by_hand():
    # ViT block, mlp ratio 4: qkv 6TD^2, proj 2TD^2, mlp 16TD^2, attention 4 D per visible pair.
    t, d, pairs = 10, 8, 37
    assert flops.block_flops(t, pairs, d, 4 * d) == 24 * t * d * d + 4 * d * pairs
    enc = flops.ViTDims(dim=d, depth=3, mlp_hidden=4 * d)
    # two images of 4 patches of 12 values; sequences of 3 and 2 tokens
    want = 2 * 2 * 4 * 12 * d + 3 * (24 * 5 * d * d + 4 * d * (9 + 4))
    assert flops.encoder_flops(enc, [3, 2], images=2, patches=4, patch_in=12) == want


def test_predictor_pairs_by_hand():
    # context of 3, blocks of 2 and 1. Shared: context sees itself, a block sees context + itself.
    assert flops.predictor_pairs([3], [[2, 1]], shared=True) == (6, 9 + 2 * 5 + 1 * 4)
    # Repeated (I-JEPA): sequences of 5 and 4 tokens, full attention.
    assert flops.predictor_pairs([3], [[2, 1]], shared=False) == (9, 25 + 16)
    # Sequence conditioning: the action tokens join the context.
    assert flops.predictor_pairs([3], [[2]], shared=True, extra_tokens=7) == (12, 100 + 2 * 12)


@pytest.mark.parametrize("shared", [True, False])
def test_predictor_pairs_match_the_packed_layout(seed, shared):
    """Our count of tokens and visible pairs equals the attention kernels' own layout."""
    rng = random.Random(seed)
    batch, m = rng.randint(1, 5), rng.randint(1, 4)
    ctx = [rng.randint(1, 20) for _ in range(batch)]
    tgt = [[rng.randint(1, 9) for _ in range(m)] for _ in range(batch)]
    ccu = torch.tensor([0] + torch.tensor(ctx).cumsum(0).tolist(), dtype=torch.int32)
    flat = [x for b in tgt for x in b]
    tcu = torch.tensor([0] + torch.tensor(flat).cumsum(0).tolist(), dtype=torch.int32)
    packed = pack_predictor_sequences(torch.zeros(sum(ctx), 1), ccu, torch.zeros(sum(flat), 1), tcu, m,
                                      shared_context=shared)
    layout = prepare(packed.cu_seqlens, packed.segment_ids, packed.num_tokens, packed.max_seqlen)
    pairs = layout.visible_pairs() if shared else int((layout.lengths ** 2).sum())
    assert flops.predictor_pairs(ctx, tgt, shared=shared) == (packed.num_tokens, pairs)


def _counted(fn) -> int:
    from benchmarks import phase_flops

    counter = phase_flops.counter()  # torch's, plus the in-place addmm_ of the fused residual linears
    # The linears as torch's F.linear: oneDNN's pads the rows to a bucket (more FLOPs than the formula)
    with use_backend("reference"), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        fn()
    return counter.get_total_flops()


def _masked_pairs(model, masks) -> float:
    """(query, key) pairs the shared layout masks out, over its packed sequences: the reference kernel
    runs SDPA over the full square with a segment mask, which the counter counts whole."""
    ctx, tgt = flops.mask_lengths(masks)
    extra = flops.ACTION_DIM if model.conditioning == "sequence" else 0
    full = sum((c + extra + sum(t)) ** 2 for c, t in zip(ctx, tgt))
    return full - flops.predictor_pairs(ctx, tgt, shared=True, extra_tokens=extra)[1]


@pytest.mark.parametrize("shared", [False, True], ids=["repeated", "shared"])
@pytest.mark.parametrize("conditioning", ["feature", "none", "sequence"])
def test_step_flops_match_torch_flop_counter(seed, shared, conditioning):
    """The whole forward of IWM on both predictor layouts, exactly: every matmul and convolution, on
    ragged masks. For the shared layout the counter sees the reference kernel's masked full squares;
    the difference is exactly the masked pairs (the kernels that skip them do not compute them)."""
    model = IWM.from_preset("tiny", shared_context=shared, conditioning=conditioning)
    model.check_inputs = False
    batch = 3
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(batch, 0)
    x, y, a = torch.randn(batch, 3, 64, 64), torch.randn(batch, 3, 64, 64), torch.randn(batch, 7)
    counted = _counted(lambda: model(x, y, masks, a, backend="reference"))
    ctx, tgt = flops.mask_lengths(masks)
    ours = flops.step_flops(model, ctx, tgt, shared=shared)
    masked = _masked_pairs(model, masks) if shared else 0
    if shared:
        assert masked > 0
    assert ours.forward + len(model.predictor.predictor_blocks) * flops.attention_flops(masked, model.predictor.dim) \
        == pytest.approx(counted, rel=1e-12)
    assert ours.step == 3 * (ours.encoder + ours.predictor) + ours.target_encoder


@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
def test_faithful_baseline_flops_match_torch_flop_counter(seed, conditioning):
    """The faithful I-JEPA baseline's dense path (truncated masks, the context repeated per block,
    hand-written attention, the action MLP unsplit per target row), exactly."""
    model = IWM.from_preset("tiny", conditioning=conditioning)
    batch = 3
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(batch, 0)
    enc, pred = masks.to_ijepa()
    x, y, a = torch.randn(batch, 3, 64, 64), torch.randn(batch, 3, 64, 64), torch.randn(batch, 7)
    counted = _counted(lambda: IJEPAForward(model)(x, y, enc, pred, a))
    kc, kt = enc[0].shape[1], pred[0].shape[1]
    ours = flops.step_flops(model, [kc] * batch, [[kt] * len(pred)] * batch, shared=False,
                            split_conditioning=False, prune_last_block=False)
    assert ours.forward == pytest.approx(counted, rel=1e-12)
    # the same tokens through our packed model: equal except the (split) action MLP and the last block's
    # context rows (their projection and MLP, which nothing reads)
    ctx, tgt = flops.mask_lengths(masks.truncated())
    packed = flops.step_flops(model, ctx, tgt, shared=False)
    assert packed.encoder == ours.encoder and packed.target_encoder == ours.target_encoder
    extra = flops.ACTION_DIM if conditioning == "sequence" else 0   # action tokens join every context
    unread = flops.last_block_unread_flops(flops.model_dims(model)[1], len(pred) * (sum(ctx) + batch * extra))
    assert unread > 0
    dense = flops.step_flops(model, ctx, tgt, shared=False, prune_last_block=False)
    assert dense.predictor - packed.predictor == pytest.approx(unread, rel=1e-12)
    assert (dense.predictor == ours.predictor) == (conditioning != "feature")


# ---- per-phase accounting: FLOPs computed (FlopCounterMode on the real step) against FLOPs needed --------

def _views(batch):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 3, 64, 64, generator=g),
            torch.randn(batch, 7, generator=g))


@pytest.mark.parametrize("shared", [False, True], ids=["repeated", "shared"])
@pytest.mark.parametrize("conditioning", ["none", "feature", "sequence"])
def test_no_phase_computes_more_than_its_tokens_need(seed, shared, conditioning, monkeypatch):
    """Our step on the sampler's ragged masks (automatic backends: native attention on the CPU, its
    per-sequence path forced: at these short lengths it would pick the padded call, which is faster
    there): every phase within 1.1x of what its tokens need; no padded pairs, no padded rows in the linears."""
    from benchmarks import phase_flops
    from iwm_kernels.attention import native

    monkeypatch.setattr(native, "LOOP_MIN_SAVED_PAIRS", 0)
    monkeypatch.setattr(native, "NATIVE_MIN_SAVED_PAIRS", 0)  # the C++ varlen_sdpa too (its FLOPs counted by formula)

    model = IWM.from_preset("tiny", shared_context=shared, conditioning=conditioning)
    batch = 4
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(batch, 0)
    x, y, a = _views(batch)
    phases = phase_flops.ours(model, x, y, masks, a if conditioning != "none" else None)
    assert [p.name for p in phases] == list(phase_flops.PHASES)
    for p in phases:
        assert p.needed > 0 and 0.99 <= p.ratio <= phase_flops.LIMIT, (p.name, p.ratio)
    assert all(q.grad is None for q in model.parameters())


def test_phase_accounting_sees_padding(monkeypatch, seed):
    """The padded path (what runs without Python lengths) computes padded (query, key) pairs, and the
    accounting shows it: the check above can fail."""
    from benchmarks import phase_flops
    from iwm_kernels.attention import native

    monkeypatch.setattr(native, "LOOP_MAX_SEQS", 0)
    model = IWM.from_preset("tiny", shared_context=True, conditioning="none")
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(4, 0)
    x, y, _ = _views(4)
    ratios = {p.name: p.ratio for p in phase_flops.ours(model, x, y, masks)}
    assert ratios["attention"] > phase_flops.LIMIT
    assert ratios["target encoder"] == pytest.approx(1.0)


@pytest.mark.parametrize("conditioning", ["none", "feature"])
def test_baseline_phases_equal_ours_at_equal_work(seed, conditioning):
    """The faithful I-JEPA step computes what its tokens need, and at equal work (truncated masks,
    repeated layout) each phase's count equals ours (except the baseline's unsplit action MLP)."""
    from benchmarks import phase_flops

    model = IWM.from_preset("tiny", conditioning=conditioning)
    masks = MultiBlockMaskSampler(8, min_keep=4, seed=seed).sample(3, 0)
    x, y, a = _views(3)
    a = a if conditioning != "none" else None
    with use_backend("reference"):  # torch's F.linear: oneDNN's linears pad their rows (checked below)
        base = phase_flops.baseline(IJEPAForward(model), x, y, *masks.to_ijepa(), a)
        ours = phase_flops.ours(model, x, y, masks.truncated(), a)
    # On oneDNN the rows of each product are padded to a bucket (at most 1/16 more): the accounting
    # counts the padded rows as computed
    for p in phase_flops.ours(model, x, y, masks.truncated(), a):
        assert 1.0 - 1e-4 <= p.ratio <= 1.0 + 1 / 16, (p.name, p.ratio)
    for b, o in zip(base, ours):
        # (ours' backward skips the input gradient of the split action MLP's per-position part: a hair under 1)
        assert b.ratio == pytest.approx(1.0) and o.ratio == pytest.approx(1.0, rel=1e-4), (b.name, b.ratio, o.ratio)
        if b.name in ("target encoder", "context encoder", "attention"):
            assert b.computed == o.computed, b.name
        else:  # ours skips the last predictor block's unread context rows (and the split MLP's share)
            assert o.computed < b.computed, b.name

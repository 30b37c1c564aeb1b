"""benchmarks.flops: hand-counted shapes, the packed layouts' pair counts, and torch's own FLOP counter
on the real model (attention forced to SDPA's math path, whose matmuls the counter sees)."""
import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flops
from benchmarks.ijepa_baseline import IJEPAForward
from iwm.masks import MultiBlockMaskSampler
from iwm.models import IWM
from iwm_kernels import pack_predictor_sequences
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
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
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
                            split_conditioning=False)
    assert ours.forward == pytest.approx(counted, rel=1e-12)
    # the same tokens through our packed model: equal except the (split) action MLP
    packed = flops.step_flops(model, *flops.mask_lengths(masks.truncated()), shared=False)
    assert packed.encoder == ours.encoder and packed.target_encoder == ours.target_encoder
    assert (packed.predictor == ours.predictor) == (conditioning != "feature")

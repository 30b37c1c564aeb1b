"""MultiBlockMaskSampler / MaskBatch: property tests (bounds, block shapes, disjointness, min_keep,
determinism), coverage of the whole grid, I-JEPA parity of the truncated form, and argument checks."""
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.ijepa_collator import IJEPAMaskCollator
from iwm.masks import MaskBatch, MultiBlockMaskSampler, block_dims

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_packing(index, cu, sequences, n):
    assert index.dtype == torch.int32 and cu.dtype == torch.int32
    assert cu.shape == (sequences + 1,) and int(cu[0]) == 0 and int(cu[-1]) == index.numel()
    assert bool((cu[1:] >= cu[:-1]).all())
    if index.numel():
        assert 0 <= int(index.min()) and int(index.max()) < n
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = index[a:b]
        assert bool((seg[1:] > seg[:-1]).all()), "indices sorted and unique within a sequence"


def is_rectangle(seg, width, h, w):
    rows, cols = seg.long() // width, seg.long() % width
    top, left = int(rows.min()), int(cols.min())
    want = torch.tensor([(top + i) * width + left + j for i in range(h) for j in range(w)])
    return torch.equal(seg.long().sort().values, want)


@st.composite
def sampler_configs(draw):
    height, width = draw(st.integers(3, 16)), draw(st.integers(3, 16))
    lo = draw(st.floats(0.02, 0.4))
    hi = draw(st.floats(lo, 0.45))
    alo = draw(st.floats(0.3, 2.0))
    ahi = draw(st.floats(alo, 3.0))
    mode = draw(st.sampled_from(["complement", "block"]))
    cfg = dict(grid=(height, width), num_targets=draw(st.integers(1, 5)), target_scale=(lo, hi),
               target_aspect=(alo, ahi), context_mode=mode, min_keep=draw(st.integers(1, 6)),
               seed=draw(st.integers(0, 2**40)))
    if mode == "block":
        clo = draw(st.floats(0.5, 1.0))
        cfg.update(context_scale=(clo, draw(st.floats(clo, 1.0))), allow_overlap=draw(st.booleans()))
    return cfg


@PROPERTY
@given(cfg=sampler_configs(), batch=st.integers(0, 9), step=st.integers(0, 10**9))
def test_sampler_properties(cfg, batch, step):
    try:
        sampler = MultiBlockMaskSampler(**cfg)
    except ValueError as exc:  # the only refusals: min_keep patches cannot fit the context block or
        assert "min_keep" in str(exc)  # beside the smallest target block
        return
    out = sampler.sample(batch, step)
    (H, W), M, N = sampler.grid, sampler.num_targets, H_W(sampler)
    assert (out.batch_size, out.num_targets, out.grid) == (batch, M, (H, W))
    check_packing(out.context_index, out.context_cu, batch, N)
    check_packing(out.target_index, out.target_cu, batch * M, N)
    # Block size: shared by the batch, within the scale / aspect ranges up to rounding to whole patches.
    h, w = out.target_block
    assert (h, w) == sampler.block_sizes(step)[0]
    (lo, hi), (alo, ahi) = sampler.target_scale, sampler.target_aspect
    assert min(H, max(1, math.floor(math.sqrt(lo * N * alo) - 0.5))) <= h <= min(H, math.ceil(math.sqrt(hi * N * ahi) + 0.5))
    assert min(W, max(1, math.floor(math.sqrt(lo * N / ahi) - 0.5))) <= w <= min(W, math.ceil(math.sqrt(hi * N / alo) + 0.5))
    lengths = out.target_lengths()
    assert bool((lengths == h * w).all())
    for j in range(batch * M):
        seg = out.target_index[int(out.target_cu[j]):int(out.target_cu[j + 1])]
        assert is_rectangle(seg, W, h, w)
    # Context: at least min_keep, and disjoint from the sample's targets unless overlap was allowed or
    # the documented fallback kicked in.
    assert bool((out.context_lengths() >= sampler.min_keep).all())
    ctx, tgt = out.dense_context(), out.dense_targets().any(1)
    overlapping = (ctx & tgt).any(1)
    if not sampler.allow_overlap:
        assert int(overlapping.sum()) <= out.fallbacks
    if sampler.context_mode == "complement" and out.fallbacks == 0:
        assert torch.equal(ctx, ~tgt)
    if sampler.context_mode == "block":
        ch, cw = out.context_block
        for b in range(batch):
            cells = ctx[b].nonzero().squeeze(1)
            if cells.numel():
                rows, cols = cells // W, cells % W
                assert int(rows.max() - rows.min()) < ch and int(cols.max() - cols.min()) < cw
    # Determinism: a function of (seed, step, batch_size) only.
    again = MultiBlockMaskSampler(**cfg).sample(batch, step)
    for name in ("context_index", "context_cu", "target_index", "target_cu"):
        assert torch.equal(getattr(out, name), getattr(again, name))


def H_W(sampler):
    return sampler.grid[0] * sampler.grid[1]


def test_default_block_statistics(seed):
    """I-JEPA's defaults on 14x14: blocks of 15-20 % of the grid (up to rounding), aspect 0.75-1.5."""
    sampler = MultiBlockMaskSampler(14, seed=seed)
    sizes = [sampler.block_sizes(step)[0] for step in range(400)]
    areas = torch.tensor([h * w / 196 for h, w in sizes])
    aspects = torch.tensor([h / w for h, w in sizes])
    assert 0.12 <= float(areas.min()) and float(areas.max()) <= 0.24
    assert 0.15 <= float(areas.mean()) <= 0.2
    assert 0.6 <= float(aspects.min()) and float(aspects.max()) <= 1.8
    assert float(aspects.min()) < 0.9 and float(aspects.max()) > 1.2  # the whole range is used


@pytest.mark.parametrize("mode", ["complement", "block"])
def test_coverage_every_patch_is_drawn(mode, seed):
    """Over many batches every patch is in some context and in some target, last row and column too."""
    sampler = MultiBlockMaskSampler(14, context_mode=mode, seed=seed)
    seen_ctx = torch.zeros(196, dtype=torch.bool)
    seen_tgt = torch.zeros(196, dtype=torch.bool)
    for step in range(20):
        out = sampler.sample(64, step)
        seen_ctx[out.context_index.long()] = True
        seen_tgt[out.target_index.long()] = True
    assert bool(seen_ctx.all()) and bool(seen_tgt.all())


def test_ijepa_port_never_draws_the_last_row_or_column(seed):
    """The off-by-one we do not copy: I-JEPA's blocks never touch the last row or column."""
    collator = IJEPAMaskCollator(14, seed=seed)
    seen = torch.zeros(196, dtype=torch.bool)
    for step in range(3):
        masks_enc, masks_pred = collator.sample(16, step)
        for m in masks_enc + masks_pred:
            seen[m.reshape(-1)] = True
    grid = seen.view(14, 14)
    assert not bool(grid[13].any()) and not bool(grid[:, 13].any())
    assert bool(grid[:13, :13].any())


def test_ijepa_port_shapes_and_truncation():
    masks_enc, masks_pred = IJEPAMaskCollator(14, seed=1).sample(8, 5)
    assert len(masks_enc) == 1 and len(masks_pred) == 4
    assert masks_enc[0].dtype == torch.int64 and masks_enc[0].shape[0] == 8
    assert all(m.shape == masks_pred[0].shape for m in masks_pred)


def test_ijepa_port_raises_where_ijepa_hangs():
    with pytest.raises(RuntimeError, match="loop forever"):
        IJEPAMaskCollator(6, max_attempts=200).sample(2, 0)  # 96 px images, 16 px patches


def test_small_grid_terminates_with_counted_fallbacks():
    """Where I-JEPA loops forever (6x6 grid), we return, keep min_keep, and count the fallbacks."""
    sampler = MultiBlockMaskSampler(4, target_scale=(0.3, 0.4), min_keep=10, max_tries=2)
    total = 0
    for step in range(20):
        out = sampler.sample(16, step)
        assert bool((out.context_lengths() >= 10).all())
        total += out.fallbacks
    assert total > 0
    MultiBlockMaskSampler(6, context_mode="block").sample(32, 0)


def overlapping_rows(masks):
    """Samples whose context shares a patch with one of their targets (what the fallback allows)."""
    overlap = (masks.dense_context() & masks.dense_targets().any(1)).any(1)
    return tuple(overlap.nonzero().squeeze(1).tolist())


def test_fallbacks_are_the_overlapping_samples_and_survive_slicing(seed):
    """The count is exact (the samples whose context had to overlap their targets, nothing else), a
    rank's slice carries its own share, and the I-JEPA-truncated form keeps it."""
    sampler = MultiBlockMaskSampler(4, target_scale=(0.3, 0.4), min_keep=10, max_tries=2, seed=seed)
    total = 0
    for step in range(6):
        out = sampler.sample(16, step)
        assert isinstance(out.fallbacks, int) and out.fallback_rows == overlapping_rows(out)
        assert out.fallbacks == len(out.fallback_rows)
        total += out.fallbacks
        part = out.slice(5, 12)
        assert part.fallback_rows == overlapping_rows(part) and part.fallbacks == len(part.fallback_rows)
        short = out.truncated()
        assert (short.fallbacks, short.fallback_rows) == (out.fallbacks, out.fallback_rows)
        assert (short.target_block, short.context_block) == (out.target_block, out.context_block)
    assert total > 0
    roomy = MultiBlockMaskSampler(14, seed=seed).sample(32, 0)
    assert roomy.fallbacks == 0 and overlapping_rows(roomy) == ()


@pytest.mark.parametrize("ragged", [True, False])
def test_rank_masks_report_their_own_fallbacks(seed, ragged):
    from iwm.builders import RankMasks

    sampler = MultiBlockMaskSampler(4, target_scale=(0.3, 0.4), min_keep=10, max_tries=1, seed=seed)
    for step in range(3):
        full = sampler.sample(16, step)
        got = RankMasks(sampler, 16, 1, 8, ragged)(step)
        assert got.fallbacks == sum(1 for r in full.fallback_rows if r >= 8)


@pytest.mark.slow
def test_mask_fallbacks_reach_metrics_jsonl(tmp_path):
    """A 4x4 grid with min_keep=12 forces fallbacks; each step's row says how many."""
    from iwm.config import load_config
    from iwm.train import Trainer

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny.yaml", [
        f"logging.folder={tmp_path}", "data.crop_size=32", "mask.patch_size=8", "data.batch_size=8",
        "data.builtin_samples=16", "data.num_workers=0", "eval.at_end=false", "logging.tensorboard=false",
        "logging.checkpoint_every=0", "meta.use_bfloat16=false", "mask.min_keep=12", "optimization.max_steps=1",
        "optimization.warmup=1"])
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [trainer.masks.sample(8, 0).fallbacks]
    assert [r["mask_fallbacks"] for r in rows] == want and sum(want) > 0


def test_to_ijepa_truncates_like_ijepa():
    sampler = MultiBlockMaskSampler(14, context_mode="block", seed=3)
    out = sampler.sample(16, 7)
    masks_enc, masks_pred = out.to_ijepa()
    lengths = out.context_lengths()
    k = int(lengths.min())
    assert len(masks_enc) == 1 and masks_enc[0].shape == (16, k) and masks_enc[0].dtype == torch.int64
    assert len(masks_pred) == 4 and all(m.shape == (16, out.target_block[0] * out.target_block[1]) for m in masks_pred)
    for b in range(16):
        full = out.context_index[int(out.context_cu[b]):int(out.context_cu[b + 1])]
        assert torch.equal(masks_enc[0][b], full[:k].long())
        for j in range(4):
            s = b * 4 + j
            assert torch.equal(masks_pred[j][b], out.target_index[int(out.target_cu[s]):int(out.target_cu[s + 1])].long())
    back = MaskBatch.from_ijepa(masks_enc, masks_pred, 14)
    assert torch.equal(back.target_index, out.target_index) and torch.equal(back.target_cu, out.target_cu)
    assert torch.equal(back.context_lengths(), torch.full((16,), k, dtype=torch.int32))


def test_mask_batch_helpers():
    out = MultiBlockMaskSampler((5, 7), num_targets=2, min_keep=2).sample(3, 0)
    assert out.target_cu_per_sample.tolist() == out.target_cu[::2].tolist()
    assert out.dense_context().shape == (3, 35) and out.dense_targets().shape == (3, 2, 35)
    moved = out.to("meta")
    assert moved.context_index.device.type == "meta" and moved.grid == (5, 7)
    assert "MaskBatch(" in repr(out)


def test_same_masks_in_dataloader_workers():
    """A collate function calling the sampler with the batch's step gives the same masks in workers."""
    sampler = MultiBlockMaskSampler(8, seed=11)
    loader = torch.utils.data.DataLoader(list(range(12)), batch_size=4, num_workers=2,
                                         collate_fn=StepCollate(sampler), multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == 3
    for step, (got_index, got_cu) in enumerate(batches):
        want = sampler.sample(4, step)
        assert torch.equal(got_index, want.context_index) and torch.equal(got_cu, want.context_cu)


class StepCollate:
    """Items are consecutive ints; the batch's step is its first item // batch size."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, items):
        out = self.sampler.sample(len(items), items[0] // len(items))
        return out.context_index, out.context_cu


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=0), "grid"),
    (dict(grid=(4, 4, 4)), "grid"),
    (dict(grid=14, num_targets=0), "num_targets"),
    (dict(grid=14, target_scale=(0.3, 0.2)), "target_scale"),
    (dict(grid=14, target_scale=(0.1, 1.5)), "target_scale"),
    (dict(grid=14, target_aspect=(0, 1)), "target_aspect"),
    (dict(grid=14, context_mode="union"), "context_mode"),
    (dict(grid=14, context_scale=(0.5,)), "context_scale"),
    (dict(grid=14, allow_overlap=True), "allow_overlap"),
    (dict(grid=3, min_keep=10), "min_keep"),
    (dict(grid=14, context_mode="block", context_scale=(0.01, 0.02), min_keep=10), "min_keep"),
    (dict(grid=14, min_keep=-1), "min_keep"),
    (dict(grid=14, min_keep=0), "min_keep"),  # an empty context
    (dict(grid=1, min_keep=1), r"1x1 patch grid.*min_keep=1"),  # the target takes the only patch
    (dict(grid=2, target_scale=(0.5, 0.6), target_aspect=(1.5, 2.0), min_keep=3),  # 2x1 targets
     r"2x2 patch grid.*at most 2 context patches"),
    (dict(grid=3, context_mode="block", context_scale=(1.0, 1.0), target_scale=(0.4, 0.45),
          target_aspect=(1.0, 1.0), min_keep=6), r"3x3 patch grid.*at most 5 context patches"),
    (dict(grid=14, seed=1.5), "seed"),
])
def test_sampler_argument_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MultiBlockMaskSampler(**kwargs)


def test_overlapping_block_context_needs_no_room_beside_the_targets():
    """With allow_overlap the context block may hold the targets, so only its own size is checked."""
    sampler = MultiBlockMaskSampler(3, context_mode="block", context_scale=(1.0, 1.0), target_scale=(0.4, 0.45),
                                    target_aspect=(1.0, 1.0), min_keep=6, allow_overlap=True)
    out = sampler.sample(4, 0)
    assert out.fallbacks == 0 and out.context_lengths().tolist() == [9] * 4


def test_sample_argument_errors():
    sampler = MultiBlockMaskSampler(8)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(-1, 0)
    with pytest.raises(TypeError, match="step"):
        sampler.sample(4, 1.0)
    with pytest.raises(ValueError, match="masks_enc"):
        MaskBatch.from_ijepa([], [torch.zeros(2, 3, dtype=torch.int64)], 8)
    with pytest.raises(ValueError, match=r"masks_pred\[0\]: index 64 out of range"):
        MaskBatch.from_ijepa([torch.zeros(2, 3, dtype=torch.int64)], [torch.full((2, 3), 64)], 8)


def test_block_dims_clamps_to_grid():
    assert block_dims((14, 14), 1.0, 1.0) == (14, 14)
    assert block_dims((4, 20), 0.5, 4.0) == (4, 3)  # like I-JEPA: clamped, not re-balanced
    assert block_dims((14, 14), 1e-4, 1.0) == (1, 1)


def test_impossible_mask_settings_are_a_config_error_at_start(tmp_path):
    # A 3x3 grid with targets of half the grid cannot keep min_keep=8 context patches beside a target
    # block: refused as a ConfigError (the CLI's clean "error:" line), not a ValueError traceback from
    # inside the trainer.
    from pathlib import Path

    from iwm.builders import build_mask_sampler
    from iwm.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["data.crop_size=24", "mask.patch_size=8", "mask.min_keep=8",
                             "mask.pred_mask_scale=[0.5,0.6]", f"logging.folder={tmp_path}"])
    with pytest.raises(ConfigError, match=r"mask: min_keep: .*3x3 grid"):
        build_mask_sampler(cfg, 0)

"""Baseline for timing the mask sampler: I-JEPA's per-sample mask collator, ported from its semantics.

What it reproduces (facebookresearch/ijepa, src/masks/multiblock.py, `MaskCollator`), rewritten here:
- one block size per batch for the targets and one for the context, from a generator seeded by a
  step counter; a single uniform number sets both a block's scale and its aspect ratio;
  patches kept = int(H*W*scale), h = round(sqrt(kept*aspect)), w = round(sqrt(kept/aspect)), then
  h and w are lowered until they are below H and W;
- per sample and per block, a top-left corner drawn from [0, H - h) x [0, W - w) (so the last row and
  column are never part of a block: the off-by-one) and a dense H x W mask built for it;
- targets first; the context block is then restricted to the complement of that sample's targets
  (unless allow_overlap) and redrawn until it keeps more than `min_keep` patches, dropping one
  target's restriction after every 20 failures;
- every mask is cut to the batch minimum and the result collated into lists of [B, K] int64 tensors.

Two deliberate differences, neither of which changes the work done per sample: positions come from a
generator seeded by (seed, step) instead of the global RNG (so runs are reproducible), and a draw that
cannot succeed raises after `max_attempts` instead of looping forever (I-JEPA hangs on small grids).
Only for benchmarks and tests; iwm.masks is the sampler to use.
"""
from __future__ import annotations

import math

import torch

from iwm import rng


class IJEPAMaskCollator:
    def __init__(self, grid: int = 14, *, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
                 aspect_ratio=(0.75, 1.5), nenc: int = 1, npred: int = 4, min_keep: int = 10,
                 allow_overlap: bool = False, seed: int = 0, max_attempts: int = 10_000):
        self.height = self.width = grid
        self.enc_mask_scale, self.pred_mask_scale, self.aspect_ratio = enc_mask_scale, pred_mask_scale, aspect_ratio
        self.nenc, self.npred, self.min_keep = nenc, npred, min_keep
        self.allow_overlap, self.seed, self.max_attempts = allow_overlap, seed, max_attempts

    def _block_size(self, gen: torch.Generator, scale, aspect_range) -> tuple[int, int]:
        u = torch.rand(1, generator=gen).item()
        kept = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
        aspect = aspect_range[0] + u * (aspect_range[1] - aspect_range[0])
        h = int(round(math.sqrt(kept * aspect)))
        w = int(round(math.sqrt(kept / aspect)))
        h = min(h, self.height - 1)
        w = min(w, self.width - 1)
        return h, w

    def _block_mask(self, gen: torch.Generator, size, allowed=None):
        h, w = size
        relaxed, failures = 0, 0
        for _ in range(self.max_attempts):
            top = int(torch.randint(0, self.height - h, (1,), generator=gen))
            left = int(torch.randint(0, self.width - w, (1,), generator=gen))
            dense = torch.zeros((self.height, self.width), dtype=torch.int32)
            dense[top:top + h, left:left + w] = 1
            if allowed is not None:
                for region in allowed[: max(len(allowed) - relaxed, 0)]:
                    dense *= region
            kept = torch.nonzero(dense.flatten())
            if len(kept) > self.min_keep:
                outside = torch.ones((self.height, self.width), dtype=torch.int32)
                outside[top:top + h, left:left + w] = 0
                return kept.squeeze(), outside
            failures += 1
            if failures == 20:
                relaxed, failures = relaxed + 1, 0
        raise RuntimeError(f"no block of {h}x{w} keeps more than min_keep={self.min_keep} patches on a "
                           f"{self.height}x{self.width} grid (I-JEPA would loop forever here)")

    def sample(self, batch_size: int, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(masks_enc, masks_pred) for one batch, as I-JEPA's collator returns them."""
        gen = torch.Generator().manual_seed(step)
        pred_size = self._block_size(gen, self.pred_mask_scale, self.aspect_ratio)
        enc_size = self._block_size(gen, self.enc_mask_scale, (1.0, 1.0))
        pos_gen = rng.generator(rng.MASKS, self.seed, step)
        preds, encs = [], []
        shortest_pred = shortest_enc = self.height * self.width
        for _ in range(batch_size):
            blocks, outsides = [], []
            for _ in range(self.npred):
                kept, outside = self._block_mask(pos_gen, pred_size)
                blocks.append(kept)
                outsides.append(outside)
                shortest_pred = min(shortest_pred, len(kept))
            preds.append(blocks)
            allowed = None if self.allow_overlap else outsides
            contexts = []
            for _ in range(self.nenc):
                kept, _ = self._block_mask(pos_gen, enc_size, allowed)
                contexts.append(kept)
                shortest_enc = min(shortest_enc, len(kept))
            encs.append(contexts)
        masks_pred = [torch.stack([sample[j][:shortest_pred] for sample in preds]) for j in range(self.npred)]
        masks_enc = [torch.stack([sample[j][:shortest_enc] for sample in encs]) for j in range(self.nenc)]
        return masks_enc, masks_pred

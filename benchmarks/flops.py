"""Model FLOPs of one IWM training step, counted from the shapes and the actual sequence lengths.

Counted: every matrix product of the encoder (on the context tokens of the source view), the target
encoder (every patch of the target view, forward only) and the predictor (its packed sequences), with
attention counted on the (query, key) pairs each layout really computes. A multiply-add is 2 FLOPs.
Not counted (a few per cent at most): layer norms, GELU, softmax, residual adds, the loss, the optimiser.

Forward + backward of a trained part is 3x its forward (the backward does two products per forward
product: input and weight gradients), the usual convention for model FLOPs utilisation (MFU). The
target encoder runs forward only.

Two predictor layouts (see `iwm_kernels.pack_predictor_sequences`):
- shared:   one sequence per sample: the context (segment 0, sees itself) then each target block
            (sees the context and itself), so pairs = Lc^2 + sum_j Lt_j * (Lc + Lt_j);
- repeated: I-JEPA's, one sequence per (sample, target block): the context repeated, full attention
            over Lc + Lt_j tokens, pairs = sum_j (Lc + Lt_j)^2.

The predictor's last block: nothing reads its context rows (only the target rows go on to the loss), so
ours runs that block's output projection and MLP on the target rows only (every row still gives keys
and values, and every query is still computed); the faithful baseline runs them on every row
(`prune_last_block=False`), as I-JEPA's code does.

Feature conditioning: our predictor splits the action MLP's first layer into a per-grid-position part
(once per position) and a per-sample part; the faithful I-JEPA-style baseline
(`benchmarks.ijepa_baseline`) runs it unsplit on every target row (`split_conditioning=False`).
Checked against torch.utils.flop_counter.FlopCounterMode in tests/test_flops.py, exactly, on both
layouts and on the dense baseline (for the shared layout the counter sees the reference kernel's
masked full-square attention; the difference is exactly the masked pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ACTION_DIM = 7


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_flops(pairs: float, dim: int) -> float:
    """Q K^T and P V over `pairs` visible (query, key) pairs, all heads together (heads x head_dim = dim)."""
    return 4.0 * pairs * dim


def block_flops(tokens: float, pairs: float, dim: int, mlp_hidden: int) -> float:
    """One pre-norm ViT block: qkv, attention, output projection, two MLP layers."""
    return (linear_flops(tokens, dim, 3 * dim) + attention_flops(pairs, dim) + linear_flops(tokens, dim, dim)
            + linear_flops(tokens, dim, mlp_hidden) + linear_flops(tokens, mlp_hidden, dim))


@dataclass(frozen=True)
class ViTDims:
    dim: int
    depth: int
    mlp_hidden: int


def encoder_flops(enc: ViTDims, seq_lengths: Sequence[int], images: int, patches: int, patch_in: int) -> float:
    """Forward FLOPs of a ViT encoder: the patch embedding of `images` whole images (`patches` patches of
    `patch_in` = channels * patch^2 values each; it runs before any masking) and `depth` blocks over the
    sequences of `seq_lengths` tokens (full attention within each sequence)."""
    tokens = float(sum(seq_lengths))
    pairs = float(sum(n * n for n in seq_lengths))
    return linear_flops(images * patches, patch_in, enc.dim) + enc.depth * block_flops(tokens, pairs, enc.dim,
                                                                                      enc.mlp_hidden)


def predictor_pairs(context_lengths: Sequence[int], target_lengths: Sequence[Sequence[int]], shared: bool,
                    extra_tokens: int = 0) -> tuple[float, float]:
    """(tokens, visible pairs) of the predictor's packed sequences. target_lengths[b] lists the target
    block lengths of sample b; `extra_tokens` per sample join the context (sequence conditioning)."""
    tokens = pairs = 0.0
    for lc, blocks in zip(context_lengths, target_lengths):
        lc = lc + extra_tokens
        if shared:
            tokens += lc + sum(blocks)
            pairs += lc * lc + sum(lt * (lc + lt) for lt in blocks)
        else:
            tokens += sum(lc + lt for lt in blocks)
            pairs += sum((lc + lt) ** 2 for lt in blocks)
    return tokens, pairs


def predictor_flops(pred: ViTDims, embed_dim: int, context_lengths: Sequence[int],
                    target_lengths: Sequence[Sequence[int]], *, shared: bool, conditioning: str = "feature",
                    patches: int = 0, split_conditioning: bool = True, prune_last_block: bool = True) -> float:
    """Forward FLOPs of the predictor: the context embedding (each context token once), the conditioned
    mask tokens, the blocks over the packed sequences, and the projection of the target tokens.
    split_conditioning=False: the action MLP's first layer runs on concat(token, action) per target row.
    prune_last_block=False: the last block's output projection and MLP run on every row, not only on
    the target rows."""
    ctx = float(sum(context_lengths))
    tgt = float(sum(sum(b) for b in target_lengths))
    extra = ACTION_DIM if conditioning == "sequence" else 0
    tokens, pairs = predictor_pairs(context_lengths, target_lengths, shared, extra)
    flops = linear_flops(ctx, embed_dim, pred.dim)
    if conditioning == "feature" and split_conditioning:  # fc1 per position + per sample, then fc2, fc3
        flops += linear_flops(patches, pred.dim, pred.dim) + linear_flops(len(context_lengths), ACTION_DIM, pred.dim)
        flops += 2 * linear_flops(tgt, pred.dim, pred.dim)
    elif conditioning == "feature":  # fc1 on every target row's concat(token, action), then fc2, fc3
        flops += linear_flops(tgt, pred.dim + ACTION_DIM, pred.dim) + 2 * linear_flops(tgt, pred.dim, pred.dim)
    flops += pred.depth * block_flops(tokens, pairs, pred.dim, pred.mlp_hidden)
    if prune_last_block and pred.depth:
        flops -= last_block_unread_flops(pred, tokens - tgt)
    return flops + linear_flops(tgt, pred.dim, embed_dim)


def last_block_unread_flops(pred: ViTDims, rows: float) -> float:
    """The last predictor block's output projection and MLP on `rows` rows that nothing reads."""
    return (linear_flops(rows, pred.dim, pred.dim) + linear_flops(rows, pred.dim, pred.mlp_hidden)
            + linear_flops(rows, pred.mlp_hidden, pred.dim))


@dataclass(frozen=True)
class StepFlops:
    encoder: float          # forward
    target_encoder: float   # forward (no backward: the EMA target is not trained)
    predictor: float        # forward

    @property
    def forward(self) -> float:
        return self.encoder + self.target_encoder + self.predictor

    @property
    def step(self) -> float:
        """Forward + backward of the trained parts, forward of the target encoder."""
        return 3.0 * (self.encoder + self.predictor) + self.target_encoder

    def as_dict(self) -> dict:
        return {"encoder": self.encoder, "target_encoder": self.target_encoder, "predictor": self.predictor,
                "forward": self.forward, "step": self.step}


def model_dims(model) -> tuple[ViTDims, ViTDims, int, int]:
    """(encoder dims, predictor dims, patches per image, values per patch) of an `iwm.models.IWM`."""
    enc, pred = model.encoder, model.predictor
    blk, pblk = enc.blocks[0], pred.predictor_blocks[0]
    patch_in = enc.patch_embed.proj.in_channels * enc.patch_size ** 2
    return (ViTDims(enc.embed_dim, len(enc.blocks), blk.mlp.fc1.out_features),
            ViTDims(pred.dim, len(pred.predictor_blocks), pblk.mlp.fc1.out_features), enc.num_patches, patch_in)


def step_flops(model, context_lengths: Sequence[int], target_lengths: Sequence[Sequence[int]], *,
               shared: bool, split_conditioning: bool = True, prune_last_block: bool = True) -> StepFlops:
    """FLOPs of one step of `model` (an `iwm.models.IWM`) on one batch of masks given as lengths:
    context_lengths[b] context tokens and target_lengths[b] = the M target block lengths of sample b.
    split_conditioning=False, prune_last_block=False count the dense I-JEPA-style baseline (its unsplit
    action MLP, its last predictor block on every row)."""
    enc, pred, patches, patch_in = model_dims(model)
    batch = len(context_lengths)
    return StepFlops(
        encoder=encoder_flops(enc, context_lengths, batch, patches, patch_in),
        target_encoder=encoder_flops(enc, [patches] * batch, batch, patches, patch_in),
        predictor=predictor_flops(pred, enc.dim, context_lengths, target_lengths, shared=shared,
                                  conditioning=model.predictor.conditioning, patches=patches,
                                  split_conditioning=split_conditioning, prune_last_block=prune_last_block))


def mask_lengths(masks) -> tuple[list[int], list[list[int]]]:
    """(context lengths, per-sample target block lengths) of an `iwm.masks.MaskBatch`."""
    ctx = masks.context_lengths().tolist()
    tgt = masks.target_lengths().tolist()
    m = masks.num_targets
    return ctx, [tgt[b * m:(b + 1) * m] for b in range(masks.batch_size)]

"""A faithful I-JEPA training step on an `iwm.models.IWM`'s weights: the step suite's baseline.

Written here from the semantics of facebookresearch/ijepa (src/models/vision_transformer.py,
src/masks/utils.py, src/utils/tensors.py, src/train.py, src/helper.py), not copied. What it does, as
I-JEPA does it:

- masks: the collator's truncated form, lists of int64 [B, K] (every mask cut to the batch minimum;
  `MaskBatch.to_ijepa`);
- `apply_masks`: per mask, an int64 [B, K, D] index built by `repeat` and one `torch.gather`, then
  `torch.cat` over the masks (mask-major rows);
- `repeat_interleave_batch`: the target latents repeated once per context mask (a copy even with one);
- attention as timm 0.x writes it: `(q @ k^T) * scale`, `softmax`, `@ v` (scores materialised; no SDPA);
- encoder: patch embedding, + positions, `apply_masks`, the blocks, the final norm, dense [B, Kc, D];
- predictor: embed the context, + gathered positions, mask token + gathered positions per target
  block, the context repeated with `x.repeat(M, 1, 1)` and concatenated with each block's tokens: one
  dense [M*B, Kc + Kt] sequence per (sample, block), full attention, norm, keep the target rows, project;
- targets: the target encoder on the whole view, `layer_norm` of the whole output, then `apply_masks`;
- smooth-L1 loss; torch's default (non-fused) AdamW over I-JEPA's four parameter groups; the EMA as a
  Python loop of `mul_` and `add_` per parameter.

Beyond I-JEPA (it has no action): IWM's conditioning runs in the same dense style, the action MLP on
concat(mask token + position, action) for every target row ("feature"), the action tokens joined to
each repeated context ("sequence"). With conditioning "none" this is I-JEPA's predictor exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS = "smooth_l1"   # I-JEPA's


def apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """x [B, N, D], masks: list of int64 [B, K] -> [len(masks) * B, K, D], mask-major."""
    out = []
    for m in masks:
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        out.append(torch.gather(x, dim=1, index=index))
    return torch.cat(out, dim=0)


def repeat_interleave_batch(x: torch.Tensor, batch: int, repeat: int) -> torch.Tensor:
    """Each group of `batch` rows repeated `repeat` times in place: [N*B, ...] -> [N*repeat*B, ...]."""
    groups = len(x) // batch
    return torch.cat([torch.cat([x[i * batch:(i + 1) * batch] for _ in range(repeat)], dim=0)
                      for i in range(groups)], dim=0)


def attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm 0.x `Attention.forward` on a `VarlenSelfAttention`'s weights (qkv, proj, scale)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    scores = scores.softmax(dim=-1)
    return attn.proj((scores @ v).transpose(1, 2).reshape(B, N, C))


def block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x + attention(blk.attn, blk.norm1(x))
    return x + blk.mlp(blk.norm2(x))


def encoder_forward(vit: nn.Module, images: torch.Tensor, masks=None) -> torch.Tensor:
    """I-JEPA's `VisionTransformer.forward(x, masks)`: [B, N, D], or [len(masks) * B, K, D]."""
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # I-JEPA's PatchEmbed: a strided view
    x = x + vit.pos_embed.to(x.dtype)
    if masks is not None:
        x = apply_masks(x, masks)
    for blk in vit.blocks:
        x = block(blk, x)
    return vit.norm(x)


def predictor_forward(pred: nn.Module, x: torch.Tensor, masks_x: list[torch.Tensor], masks: list[torch.Tensor],
                      action=None) -> torch.Tensor:
    """I-JEPA's `VisionTransformerPredictor.forward(x, masks_x, masks)` -> [len(masks) * B, Kt, E]."""
    batch = len(x) // len(masks_x)
    x = pred.predictor_embed(x)
    x = x + apply_masks(pred.predictor_pos_embed.repeat(batch, 1, 1), masks_x).to(x.dtype)
    n_ctx = x.shape[1]
    pos = apply_masks(pred.predictor_pos_embed.repeat(batch, 1, 1), masks)
    pos = repeat_interleave_batch(pos, batch, repeat=len(masks_x))
    tokens = pred.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
    if pred.conditioning == "feature":  # the action MLP on every target row, unsplit
        rows_action = action.to(tokens.dtype).repeat(len(masks) * len(masks_x), 1)[:, None, :]
        tokens = pred.action_mlp(tokens, rows_action)
    if pred.conditioning == "sequence":
        extra = pred.action_tokens(action.to(x.dtype)).repeat(len(masks_x), 1, 1)
        x = torch.cat([x, extra], dim=1)
        n_ctx = x.shape[1]
    x = x.repeat(len(masks), 1, 1)
    x = torch.cat([x, tokens.to(x.dtype)], dim=1)
    for blk in pred.predictor_blocks:
        x = block(blk, x)
    x = pred.predictor_norm(x)
    return pred.predictor_proj(x[:, n_ctx:])


class IJEPAForward(nn.Module):
    """I-JEPA's forward_target, forward_context and loss_fn on an `IWM`'s weights: returns the loss.
    Its parts are methods so that `benchmarks.phase_flops` can count each on its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def targets(self, target, masks_enc, masks_pred):
        """forward_target: the whole view, layer_norm, the target rows, repeated per context mask."""
        h = encoder_forward(self.model.target_encoder, target)
        h = F.layer_norm(h, (h.size(-1),))
        batch = len(h)
        h = apply_masks(h, masks_pred)
        return repeat_interleave_batch(h, batch, repeat=len(masks_enc))

    def context(self, source, masks_enc):
        return encoder_forward(self.model.encoder, source, masks_enc)

    def predict(self, z, masks_enc, masks_pred, action=None):
        return predictor_forward(self.model.predictor, z, masks_enc, masks_pred, action)

    def forward(self, source, target, masks_enc, masks_pred, action=None):
        h = self.targets(target, masks_enc, masks_pred)
        z = self.predict(self.context(source, masks_enc), masks_enc, masks_pred, action)
        return F.smooth_l1_loss(z.float(), h.float())


def param_groups(model: nn.Module) -> list[dict]:
    """I-JEPA's init_opt groups: encoder then predictor matrices with weight decay, then their biases
    and 1-D parameters without."""
    def pick(module, decay):
        return [p for n, p in module.named_parameters()
                if p.requires_grad and (("bias" not in n) and p.dim() != 1) == decay]
    return [{"params": pick(model.encoder, True)}, {"params": pick(model.predictor, True)},
            {"params": pick(model.encoder, False), "WD_exclude": True, "weight_decay": 0},
            {"params": pick(model.predictor, False), "WD_exclude": True, "weight_decay": 0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch.optim.AdamW with its defaults (no `fused`, no `foreach` argument), as I-JEPA builds it."""
    return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def ema_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """I-JEPA's EMA: one mul_ and one add_ per parameter."""
    for q, k in zip(online.parameters(), target.parameters()):
        k.data.mul_(momentum).add_((1.0 - momentum) * q.detach().data)

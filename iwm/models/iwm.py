"""`IWM`: encoder, EMA target encoder and predictor, and the training step's loss.

One step (docs/design.md, "What one training step computes"): encode the context tokens of the source view x; encode the whole target view
y with the target encoder and take `layer_norm(f̄(y))` at the target positions (normalising only the
gathered rows, fused in `gather_tokens`); predict those latents from the context under the action
a(x→y); regress with L2 (or smooth-L1).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import iwm_kernels
from iwm_kernels._backend import applies_backend

from .predictor import VisionTransformerPredictor
from .presets import ModelPreset, build_models, get_preset
from .vit import VisionTransformer

LOSSES = ("l2", "smooth_l1")


def _feature_spread(x: torch.Tensor) -> torch.Tensor:
    """Mean over features of the per-feature std over the rows (Bessel-corrected), 0 for one row or none.
    Without a branch on the row count: under torch.compile the count is an unbacked size (no guard)."""
    x = x.float()
    var = (x - x.mean(dim=0)).square().sum(dim=0) / torch.sym_max(x.shape[0] - 1, 1)  # no rows: an empty sum, 0
    return var.sqrt().mean()


class IWM(nn.Module):
    def __init__(self, encoder: VisionTransformer, predictor: VisionTransformerPredictor, *, loss: str = "l2",
                 target_encoder: Optional[VisionTransformer] = None, check_inputs: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
        self.encoder = encoder
        self.target_encoder = target_encoder if target_encoder is not None else copy.deepcopy(encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.predictor = predictor
        self.loss_name = loss
        self.check_inputs = check_inputs

    # check_inputs: also read the images and the action to refuse NaN/Inf (a host sync each step: for
    # interactive use). Off by default: the training step reads nothing back from the device.
    @classmethod
    def from_preset(cls, name: str | ModelPreset = "tiny", *, loss: str = "l2", check_inputs: bool = False,
                    **overrides) -> "IWM":
        preset = name if isinstance(name, ModelPreset) else get_preset(name, **overrides)
        encoder, predictor = build_models(preset)
        model = cls(encoder, predictor, loss=loss, check_inputs=check_inputs)
        model.preset = preset
        return model

    @property
    def conditioning(self) -> str:
        return self.predictor.conditioning

    def _validate(self, source: torch.Tensor, target: torch.Tensor, masks, action: Optional[torch.Tensor]) -> None:
        size = self.encoder.img_size
        for name, img in (("source", source), ("target", target)):
            if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3 or \
                    img.shape[-2:] != (size, size):
                raise ValueError(f"{name}: expected images [B, 3, {size}, {size}], got "
                                 f"{tuple(getattr(img, 'shape', ()))}")
            if not img.dtype.is_floating_point:
                raise ValueError(f"{name}: expected normalised float images, got {img.dtype}")
        if source.shape != target.shape:
            raise ValueError(f"target: shape {tuple(target.shape)} differs from source's {tuple(source.shape)}")
        if masks.batch_size != source.shape[0]:
            raise ValueError(f"masks: built for {masks.batch_size} samples, the batch has {source.shape[0]}")
        if tuple(masks.grid) != (self.encoder.patch_embed.grid,) * 2:
            raise ValueError(f"masks: grid {tuple(masks.grid)} does not match the encoder's "
                             f"{self.encoder.patch_embed.grid}x{self.encoder.patch_embed.grid} patches")
        if action is not None and (action.dim() != 2 or action.shape != (source.shape[0], self.predictor.action_dim)):
            raise ValueError(f"action: expected shape ({source.shape[0]}, {self.predictor.action_dim}), "
                             f"got {tuple(action.shape)}")
        if self.check_inputs and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(source).all()):
                raise ValueError("source: images contain NaN or Inf")
            if not bool(torch.isfinite(target).all()):
                raise ValueError("target: images contain NaN or Inf")
            if action is not None and not bool(torch.isfinite(action).all()):
                raise ValueError("action: contains NaN or Inf")

    @torch.no_grad()
    def targets(self, target: torch.Tensor, masks, backend: Optional[str] = None) -> torch.Tensor:
        """layer_norm(f̄(y)) at the target positions, packed [Tt, D] in the masks' target order."""
        h = self.target_encoder(target, backend=backend)
        return iwm_kernels.gather_tokens(h, masks.target_index, masks.target_cu_per_sample, normalize=True,
                                         eps=1e-5, backend=backend,
                                         check_values=not getattr(masks, "validated", False))

    @applies_backend
    def forward(self, source: torch.Tensor, target: torch.Tensor, masks, action: Optional[torch.Tensor] = None,
                *, backend: Optional[str] = None) -> tuple[torch.Tensor, dict]:
        """Loss and statistics for one batch.

        source, target: the two normalised views [B, 3, H, W]; masks: an `iwm.masks.MaskBatch` on the
        images' device; action: a(x→y) [B, 7] (required unless conditioning is "none").
        With a `validated` MaskBatch (the sampler's) and check_inputs off (the default), nothing in the
        step reads a value back from the device (no host sync); the statistics' token counts are ints.
        """
        self._validate(source, target, masks, action)
        vouched = getattr(masks, "validated", False)
        with torch.no_grad():
            targets = self.targets(target, masks, backend)
        host = getattr(masks, "host_sizes", None) if vouched else None
        if host is not None:
            # The lengths go to the attention as a CPU tensor, the launch bound is the packed row count: no
            # per-step Python int, so torch.compile traces this once for every mask draw.
            longest, lengths = masks.context_index.shape[0], host[:, 0]
        else:
            longest, lengths = (masks.longest_context if vouched else None), None
        context = self.encoder(source, masks.context_index, cu_seqlens=masks.context_cu, max_seqlen=longest,
                               backend=backend, check_values=not vouched, seq_lengths=lengths)
        pred = self.predictor(context, masks, action=action, backend=backend)
        if self.loss_name == "l2":
            loss = F.mse_loss(pred.float(), targets.float())
        else:
            loss = F.smooth_l1_loss(pred.float(), targets.float())
        with torch.no_grad():
            stats = {
                "target_std": _feature_spread(targets.detach()),
                "pred_std": _feature_spread(pred.detach()),
                "context_tokens": masks.context_tokens,
                "target_tokens": masks.target_tokens,
            }
        return loss, stats

    @torch.no_grad()
    def update_target(self, momentum, backend: Optional[str] = None, check_values: bool = True) -> None:
        """target ← m·target + (1−m)·encoder, one fused launch (iwm_kernels.ema_update_).

        check_values=False: a momentum tensor is not read on the host (the training step's, made on the
        device from the skip flag; an invalid value leaves the target as it was and raises at the next read)."""
        iwm_kernels.ema_update_(self.target_encoder, self.encoder, momentum, backend=backend,
                                check_values=check_values)

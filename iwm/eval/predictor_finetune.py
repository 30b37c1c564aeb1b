"""Predictor finetuning (the paper's protocol, small scale): frozen encoder, the pretrained predictor
run with a zero action (no transformation), and an attentive head, trained for classification.

The predictor sees every patch latent of the frozen encoder as its context and predicts one block
covering every position; its outputs are pooled by the attentive head (a learned query attending over
them) into a linear classifier. Predictor and head train; the encoder does not. A randomly initialised
predictor of the same shape, trained the same way, is the comparison.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .linear_probe import ProbeResult, topk_accuracy


class AttentivePooler(nn.Module):
    """One learned query cross-attending over the tokens, then a linear classifier."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4):
        super().__init__()
        heads = num_heads if dim % num_heads == 0 else 1
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        pooled, _ = self.attn(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return self.head(pooled[:, 0])


def _full_masks(batch: int, grid, device):
    from iwm.masks import MaskBatch

    n = grid[0] * grid[1]
    every = torch.arange(n, device=device).repeat(batch, 1)
    return MaskBatch.from_ijepa([every], [every], grid=grid)


def predictor_tokens(predictor, latents: torch.Tensor, grid, backend: Optional[str] = None) -> torch.Tensor:
    """Predictor outputs at every position from full-context latents [B, N, D] -> [B, N, D]."""
    b, n, d = latents.shape
    masks = _full_masks(b, grid, latents.device)
    action = None if predictor.conditioning == "none" else latents.new_zeros(b, predictor.action_dim)
    out = predictor(latents.reshape(b * n, d), masks, action=action, backend=backend)
    return out.view(b, n, -1)


def finetune_predictor(encoder, predictor, train_images, train_labels, val_images, val_labels, normalize, *,
                       epochs: int = 10, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
                       backend: Optional[str] = None) -> ProbeResult:
    device = next(encoder.parameters()).device
    torch.manual_seed(seed)
    grid = (encoder.patch_embed.grid, encoder.patch_embed.grid)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    predictor = copy.deepcopy(predictor).to(device).train()
    head = AttentivePooler(predictor.embed_dim, num_classes).to(device)
    encoder.eval()

    @torch.no_grad()
    def latents(images):
        return encoder(normalize(images.to(device)), backend=backend)

    train_latents = torch.cat([latents(train_images[i:i + 64]) for i in range(0, len(train_images), 64)])
    val_latents = torch.cat([latents(val_images[i:i + 64]) for i in range(0, len(val_images), 64)])
    params = list(predictor.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    train_labels, val_labels = train_labels.to(device), val_labels.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(train_latents), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size].to(device)
            logits = head(predictor_tokens(predictor, train_latents[idx], grid, backend))
            loss = F.cross_entropy(logits, train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    predictor.eval()
    with torch.no_grad():
        val_logits = torch.cat([head(predictor_tokens(predictor, val_latents[i:i + 64], grid, backend))
                                for i in range(0, len(val_latents), 64)])
        train_logits = torch.cat([head(predictor_tokens(predictor, train_latents[i:i + 64], grid, backend))
                                  for i in range(0, len(train_latents), 64)])
    return ProbeResult(topk_accuracy(val_logits, val_labels, 1), topk_accuracy(val_logits, val_labels, 5),
                       topk_accuracy(train_logits, train_labels, 1), num_classes, len(train_labels), len(val_labels))

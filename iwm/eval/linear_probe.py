"""Linear probe: frozen target encoder, average-pooled tokens, a linear classifier.

Features are extracted once (no augmentation), standardised with the training split's statistics, and
a linear layer is fit full-batch with AdamW + cross-entropy. A randomly initialised encoder of the same
shape, probed the same way, is reported as the floor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProbeResult:
    top1: float
    top5: float
    train_top1: float
    num_classes: int
    num_train: int
    num_val: int

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5, f"{prefix}train_top1": self.train_top1,
                f"{prefix}num_classes": self.num_classes}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return float(hits.float().mean()) if labels.numel() else float("nan")


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
                     epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> ProbeResult:
    """Full-batch logistic regression on features; returns top-1/top-5 on val."""
    if train_x.dim() != 2 or val_x.dim() != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"train_x, val_x: expected [n, d] features of equal width, got "
                         f"{tuple(train_x.shape)} and {tuple(val_x.shape)}")
    if train_x.shape[0] != train_y.shape[0] or val_x.shape[0] != val_y.shape[0]:
        raise ValueError("train_y, val_y: one label per feature row")
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    train_x, val_x = train_x.float(), val_x.float()
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        val_logits, train_logits = head(val_x), head(train_x)
    return ProbeResult(topk_accuracy(val_logits, val_y, 1), topk_accuracy(val_logits, val_y, 5),
                       topk_accuracy(train_logits, train_y, 1), num_classes, len(train_y), len(val_y))


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, normalize, *, batch_size: int = 64,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Average-pooled final tokens of `encoder` for uint8 images [n, 3, S, S] -> [n, D] (CPU)."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    feats = []
    for i in range(0, images.shape[0], batch_size):
        x = normalize(images[i:i + batch_size].to(device))
        feats.append(encoder(x).float().mean(dim=1).cpu())
    encoder.train(was_training)
    return torch.cat(feats) if feats else torch.empty(0)

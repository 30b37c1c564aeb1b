"""Real shapes for the benchmarks: ViT parameter lists and token counts from the paper's configs."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ViTConfig:
    name: str
    dim: int
    depth: int
    heads: int
    patch: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


VITS = {
    "vit_small": ViTConfig("vit_small", 384, 12, 6),
    "vit_base": ViTConfig("vit_base", 768, 12, 12),
    "vit_large": ViTConfig("vit_large", 1024, 24, 16),
    "vit_huge": ViTConfig("vit_huge", 1280, 32, 16, patch=14),
}


def vit_param_shapes(cfg: ViTConfig, in_chans: int = 3) -> list[tuple[int, ...]]:
    """Parameter shapes of a timm-style ViT without class token (I-JEPA's encoder), in timm's order."""
    d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    shapes: list[tuple[int, ...]] = [(d, in_chans, cfg.patch, cfg.patch), (d,)]
    for _ in range(cfg.depth):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (hidden, d), (hidden,), (d, hidden), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def vit_params(cfg: ViTConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, dtype=torch.float32, device=device, generator=gen).to(dtype) for s in vit_param_shapes(cfg)]

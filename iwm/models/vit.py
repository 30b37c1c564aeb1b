"""ViT encoder: patch embedding, fixed 2-D sin-cos positions, no class token, pre-norm blocks.

Parameter names are timm's (`patch_embed.proj`, `pos_embed`, `blocks.N.norm1`, `blocks.N.attn.qkv`,
`blocks.N.attn.proj`, `blocks.N.mlp.fc1`, `norm`, ...), which are also I-JEPA's, so weights move
between the three. Every block runs on packed token sets (`[T, D]` plus `cu_seqlens`): the ragged
context of each sample goes through the encoder without padding or truncation; full images are the
special case of equal lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

import iwm_kernels
from iwm_kernels._backend import applies_backend
from iwm_kernels import VarlenSelfAttention
from iwm_kernels.gemm import Linear
from iwm_kernels.rows import gather_rows, residual_linear

from .pos_embed import sincos_2d


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0


ENCODERS = {
    "vit_tiny": ViTSpec(192, 12, 3),
    "vit_small": ViTSpec(384, 12, 6),
    "vit_base": ViTSpec(768, 12, 12),
    "vit_large": ViTSpec(1024, 24, 16),
    "vit_huge": ViTSpec(1280, 32, 16, patch_size=14),
}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fc2(gelu(fc1(x))), plus `residual` (fused into fc2's matmul) if given."""
        h = self.act(self.fc1(x))
        return self.fc2(h) if residual is None else residual_linear(residual, h, self.fc2)


class Block(nn.Module):
    """Pre-norm transformer block over packed tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VarlenSelfAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                segment_ids: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                check_values: bool = True, host_lengths: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, D] packed tokens -> [T, D]; with `rows` (int64 row indices without repeats) only those
        rows' outputs, [len(rows), D]: every token is still attended to (keys and values), but the output
        projection, the MLP and their backward run on the rows that something reads (the predictor's
        last block: its target rows), for the same values and gradients."""
        a = self.attn.attend(self.norm1(x), cu_seqlens, max_seqlen, segment_ids=segment_ids, backend=backend,
                             check_values=check_values, host_lengths=host_lengths)
        if rows is not None:
            x, a = gather_rows(x, rows), gather_rows(a, rows)
        x = self.attn.project(a, residual=x)
        return self.mlp(self.norm2(x), residual=x)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn.forward_dense(self.norm1(x), residual=x)
        return self.mlp(self.norm2(x), residual=x)


def init_vit_weights(module: nn.Module) -> None:
    """I-JEPA's initialisation: truncated normal(0.02) linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rescale_blocks(blocks: nn.ModuleList) -> None:
    """I-JEPA's fix_init_weight: deeper residual branches start smaller."""
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous [B, N, D]: the conv's [B, D, N] transposed would make every residual add keep that
        # layout and every LayerNorm copy its input first (I-JEPA's code pays this).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size: {img_size} is not divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim: {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.depth = embed_dim, num_heads, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        # Fixed, not learned (I-JEPA); a Parameter with requires_grad=False so the key is timm's.
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, self.patch_embed.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_vit_weights)
        rescale_blocks(self.blocks)

    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images: expected a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images: expected {self.img_size}x{self.img_size} pixels, got "
                             f"{tuple(images.shape[-2:])}")

    @applies_backend
    def forward(self, images: torch.Tensor, masks=None, *, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, backend: Optional[str] = None,
                check_values: bool = True, seq_lengths: Optional[Sequence[int] | torch.Tensor] = None) -> torch.Tensor:
        """Encode images.

        - `forward(images)` -> `[B, N, D]` (every patch).
        - `forward(images, index, cu_seqlens=cu)` with packed int indices `[T]` and offsets `[B+1]`
          -> packed `[T, D]`: each sample's own (ragged) token subset, no padding.
        - `forward(images, masks)` with I-JEPA's list of `[B, K]` index tensors -> `[len(masks)*B, K, D]`,
          exactly I-JEPA's `VisionTransformer.forward(x, masks)`.

        max_seqlen: the longest packed sequence (a Python int >= it), or None to read it from
        cu_seqlens (a host sync). check_values=False: index and offsets are vouched for (a sampler's
        MaskBatch, `validated`): with max_seqlen given, nothing is read back from the device.
        seq_lengths: the packed sequences' lengths, if known: a CPU int tensor [B] (a MaskBatch's
        `host_sizes[:, 0]`; what the model passes, compiled or not: read when the attention runs, so
        torch.compile does not specialise on it) or Python ints. The CPU attention then runs per
        sequence instead of padded, and max_seqlen may be any bound (no read either way).
        """
        self._check_images(images)
        tokens = self.patch_embed(images)
        if masks is None:
            x = tokens + self.pos_embed.to(tokens.dtype)
            for block in self.blocks:
                x = block.forward_dense(x)
            return self.norm(x)
        if isinstance(masks, (list, tuple)):
            x = iwm_kernels.apply_masks(tokens + self.pos_embed.to(tokens.dtype), list(masks), backend=backend)
            for block in self.blocks:
                x = block.forward_dense(x)
            return self.norm(x)
        if cu_seqlens is None:
            raise ValueError("cu_seqlens: required with a packed index (or pass I-JEPA's list of [B, K] masks)")
        x = iwm_kernels.gather_tokens(tokens, masks, cu_seqlens, pos=self.pos_embed, backend=backend,
                                      check_values=check_values)
        host = seq_lengths
        if host is not None and not isinstance(host, torch.Tensor):  # Python ints: the same CPU tensor
            host = torch.tensor(list(host), dtype=torch.int64)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        for block in self.blocks:
            x = block(x, cu_seqlens, max_seqlen, backend=backend, check_values=check_values, host_lengths=host)
        return self.norm(x)


def build_encoder(name: str = "vit_base", img_size: int = 224, patch_size: Optional[int] = None,
                  **overrides) -> VisionTransformer:
    """A preset encoder (vit_tiny/small/base/large/huge) at any image size divisible by the patch."""
    if name not in ENCODERS:
        raise ValueError(f"name: unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    spec = ENCODERS[name]
    kwargs = dict(img_size=img_size, patch_size=patch_size or spec.patch_size, embed_dim=spec.embed_dim,
                  depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)

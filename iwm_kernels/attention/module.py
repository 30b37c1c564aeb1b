"""`VarlenSelfAttention`: timm/I-JEPA's multi-head self-attention (qkv projection -> attention -> output
projection) over packed variable-length sequences, plus the dense form for equal-length batches.

Parameter names match timm's `Attention` (`qkv`, `proj`), so checkpoints load both ways. Which
semantics the predictor gets is decided by the packing, not by this module: repeated-context packing
(no segment_ids) reproduces I-JEPA's dense computation on the same tokens; shared-context packing
passes segment_ids (a different predictor from its second layer on: the context never sees the mask
tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._availability import warn_once
from ..gemm import Linear
from ..rows import residual_linear


class VarlenSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide dim {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                segment_ids: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                check_values: bool = True, host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, D] packed tokens -> [T, D]. check_values, host_lengths: as for `varlen_attention`."""
        return self.project(self.attend(x, cu_seqlens, max_seqlen, segment_ids=segment_ids, backend=backend,
                                        check_values=check_values, host_lengths=host_lengths))

    def attend(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               segment_ids: Optional[torch.Tensor] = None, backend: Optional[str] = None,
               check_values: bool = True, host_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention before the output projection: x [T, D] packed tokens -> [T, D] (heads merged)."""
        from . import native, prepare, varlen_attention

        if x.dim() != 2:
            raise ValueError(f"x: expected packed [T, D] tokens, got shape {tuple(x.shape)} "
                             "(use forward_dense for [B, N, D])")
        T, D = x.shape
        # Views of one [T, 3, H, Dh] tensor: the kernels read strided rows, no copy.
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        if self.training and self.attn_drop > 0:
            # Attention-probability dropout is not fused: the padded SDPA path applies it.
            warn_once("varlen-attn-drop", "VarlenSelfAttention: attn_drop > 0 runs the padded SDPA path "
                                          "(the fused kernels have no attention dropout)")
            layout = prepare(cu_seqlens, segment_ids, T, max_seqlen, check_values=check_values,
                             host_lengths=host_lengths)
            out = native.varlen_attention(q, k, v, layout, self.scale, dropout_p=self.attn_drop)
        else:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, segment_ids=segment_ids, scale=self.scale,
                                   backend=backend, check_values=check_values, host_lengths=host_lengths)
        return out.reshape(T, D)

    def project(self, out: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output projection of `attend`'s [..., D] rows, added to `residual` if given (fused)."""
        if residual is None:
            return self.proj_drop(self.proj(out))
        if self.training and self.proj_drop.p > 0:
            return residual + self.proj_drop(self.proj(out))
        return residual_linear(residual, out, self.proj)

    def forward_dense(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, N, D] equal-length sequences -> [B, N, D] (plus `residual`, fused, if given), with the
        same weights, through F.scaled_dot_product_attention (the fastest dense kernel PyTorch has)."""
        if x.dim() != 3:
            raise ValueError(f"x: expected [B, N, D], got shape {tuple(x.shape)}")
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        return self.project(out.transpose(1, 2).reshape(B, N, D), residual)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attn_drop={self.attn_drop}"

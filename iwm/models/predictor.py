"""The predictor (IWM's world model): context latents + conditioned mask tokens -> target latents.

Parameter names follow I-JEPA's `VisionTransformerPredictor` (`predictor_embed`, `mask_token`,
`predictor_pos_embed`, `predictor_blocks`, `predictor_norm`, `predictor_proj`), so I-JEPA checkpoints
load directly. Conditioning on the action a(x→y), as in the IWM paper:

- `none`: plain I-JEPA: mask token + positional embedding.
- `feature`: concat(mask token + position, action) -> 3-layer MLP -> predictor width. The first layer
  splits into a per-position part, computed once for the N grid positions, plus a per-sample part;
  gathering the first with the second as `bias` is exactly `iwm_kernels.gather_tokens`, so the
  [T, width + 7] concatenation is never materialised.
- `sequence`: one extra token per action component, each from its own linear projection; they join the
  context (segment 0).

Two sequence layouts (`shared_context`):

- False (default; the paper's and I-JEPA's predictor): one sequence per (sample, target block),
  [context, block j] with the context repeated and full attention inside it. The context tokens attend
  to block j's mask tokens, so from the second layer on each block has its own version of the context.
  All of them run as one packed varlen attention call per layer (no padding, no loop over blocks).
- True (opt-in speed option, NOT the paper's model): one sequence per sample, context as segment 0 and
  each block its own segment that sees the context and itself (`iwm_kernels.varlen_attention`'s
  segments), so the context is computed once instead of once per block. The context never attends to
  mask tokens: at depth 1 the target outputs equal the repeated layout's, from depth 2 on they differ
  (the second layer's keys for the context are then computed from a context that saw no mask token).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

import iwm_kernels
from iwm_kernels._backend import applies_backend
from iwm_kernels import pack_predictor_sequences, unpack_targets
from iwm_kernels.gemm import Linear, linear

from .pos_embed import sincos_2d
from .vit import Block, init_vit_weights, rescale_blocks

ACTION_DIM = 7
CONDITIONING = ("none", "feature", "sequence")


def _host_lengths(host_sizes: torch.Tensor, shared: bool, extra: int) -> torch.Tensor:
    """The lengths of the sequences `pack_predictor_sequences` makes, as a CPU tensor, from a MaskBatch's
    `host_sizes` [B, 1 + M] (context, then the M blocks): shared, [B, 1 + M] segment lengths
    [context + extra | block 1 | ... | block M]; repeated, [B * M] lengths context + extra + block j.
    Tensor arithmetic on the CPU (no device sync), so torch.compile does not specialise on the sizes."""
    ctx, blocks = host_sizes[:, :1] + extra, host_sizes[:, 1:]
    if shared:
        return torch.cat([ctx, blocks], 1)
    return (ctx + blocks).reshape(-1)


class ActionMLP(nn.Module):
    """3-layer MLP over concat(token, action); fc1 is applied split (see module docstring)."""

    def __init__(self, dim: int, action_dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or dim
        self.dim, self.action_dim = dim, action_dim
        self.fc1 = Linear(dim + action_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, hidden)
        self.fc3 = Linear(hidden, dim)

    def position_part(self, tokens: torch.Tensor) -> torch.Tensor:
        """fc1's token half, no bias: [..., dim] -> [..., hidden]."""
        return linear(tokens, self.fc1.weight[:, :self.dim])

    def sample_part(self, action: torch.Tensor) -> torch.Tensor:
        """fc1's action half plus fc1's bias: [B, action_dim] -> [B, hidden]."""
        return linear(action, self.fc1.weight[:, self.dim:], self.fc1.bias)

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(hidden))))

    def forward(self, tokens: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Unsplit form (for reference and tests): tokens [..., dim], action broadcastable [..., 7]."""
        action = action.expand(*tokens.shape[:-1], self.action_dim)
        return self.finish(self.fc1(torch.cat([tokens, action], dim=-1)))


class VisionTransformerPredictor(nn.Module):
    def __init__(self, num_patches: int, grid: int, embed_dim: int = 768, predictor_embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 conditioning: str = "none", action_dim: int = ACTION_DIM, shared_context: bool = False):
        super().__init__()
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning: {conditioning!r} is not one of {', '.join(CONDITIONING)}")
        if predictor_embed_dim % num_heads:
            raise ValueError(f"predictor_embed_dim: {predictor_embed_dim} is not divisible by num_heads {num_heads}")
        self.num_patches, self.embed_dim, self.dim = num_patches, embed_dim, predictor_embed_dim
        self.conditioning, self.action_dim, self.shared_context = conditioning, action_dim, shared_context
        self.predictor_embed = Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(predictor_embed_dim, grid)[None], requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            [Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = Linear(predictor_embed_dim, embed_dim)
        if conditioning == "feature":
            self.action_mlp = ActionMLP(predictor_embed_dim, action_dim)
        elif conditioning == "sequence":
            # One token per action component, each from its own projection of that scalar.
            self.action_token_weight = nn.Parameter(torch.zeros(action_dim, predictor_embed_dim))
            self.action_token_bias = nn.Parameter(torch.zeros(action_dim, predictor_embed_dim))
        self.apply(init_vit_weights)
        rescale_blocks(self.predictor_blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if conditioning == "sequence":
            nn.init.trunc_normal_(self.action_token_weight, std=0.02)
            nn.init.trunc_normal_(self.action_token_bias, std=0.02)

    # -- pieces shared by the packed and the I-JEPA paths ------------------------------------------
    def _check_action(self, action: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        if self.conditioning == "none":
            return None
        if action is None:
            raise ValueError(f"action: required with conditioning={self.conditioning!r} (pass zeros for no change)")
        if action.dim() != 2 or action.shape != (batch, self.action_dim):
            raise ValueError(f"action: expected shape ({batch}, {self.action_dim}), got {tuple(action.shape)}")
        return action.to(self.mask_token.dtype)

    def action_tokens(self, action: torch.Tensor) -> torch.Tensor:
        """sequence conditioning: [B, 7] -> [B, 7, dim]."""
        return action[..., None] * self.action_token_weight + self.action_token_bias

    def mask_tokens(self, target_index: torch.Tensor, cu_per_sample: Optional[torch.Tensor],
                    action: Optional[torch.Tensor], backend: Optional[str], check_values: bool = True) -> torch.Tensor:
        """Conditioned mask tokens at the target positions: packed [T, dim] (or [B, K, dim] for a
        rectangular [B, K] index)."""
        batch = (cu_per_sample.numel() - 1) if cu_per_sample is not None else target_index.shape[0]
        if self.conditioning == "feature":
            per_position = self.action_mlp.position_part(self.mask_token[0] + self.predictor_pos_embed[0])
            hidden = iwm_kernels.gather_tokens(per_position[None], target_index, cu_per_sample,
                                               bias=self.action_mlp.sample_part(action), backend=backend,
                                               check_values=check_values)
            return self.action_mlp.finish(hidden)
        bias = self.mask_token[0].expand(batch, self.dim)
        return iwm_kernels.gather_tokens(self.predictor_pos_embed, target_index, cu_per_sample, bias=bias,
                                         backend=backend, check_values=check_values)

    # -- packed ragged path ---------------------------------------------------------------------------
    @applies_backend
    def forward(self, context: torch.Tensor, masks_x=None, masks=None, *, action: Optional[torch.Tensor] = None,
                shared_context: Optional[bool] = None, backend: Optional[str] = None) -> torch.Tensor:
        """Predict target latents.

        Packed (ours): `forward(context [Tc, E], mask_batch, action=a)` where `mask_batch` is an
        `iwm.masks.MaskBatch` (context_index/context_cu, target_index/target_cu, num_targets) ->
        `[Tt, E]` in the mask batch's packed target order. A `validated` MaskBatch (the sampler's) is
        used unchecked, with its Python lengths sizing the launches: nothing is read back from the device.

        I-JEPA's convention: `forward(z, masks_x, masks)` with lists of `[B, K]` index tensors ->
        `[len(masks) * B, K, E]`, equal to I-JEPA's VisionTransformerPredictor on the same weights.
        """
        if isinstance(masks_x, (list, tuple)):
            return self.forward_ijepa(context, masks_x, masks, action=action, backend=backend)
        mb = masks_x
        if mb is None or not hasattr(mb, "target_index"):
            raise ValueError("masks_x: expected a MaskBatch (packed) or I-JEPA's list of [B, K] context masks")
        if context.dim() != 2 or context.shape[-1] != self.embed_dim:
            raise ValueError(f"context: expected packed [T, {self.embed_dim}], got {tuple(context.shape)}")
        if context.shape[0] != mb.context_index.numel():
            raise ValueError(f"context: {context.shape[0]} tokens but the masks select {mb.context_index.numel()}")
        shared = self.shared_context if shared_context is None else shared_context
        batch, num_targets = mb.batch_size, mb.num_targets
        action = self._check_action(action, batch)
        checked = not getattr(mb, "validated", False)
        cu_targets = mb.target_cu_per_sample
        x = self.predictor_embed(context)
        x = x + iwm_kernels.gather_tokens(self.predictor_pos_embed, mb.context_index, mb.context_cu,
                                          backend=backend, check_values=checked).to(x.dtype)
        tokens = self.mask_tokens(mb.target_index, cu_targets, action, backend, checked).to(x.dtype)
        extra = extra_cu = None
        if self.conditioning == "sequence":
            extra = self.action_tokens(action).reshape(batch * self.action_dim, self.dim).to(x.dtype)
            extra_cu = torch.arange(batch + 1, device=x.device, dtype=torch.int32) * self.action_dim
        # Sequence conditioning adds action_dim tokens to every context: a known constant per sample.
        n_extra = self.action_dim if extra is not None else 0
        sizes = getattr(mb, "host_sizes", None) if not checked else None
        host = None
        if sizes is not None:
            # Lengths as a CPU tensor and the packed row count as the launch bound (no sequence is longer
            # than every row together): no per-step Python int, one torch.compile trace for every draw.
            host = _host_lengths(sizes, shared, n_extra)
            longest = x.shape[0] + batch * n_extra + tokens.shape[0]
        elif hasattr(mb, "predictor_max_seqlen") and (not checked or mb.context_sizes is not None):
            longest = mb.predictor_max_seqlen(shared, n_extra)
        else:
            longest = None
        packed = pack_predictor_sequences(x, mb.context_cu, tokens, mb.target_cu, num_targets,
                                          shared_context=shared, extra=extra, extra_cu=extra_cu,
                                          max_seqlen=longest, check_values=checked)
        h = packed.x
        last = len(self.predictor_blocks) - 1
        for i, block in enumerate(self.predictor_blocks):
            # Nothing reads the last block's context rows: it keeps only the target rows (packed target
            # order), so their projection and MLP are never computed.
            h = block(h, packed.cu_seqlens, packed.max_seqlen, segment_ids=packed.segment_ids, backend=backend,
                      check_values=checked, host_lengths=host, rows=packed.target_rows if i == last else None)
        if last < 0:
            h = unpack_targets(h, packed)
        return self.predictor_proj(self.predictor_norm(h))

    # -- I-JEPA's dense calling convention ---------------------------------------------------------------
    def forward_ijepa(self, z: torch.Tensor, masks_x: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *,
                      action: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
        """I-JEPA: every (context mask, target mask) pair is its own dense sequence
        [context tokens, mask tokens]; output `[len(masks) * B, K, E]`, mask-major."""
        if not masks:
            raise ValueError("masks: at least one target mask is required")
        n_ctx = len(masks_x)
        batch = z.shape[0] // n_ctx
        action = self._check_action(action, batch)
        x = self.predictor_embed(z)
        pos = self.predictor_pos_embed.expand(batch, -1, -1)
        x = x + iwm_kernels.apply_masks(pos, list(masks_x), backend=backend).to(x.dtype)
        sequences = []
        for m in masks:  # mask-major, each repeated over the context masks: I-JEPA's order
            tokens = self.mask_tokens(m, None, action, backend).to(x.dtype)  # [B, K, dim]
            if self.conditioning == "sequence":
                extra = self.action_tokens(action).to(x.dtype)
            for c in range(n_ctx):
                ctx = x[c * batch:(c + 1) * batch]
                parts = [ctx, extra, tokens] if self.conditioning == "sequence" else [ctx, tokens]
                sequences.append(torch.cat(parts, dim=1))
        h = torch.cat(sequences, dim=0)
        for block in self.predictor_blocks:
            h = block.forward_dense(h)
        h = h[:, h.shape[1] - masks[0].shape[1]:]
        return self.predictor_proj(self.predictor_norm(h))


def build_predictor(num_patches: int, grid: int, embed_dim: int, *, depth: int = 12, predictor_embed_dim: int = 384,
                    num_heads: int = 12, conditioning: str = "feature", shared_context: bool = False,
                    action_dim: int = ACTION_DIM) -> VisionTransformerPredictor:
    return VisionTransformerPredictor(num_patches, grid, embed_dim=embed_dim, predictor_embed_dim=predictor_embed_dim,
                                      depth=depth, num_heads=num_heads, conditioning=conditioning,
                                      action_dim=action_dim, shared_context=shared_context)

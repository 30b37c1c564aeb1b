"""Loading I-JEPA checkpoints (as its train.py saves them) into our modules."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

from iwm_kernels.names import strip_wrapper_prefixes

from ..checkpoint import load_weights_only
from .predictor import VisionTransformerPredictor
from .vit import VisionTransformer

# I-JEPA's presets fix the head count by width (it is not recoverable from the weights).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}


def _strip(state: dict) -> dict:
    return {strip_wrapper_prefixes(k): v for k, v in state.items()}


def _depth(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _encoder_from_state(state: dict, num_heads: Optional[int]) -> VisionTransformer:
    w = state["patch_embed.proj.weight"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    grid = int(math.isqrt(state["pos_embed"].shape[1]))
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    heads = num_heads or _HEADS_BY_WIDTH.get(dim)
    if heads is None:
        raise ValueError(f"num_heads: cannot infer the head count of a width-{dim} encoder; pass num_heads=")
    model = VisionTransformer(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim,
                              depth=_depth(state, "blocks"), num_heads=heads, mlp_ratio=mlp_hidden / dim,
                              qkv_bias="blocks.0.attn.qkv.bias" in state)
    model.load_state_dict(state, strict=True)
    return model


def load_ijepa_checkpoint(path_or_dict, *, num_heads: Optional[int] = None, map_location="cpu"
                          ) -> tuple[VisionTransformer, VisionTransformerPredictor, VisionTransformer]:
    """(encoder, predictor, target_encoder) from an I-JEPA checkpoint (a path, or the loaded dict with
    `encoder`, `predictor`, `target_encoder`, keys possibly prefixed with `module.`).

    A path is read weights-only (tensors and plain values): such files usually come from elsewhere, and
    one that would need unpickling objects (which can run code) raises CheckpointError instead."""
    ckpt = path_or_dict
    if isinstance(path_or_dict, (str, Path)):
        ckpt = load_weights_only(path_or_dict, map_location=map_location)
    if not isinstance(ckpt, dict):
        raise ValueError(f"path_or_dict: not an I-JEPA checkpoint (a {type(ckpt).__name__}, not a dict)")
    missing = [k for k in ("encoder", "predictor", "target_encoder") if k not in ckpt]
    if missing:
        raise ValueError(f"path_or_dict: not an I-JEPA checkpoint (missing {missing})")
    enc_state, tgt_state, pred_state = (_strip(ckpt[k]) for k in ("encoder", "target_encoder", "predictor"))
    encoder = _encoder_from_state(enc_state, num_heads)
    target = _encoder_from_state(tgt_state, num_heads)
    pdim = pred_state["predictor_embed.weight"].shape[0]
    grid = int(math.isqrt(pred_state["predictor_pos_embed"].shape[1]))
    predictor = VisionTransformerPredictor(
        num_patches=grid * grid, grid=grid, embed_dim=encoder.embed_dim, predictor_embed_dim=pdim,
        depth=_depth(pred_state, "predictor_blocks"), num_heads=encoder.num_heads,
        mlp_ratio=pred_state["predictor_blocks.0.mlp.fc1.weight"].shape[0] / pdim,
        qkv_bias="predictor_blocks.0.attn.qkv.bias" in pred_state, conditioning="none", shared_context=False)
    predictor.load_state_dict(pred_state, strict=True)
    return encoder, predictor, target

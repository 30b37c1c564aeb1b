"""Encoder-only `.safetensors` export that timm's VisionTransformer loads.

Our encoder's parameter names are timm's, so the export is the state dict itself (made contiguous, in
fp32 unless asked otherwise), plus metadata saying how to build the matching timm model:

    model = timm.create_model("vit_base_patch16_224", class_token=False, global_pool="avg", fc_norm=False,
                              num_classes=0, img_size=224, dynamic_img_size=False)
    model.load_state_dict(safetensors.torch.load_file("encoder.safetensors"))
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .models.vit import VisionTransformer


def timm_state_dict(encoder: VisionTransformer, dtype: Optional[torch.dtype] = torch.float32) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().to("cpu")
        state[name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
    return state


def timm_model_kwargs(encoder: VisionTransformer) -> dict:
    block = encoder.blocks[0]
    return {"img_size": encoder.img_size, "patch_size": encoder.patch_size, "embed_dim": encoder.embed_dim,
            "depth": encoder.depth, "num_heads": encoder.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim, "qkv_bias": block.attn.qkv.bias is not None,
            "class_token": False, "global_pool": "avg", "fc_norm": False, "num_classes": 0}


def export_encoder_safetensors(encoder: VisionTransformer, path: str | Path,
                               dtype: Optional[torch.dtype] = torch.float32) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "timm_kwargs": json.dumps(timm_model_kwargs(encoder)), "source": "iwm"}
    save_file(timm_state_dict(encoder, dtype), str(path), metadata=meta)
    return path

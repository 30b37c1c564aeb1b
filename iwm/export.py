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


def timm_state_dict(encoder: VisionTransformer, dtype: Optional[torch.dtype] = torch.float32,
                    state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """state_dict: the encoder's full weights when its own are sharded (FSDP2: gathered beforehand)."""
    state = {}
    for name, tensor in (state_dict if state_dict is not None else encoder.state_dict()).items():
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
                               dtype: Optional[torch.dtype] = torch.float32, *, state: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "timm_kwargs": json.dumps(timm_model_kwargs(encoder)), "source": "iwm"}
    save_file(timm_state_dict(encoder, dtype, state), str(path), metadata=meta)
    return path


def export_checkpoint_safetensors(checkpoint: str | Path, path: str | Path, *, part: str = "target_encoder",
                                  dtype: Optional[torch.dtype] = torch.float32) -> Path:
    """Export `part` (target_encoder or encoder) of a training checkpoint: latest.pt / step-*.pt or a
    sharded one (a step-*.dcp folder or its run folder), gathered in this one process."""
    from .models import IWM, ModelPreset
    from .sharded_checkpoint import load_any_checkpoint

    if part not in ("target_encoder", "encoder"):
        raise ValueError(f"part: {part!r} is not target_encoder or encoder")
    state = load_any_checkpoint(checkpoint)
    model = IWM.from_preset(ModelPreset(**state["preset"]))
    encoder = getattr(model, part)
    encoder.load_state_dict(state[part])
    return export_encoder_safetensors(encoder, path, dtype)


def main(argv=None) -> int:
    import argparse
    import sys

    from .checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="python -m iwm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="latest.pt, step-*.pt, a step-*.dcp folder or a run folder")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--part", default="target_encoder", choices=["target_encoder", "encoder"])
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint_safetensors(args.checkpoint, args.out, part=args.part))
    except (CheckpointError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Named model presets: the paper's configurations and a `tiny` one that trains on 2 CPU cores."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from .predictor import VisionTransformerPredictor, build_predictor
from .vit import ENCODERS, VisionTransformer, build_encoder


@dataclass(frozen=True)
class ModelPreset:
    encoder: str                 # a key of iwm.models.vit.ENCODERS
    img_size: int
    patch_size: int
    pred_depth: int
    pred_dim: int
    conditioning: str
    # False: the paper's predictor (context repeated per target block, full attention). True is an
    # opt-in speed layout that changes the model from depth 2 on (see iwm.models.predictor).
    shared_context: bool = False
    encoder_depth: Optional[int] = None   # override the encoder spec's depth (tiny)
    encoder_dim: Optional[int] = None
    description: str = ""


PRESETS = {
    "ijepa_vitb16": ModelPreset("vit_base", 224, 16, 12, 384, "none", shared_context=False,
                                description="I-JEPA baseline: no conditioning, 12x384 predictor"),
    "iwm_inv_vitb16": ModelPreset("vit_base", 224, 16, 12, 384, "feature", shared_context=False,
                                  description="IWM invariant: feature conditioning, 12x384 predictor"),
    "iwm_equi_vitb16": ModelPreset("vit_base", 224, 16, 18, 384, "feature", shared_context=False,
                                   description="IWM equivariant: feature conditioning, 18x384 predictor"),
    "iwm_equi_vitl16": ModelPreset("vit_large", 224, 16, 36, 512, "feature", shared_context=False,
                                   description="IWM equivariant ViT-L/16: feature conditioning, 36x512 predictor"),
    "tiny": ModelPreset("vit_tiny", 64, 8, 4, 96, "feature", shared_context=False, encoder_depth=6,
                        description="64 px, patch 8, 6x192 encoder, 4x96 predictor: trains on 2 CPU cores"),
}


def get_preset(name: str, **overrides) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    unknown = set(overrides) - set(asdict(preset))
    if unknown:
        raise ValueError(f"preset: unknown override(s) {sorted(unknown)}")
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def build_models(preset: ModelPreset) -> tuple[VisionTransformer, VisionTransformerPredictor]:
    spec = ENCODERS[preset.encoder]
    overrides = {}
    if preset.encoder_depth:
        overrides["depth"] = preset.encoder_depth
    if preset.encoder_dim:
        overrides["embed_dim"] = preset.encoder_dim
    encoder = build_encoder(preset.encoder, img_size=preset.img_size, patch_size=preset.patch_size, **overrides)
    predictor = build_predictor(encoder.num_patches, encoder.patch_embed.grid, encoder.embed_dim,
                                depth=preset.pred_depth, predictor_embed_dim=preset.pred_dim,
                                num_heads=spec.num_heads, conditioning=preset.conditioning,
                                shared_context=preset.shared_context)
    return encoder, predictor

"""Model layer: ViT encoder, conditioned predictor, the IWM module, presets, I-JEPA loading."""
from .ijepa import load_ijepa_checkpoint
from .iwm import IWM
from .predictor import ACTION_DIM, VisionTransformerPredictor, build_predictor
from .presets import PRESETS, ModelPreset, build_models, get_preset
from .vit import ENCODERS, VisionTransformer, build_encoder

__all__ = ["IWM", "VisionTransformer", "VisionTransformerPredictor", "build_encoder", "build_predictor",
           "load_ijepa_checkpoint", "PRESETS", "ModelPreset", "get_preset", "build_models", "ENCODERS", "ACTION_DIM"]

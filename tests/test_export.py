"""Encoder-only safetensors export: the keys and shapes a timm VisionTransformer(class_token=False,
global_pool="avg", fc_norm=False, num_classes=0) of the same shape has (checked against timm itself where
it is importable, otherwise against timm's naming written out here)."""
import json

import pytest
import torch

from iwm.export import export_encoder_safetensors, timm_model_kwargs
from iwm.models import build_encoder


def timm_expected_shapes(depth, dim, patch, n, in_chans=3, mlp_ratio=4.0):
    hidden = int(dim * mlp_ratio)
    shapes = {"pos_embed": (1, n, dim), "patch_embed.proj.weight": (dim, in_chans, patch, patch),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                       b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "mlp.fc1.weight": (hidden, dim),
                       b + "mlp.fc1.bias": (hidden,), b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
    return shapes


def test_export_names_and_shapes_match_timm(tmp_path, seed):
    from safetensors import safe_open
    from safetensors.torch import load_file

    enc = build_encoder("vit_small", img_size=64, patch_size=16, depth=3)
    path = export_encoder_safetensors(enc, tmp_path / "encoder.safetensors")
    state = load_file(str(path))
    expected = timm_expected_shapes(3, 384, 16, 16)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(state[k], v.float())
    with safe_open(str(path), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    assert kwargs == timm_model_kwargs(enc) and kwargs["class_token"] is False


def test_timm_loads_the_export(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    enc = build_encoder("vit_small", img_size=64, patch_size=16, depth=2).eval()
    path = export_encoder_safetensors(enc, tmp_path / "encoder.safetensors")
    kwargs = timm_model_kwargs(enc)
    model = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    model.load_state_dict(load_file(str(path)))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.forward_features(x), enc(x), atol=1e-5, rtol=1e-4)

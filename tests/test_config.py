"""Config: I-JEPA YAMLs load, overrides apply, bad keys/types/values are clear errors."""
import textwrap

import pytest

from iwm.config import ConfigError, load_config
from iwm.schedules import Schedules

IJEPA_YAML = textwrap.dedent("""
    data:
      batch_size: 128
      color_jitter_strength: 0.0
      crop_scale: [0.3, 1.0]
      crop_size: 224
      image_folder: imagenet_full_size/061417/
      num_workers: 10
      pin_mem: true
      root_path: /datasets/
      use_color_distortion: false
      use_gaussian_blur: false
      use_horizontal_flip: false
    logging:
      folder: /path_to_save/
      write_tag: jepa
    mask:
      allow_overlap: false
      aspect_ratio: [0.75, 1.5]
      enc_mask_scale: [0.85, 1.0]
      min_keep: 10
      num_enc_masks: 1
      num_pred_masks: 4
      patch_size: 14
      pred_mask_scale: [0.15, 0.2]
    meta:
      copy_data: false
      load_checkpoint: false
      model_name: vit_huge
      pred_depth: 12
      pred_emb_dim: 384
      read_checkpoint: null
      use_bfloat16: true
    optimization:
      ema: [0.996, 1.0]
      epochs: 300
      final_lr: 1.0e-06
      final_weight_decay: 0.4
      ipe_scale: 1.0
      lr: 0.001
      start_lr: 0.0002
      warmup: 40
      weight_decay: 0.04
""")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_ijepa_yaml_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, IJEPA_YAML + "\n"), ["data.dataset=imagefolder"])
    assert cfg.meta.model_name == "vit_huge" and cfg.mask.patch_size == 14 and cfg.data.crop_size == 224
    assert cfg.optimization.ema == (0.996, 1.0)
    assert cfg.meta.conditioning == "feature"  # the one IWM addition, defaulted


def test_overrides_and_types(tmp_path):
    cfg = load_config(None, ["optimization.lr=3e-4", "meta.conditioning=sequence", "mask.aspect_ratio=[0.5, 2]",
                             "data.pin_mem=false", "optimization.max_steps=10"])
    assert cfg.optimization.lr == 3e-4 and cfg.meta.conditioning == "sequence"
    assert cfg.mask.aspect_ratio == (0.5, 2) and cfg.data.pin_mem is False and cfg.optimization.max_steps == 10
    assert {"optimization.lr", "meta.conditioning"} <= cfg.explicit


@pytest.mark.parametrize("override, match", [
    ("data.bogus=1", "data.bogus: unknown key"),
    ("nosuch.key=1", "nosuch: unknown section"),
    ("data.batch_size=abc", "data.batch_size: expected an integer"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer"),
    ("data.crop_size=100", "data.crop_size: 100 is not divisible"),
    ("meta.conditioning=pixels", "meta.conditioning"),
    ("mask.pred_mask_scale=[0.3, 0.1]", "mask.pred_mask_scale"),
    ("augment.solarize_p=1.5", "augment.solarize_p"),
    ("optimization.lr=-1", "optimization.lr"),
    ("data.pin_mem=maybe", "data.pin_mem: expected true/false"),
    ("lr=1", "overrides look like"),
    ("eval.tasks=[mrr, dance]", "eval.tasks"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="data: expected a mapping"):
        load_config(write(tmp_path, "data: 3\n"))


def test_every_shipped_config_loads():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_schedules_shape():
    s = Schedules(total_steps=100, warmup_steps=10, start_lr=1e-4, lr=1e-3, final_lr=1e-6, weight_decay=0.04,
                  final_weight_decay=0.4, ema_start=0.996, ema_end=1.0)
    assert s.lr_at(0) == pytest.approx(1e-4) and s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(100) == pytest.approx(1e-6)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(10, 99))
    assert s.wd_at(0) == pytest.approx(0.04) and s.wd_at(100) == pytest.approx(0.4)
    assert s.momentum_at(0) == pytest.approx(0.996) and s.momentum_at(50) == pytest.approx(0.998)
    assert s.momentum_at(100) == pytest.approx(1.0) and s.momentum_at(1000) == pytest.approx(1.0)

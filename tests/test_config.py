"""Config: I-JEPA YAMLs load, overrides apply, bad keys/types/values are clear errors that name the
key, every path a run writes stays in its folder, and what the evaluation needs is checked before training."""
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iwm.config import ConfigError, check_data_paths, config_from_dict, load_config
from iwm.schedules import Schedules

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))

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
    cfg = load_config(write(tmp_path, IJEPA_YAML + "\n"), ["data.dataset=imagefolder", "data.val_folder=val"])
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


def test_configs_are_shipped():
    # the test below is parametrized over them: without this, an empty glob would pass it vacuously
    assert len(SHIPPED_CONFIGS) >= 5 and ROOT.joinpath("configs", "tiny.yaml") in SHIPPED_CONFIGS


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from iwm.builders import model_preset

    cfg = load_config(path)
    preset = model_preset(cfg)  # resolving the preset validates again, at the preset's resolution
    assert preset.img_size == cfg.data.crop_size and preset.patch_size == cfg.mask.patch_size
    # a saved config (a checkpoint's) loads back to the same settings
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_schedules_shape():
    s = Schedules(total_steps=100, warmup_steps=10, start_lr=1e-4, lr=1e-3, final_lr=1e-6, weight_decay=0.04,
                  final_weight_decay=0.4, ema_start=0.996, ema_end=1.0)
    assert s.lr_at(0) == pytest.approx(1e-4) and s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(100) == pytest.approx(1e-6)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(10, 99))
    assert s.wd_at(0) == pytest.approx(0.04) and s.wd_at(100) == pytest.approx(0.4)
    assert s.momentum_at(0) == pytest.approx(0.996) and s.momentum_at(50) == pytest.approx(0.998)
    assert s.momentum_at(100) == pytest.approx(1.0) and s.momentum_at(1000) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ every key, checked
BAD_OVERRIDES = [
    # (overrides, the key the error must name)
    (["optimization.lr=inf"], "optimization.lr"),
    (["optimization.lr=nan"], "optimization.lr"),
    (["optimization.warmup=-inf"], "optimization.warmup"),
    (["augment.hue=nan"], "augment.hue"),
    (["data.batch_size=inf"], "data.batch_size"),
    (["data.batch_size=nan"], "data.batch_size"),
    (["optimization.max_steps=1e400"], "optimization.max_steps"),
    (["mask.aspect_ratio=[0.5,"], "mask.aspect_ratio"),
    (["mask.aspect_ratio=[[0.5], [2]]"], "mask.aspect_ratio"),
    (["mask.aspect_ratio=[0.5, 1, 2]"], "mask.aspect_ratio"),
    (["mask.aspect_ratio=[true, true]"], "mask.aspect_ratio"),
    (["data.crop_scale={a: 1}"], "data.crop_scale"),
    (["optimization.ema=[0.9, nan]"], "optimization.ema"),
    (["eval.tasks=[[mrr]]"], "eval.tasks"),
    (["meta.preset=vit_gigantic"], "meta.preset"),
    (["meta.model_name=vit_gigantic"], "meta.model_name"),
    (["meta.pred_emb_dim=100"], "meta.pred_emb_dim"),                      # vit_base: 12 heads
    (["meta.preset=tiny", "meta.pred_emb_dim=100"], "meta.pred_emb_dim"),  # vit_tiny: 3 heads
    (["meta.preset=tiny", "meta.model_name=vit_base", "meta.pred_emb_dim=99"], "meta.pred_emb_dim"),
    (["optimization.weight_decay=-0.01"], "optimization.weight_decay"),
    (["optimization.final_weight_decay=-1"], "optimization.final_weight_decay"),
    (["optimization.start_lr=-1"], "optimization.start_lr"),
    (["optimization.final_lr=-1"], "optimization.final_lr"),
    (["mask.min_keep=-3"], "mask.min_keep"),
    (["mask.min_keep=0"], "mask.min_keep"),  # would allow an empty context
    (["augment.brightness=-0.1"], "augment.brightness"),
    (["augment.contrast=-0.1"], "augment.contrast"),
    (["augment.saturation=-0.1"], "augment.saturation"),
    (["data.color_jitter_strength=-0.5"], "data.color_jitter_strength"),
    (["mask.pred_mask_scale=[0, 0]"], "mask.pred_mask_scale"),
    (["mask.enc_mask_scale=[0, 1]"], "mask.enc_mask_scale"),
    (["data.crop_scale=[0, 0]"], "data.crop_scale"),
    (["optimization.grad_clip=-1"], "optimization.grad_clip"),
    (["optimization.ipe_scale=0"], "optimization.ipe_scale"),
    (["optimization.epochs=-1", "optimization.max_steps=10"], "optimization.epochs"),
    (["logging.checkpoint_every=-1"], "logging.checkpoint_every"),
    (["logging.keep_checkpoints=-1"], "logging.keep_checkpoints"),
    (["logging.folder="], "logging.folder"),
    (["logging.folder=runs/a\0b"], "logging.folder"),
    (["meta.seed=-1"], "meta.seed"),
    (["meta.seed=18446744073709551616"], "meta.seed"),
    (["eval.every=-5"], "eval.every"),
    (["eval.mrr_images=0"], "eval.mrr_images"),
    (["eval.probe_epochs=0"], "eval.probe_epochs"),
    (["eval.predictor_epochs=0"], "eval.predictor_epochs"),
]


@pytest.mark.parametrize("overrides, key", BAD_OVERRIDES, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_override_is_a_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert key in str(info.value)


def test_non_finite_numbers_in_a_file_are_refused(tmp_path):
    for text, key in [("optimization:\n  lr: .inf\n", "optimization.lr"),
                      ("optimization:\n  warmup: .nan\n", "optimization.warmup"),
                      ("data:\n  batch_size: .inf\n", "data.batch_size"),
                      ("mask:\n  aspect_ratio: [0.5, .inf]\n", "mask.aspect_ratio")]:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        assert key in str(info.value)


def test_good_numbers_still_parse():
    # YAML 1.1 reads `1e-3` as a string; a numeric pair is coerced element by element
    cfg = load_config(None, ["mask.aspect_ratio=[1e-3, 2]", "optimization.max_steps=1e3",
                             "meta.seed=9223372036854775807", "meta.preset=tiny", "meta.pred_emb_dim=99"])
    assert cfg.mask.aspect_ratio == (1e-3, 2.0) and cfg.optimization.max_steps == 1000
    assert cfg.meta.seed == 2**63 - 1  # an integer is not rounded through a float


def test_duplicate_yaml_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"optimization\.lr: given twice \(YAML lines 2 and 4\)"):
        load_config(write(tmp_path, "optimization:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n"))
    with pytest.raises(ConfigError, match=r"^optimization: given twice"):
        load_config(write(tmp_path, "optimization:\n  lr: 0.1\nmask:\n  min_keep: 3\noptimization:\n  epochs: 2\n"))
    # distinct keys with one value each still load (the check refuses only a repetition)
    cfg = load_config(write(tmp_path, "optimization:\n  lr: 0.1\n  epochs: 3\nmask:\n  min_keep: 3\n"))
    assert cfg.optimization.lr == 0.1 and cfg.optimization.epochs == 3 and cfg.mask.min_keep == 3


# ---------------------------------------------------------------------- paths stay inside logging.folder
@pytest.mark.parametrize("tag", ["../../x", "../x", "a/b", "/tmp/x", "a\\b", "..", ".hidden", "", "x" * 101,
                                 "a..b", "name\0"])
def test_write_tag_must_be_a_plain_file_stem(tag):
    with pytest.raises(ConfigError, match="logging.write_tag"):
        load_config(None, [f"logging.write_tag={tag}"])


def test_write_tag_plain_names_are_accepted():
    for tag in ("iwm", "jepa", "iwm_equi_vitl16", "run-2.v1"):
        assert load_config(None, [f"logging.write_tag={tag}"]).logging.write_tag == tag


def run_train(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                           "data.crop_size=32", "mask.patch_size=8", "mask.min_keep=2", "data.batch_size=4",
                           "data.builtin_samples=16", "data.num_workers=0", "logging.tensorboard=false",
                           "meta.use_bfloat16=false", "optimization.max_steps=1", "optimization.warmup=0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_iwm_train_leaves_a_file_outside_the_run_folder_untouched(tmp_path, seed):
    victim = tmp_path / "victim.csv"
    content = "".join(random.choice("abc,\n") for _ in range(200)).encode()
    victim.write_bytes(content)
    res = run_train(f"logging.folder={tmp_path / 'run'}", "logging.write_tag=../victim", "eval.tasks=[]")
    assert res.returncode != 0 and "logging.write_tag" in res.stderr, res.stderr[-2000:]
    assert victim.read_bytes() == content
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


# ------------------------------------------------------------- evaluation needs, checked before training
def write_image_folder(root: Path, seed: int, classes=("classA", "classB"), per_class=4) -> Path:
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_evaluation_needs_a_val_folder(tmp_path):
    base = ["data.dataset=imagefolder", f"data.image_folder={tmp_path}"]
    for tasks in ("[mrr]", "[linear]", "[predictor]", "[mrr, linear]"):
        with pytest.raises(ConfigError, match="data.val_folder"):
            load_config(None, [*base, f"eval.tasks={tasks}"])
    # nothing to evaluate, or never evaluating during training: loads (the eval CLI checks its own tasks)
    assert load_config(None, [*base, "eval.tasks=[]"]).eval.tasks == ()
    assert not load_config(None, [*base, "eval.at_end=false"]).eval.at_end
    assert load_config(None, [*base, "data.val_folder=val"]).data.val_folder == "val"


def test_missing_data_folders_are_config_errors(tmp_path, seed):
    train = write_image_folder(tmp_path / "train", seed)
    (tmp_path / "empty").mkdir()
    good = ["data.dataset=imagefolder", f"data.image_folder={train}", f"data.val_folder={train}"]
    check_data_paths(load_config(None, good))
    cases = [([f"data.image_folder={tmp_path / 'nope'}"], "data.image_folder: "),
             ([f"data.image_folder={tmp_path / 'empty'}"], "data.image_folder: "),
             ([f"data.val_folder={tmp_path / 'nope'}"], "data.val_folder: "),
             ([f"data.val_folder={tmp_path / 'empty'}"], "data.val_folder: "),
             ([f"data.root_path={tmp_path}", "data.image_folder=train", "data.val_folder=nope"], "data.val_folder: ")]
    for overrides, key in cases:
        cfg = load_config(None, good + overrides)
        with pytest.raises(ConfigError) as info:
            check_data_paths(cfg)
        assert str(info.value).startswith(key), str(info.value)
    # without evaluation the val split is not needed
    check_data_paths(load_config(None, good + [f"data.val_folder={tmp_path / 'nope'}", "eval.tasks=[]"]))
    check_data_paths(load_config(None, good + [f"data.root_path={tmp_path}", "data.image_folder=train"]))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_val_folder", "mrr_images_0", "missing_root"])
def test_iwm_train_refuses_what_the_config_shows_before_training(tmp_path, seed, case):
    """Each of these used to train, write a checkpoint and then crash (or crash with a traceback)."""
    train = write_image_folder(tmp_path / "train", seed)
    folder = tmp_path / "run"
    args = {"no_val_folder": ["data.dataset=imagefolder", f"data.image_folder={train}"],
            "mrr_images_0": ["eval.mrr_images=0"],
            "missing_root": ["data.dataset=imagefolder", f"data.image_folder={tmp_path / 'nope'}",
                             f"data.val_folder={train}"]}[case]
    key = {"no_val_folder": "data.val_folder", "mrr_images_0": "eval.mrr_images",
           "missing_root": "data.image_folder"}[case]
    res = run_train(f"logging.folder={folder}", "eval.tasks=[mrr]", "eval.mrr_candidates=4", *args)
    assert res.returncode != 0, res.stdout[-2000:]
    assert f"error: {key}" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (folder / "latest.pt").exists() and not list(folder.glob("*.pt"))


# ------------------------------------------------------------------------------ the eval CLI's overrides
@pytest.fixture
def fake_checkpoint(monkeypatch):
    """`python -m iwm.eval` on a checkpoint whose config is `saved` (no model: the run must stop first).
    The CLI's loader (latest.pt, step-*.pt or a sharded folder) is replaced; it must be asked for ckpt.pt."""
    import iwm.sharded_checkpoint

    saved = {}

    def load(path):
        assert str(path) == "ckpt.pt", path
        return dict(saved)

    monkeypatch.setattr(iwm.sharded_checkpoint, "load_any_checkpoint", load)
    return saved


@pytest.mark.parametrize("override, key", [("eval.mrr_images=0", "eval.mrr_images"),
                                           ("eval.mrr_candidates=1", "eval.mrr_candidates"),
                                           ("eval.probe_epochs=-1", "eval.probe_epochs"),
                                           ("optimization.lr=inf", "optimization.lr"),
                                           ("logging.write_tag=../x", "logging.write_tag"),
                                           ("eval.bogus=1", "eval.bogus")])
def test_eval_cli_validates_its_overrides(fake_checkpoint, capsys, override, key):
    from iwm.eval.__main__ import main

    fake_checkpoint["config"] = load_config(ROOT / "configs" / "tiny.yaml").to_dict()
    assert main(["--checkpoint", "ckpt.pt", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}"), err


def test_eval_cli_checks_its_tasks_against_the_data(fake_checkpoint, capsys, tmp_path, seed):
    from iwm.eval.__main__ import main

    train = write_image_folder(tmp_path / "train", seed)
    fake_checkpoint["config"] = load_config(None, ["data.dataset=imagefolder", f"data.image_folder={train}",
                                                   "eval.at_end=false"]).to_dict()
    assert main(["--checkpoint", "ckpt.pt", "--task", "linear"]) == 2
    assert capsys.readouterr().err.startswith("error: data.val_folder")
    assert main(["--checkpoint", "ckpt.pt", "--task", "mrr", f"data.val_folder={tmp_path / 'nope'}"]) == 2
    assert capsys.readouterr().err.startswith("error: data.val_folder")
    # an override repairs the saved config; the run then stops only at the (absent) model
    assert main(["--checkpoint", "ckpt.pt", "--task", "mrr", f"data.val_folder={train}"]) == 2
    assert "has no 'preset' entry" in capsys.readouterr().err

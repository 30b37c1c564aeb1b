"""Training configuration: I-JEPA's YAML sections (data, mask, meta, optimization, logging) plus ours.

An I-JEPA config file loads as is (its keys keep their meaning); IWM-specific settings have defaults
(`meta.conditioning`, `augment.*`, `eval.*`), so an I-JEPA YAML needs at most a conditioning line.
Every key is typed: an unknown key, a wrong type or an impossible value is a `ConfigError` that names
the key, raised before any work starts. Command-line overrides use dotted keys: `optimization.lr=1e-3`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key."""


@dataclass
class DataConfig:
    dataset: str = "builtin"              # builtin | imagefolder
    root_path: str = ""                   # imagefolder: root directory (I-JEPA: root_path + image_folder)
    image_folder: str = ""
    val_folder: str = ""                  # imagefolder probe: labelled val split (train split = image_folder)
    builtin_samples: int = 4096           # builtin: crops per epoch
    builtin_raw_size: int = 96            # builtin: side of the raw crop handed to the augmentation
    batch_size: int = 128                 # per process
    crop_size: int = 224
    crop_scale: tuple = (0.3, 1.0)
    num_workers: int = 2
    pin_mem: bool = True
    # I-JEPA keys, accepted for compatibility (IWM's augmentations are configured under `augment`).
    color_jitter_strength: float = 0.0
    use_color_distortion: bool = False
    use_gaussian_blur: bool = False
    use_horizontal_flip: bool = False
    copy_data: bool = False


@dataclass
class MaskConfig:
    patch_size: int = 16
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    enc_mask_scale: tuple = (0.85, 1.0)
    pred_mask_scale: tuple = (0.15, 0.2)
    aspect_ratio: tuple = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False
    context_mode: str = "complement"      # complement (IWM) | block (I-JEPA)
    ragged: bool = True                   # False: truncate to the batch minimum (I-JEPA parity)


@dataclass
class MetaConfig:
    model_name: str = "vit_base"
    preset: str = ""                      # a named preset (iwm.models.PRESETS) filling model fields
    pred_depth: int = 12
    pred_emb_dim: int = 384
    conditioning: str = "feature"         # none | feature | sequence
    shared_context: bool = True           # predictor: one sequence per sample (False: I-JEPA repetition)
    loss: str = "l2"                      # l2 | smooth_l1
    use_bfloat16: bool = True
    compile: bool = False
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    kernel_backend: str = ""              # "" = automatic; reference | triton | native
    load_checkpoint: bool = True          # resume from the run folder's latest checkpoint if present
    read_checkpoint: Optional[str] = None  # explicit checkpoint to resume from
    # I-JEPA keys, accepted for compatibility.
    copy_data: bool = False


@dataclass
class OptimizationConfig:
    epochs: int = 300
    max_steps: int = 0                    # > 0: stop after this many steps in total (resumable)
    ipe_scale: float = 1.0
    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup: float = 40                    # epochs
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple = (0.996, 1.0)
    grad_clip: float = 0.0                # 0: no clipping


@dataclass
class AugmentConfigSection:
    crop_ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.2
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.1
    solarize_threshold: float = 0.5
    backend: str = ""                     # photometric kernel backend ("" = automatic)


@dataclass
class LoggingConfig:
    folder: str = "runs/default"
    write_tag: str = "iwm"
    log_every: int = 10
    checkpoint_every: int = 0             # steps between periodic checkpoints (0: each epoch end only)
    keep_checkpoints: int = 3             # periodic checkpoints kept (latest is always kept)
    tensorboard: bool = True
    progress_bar: str = "auto"            # auto (on a TTY) | on | off


@dataclass
class EvalConfig:
    every: int = 0                        # steps between evaluations during training (0: end only)
    at_end: bool = True
    tasks: tuple = ("mrr", "linear")
    mrr_images: int = 32
    mrr_candidates: int = 256
    probe_epochs: int = 100
    predictor_epochs: int = 5             # predictor finetuning epochs over the probe set


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    augment: AugmentConfigSection = field(default_factory=AugmentConfigSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # "section.key" of every value set by a file or an override (so presets fill only the rest).
    explicit: set = field(default_factory=set, repr=False, compare=False)

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return v
        return {s.name: {f.name: plain(getattr(getattr(self, s.name), f.name))
                         for f in dataclasses.fields(getattr(self, s.name))}
                for s in dataclasses.fields(self) if s.name != "explicit"}


_CHOICES = {
    ("data", "dataset"): ("builtin", "imagefolder"),
    ("mask", "context_mode"): ("complement", "block"),
    ("meta", "conditioning"): ("none", "feature", "sequence"),
    ("meta", "loss"): ("l2", "smooth_l1"),
    ("meta", "device"): ("auto", "cpu", "cuda"),
    ("meta", "kernel_backend"): ("", "reference", "triton", "native"),
    ("augment", "backend"): ("", "reference", "triton", "native"),
    ("logging", "progress_bar"): ("auto", "on", "off"),
}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is Any:
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "explicit"}
    if section not in sections:
        raise ConfigError(f"{section}: unknown section (expected one of {', '.join(sections)})")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(type(obj))
    setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))
    cfg.explicit.add(f"{section}.{key}")


def _check_range(key: str, value: tuple, lo: float, hi: float, length: int = 2) -> None:
    if len(value) != length or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"{key}: expected {length} numbers, got {list(value)}")
    if length == 2 and not (lo <= value[0] <= value[1] <= hi):
        raise ConfigError(f"{key}: expected {lo} <= low <= high <= {hi}, got {list(value)}")


def validate(cfg: Config) -> Config:
    """Impossible values are errors here, before any work starts."""
    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    d, m, o, a, lg = cfg.data, cfg.mask, cfg.optimization, cfg.augment, cfg.logging
    if m.patch_size <= 0:
        raise ConfigError(f"mask.patch_size: must be positive, got {m.patch_size}")
    if d.crop_size <= 0 or d.crop_size % m.patch_size:
        raise ConfigError(f"data.crop_size: {d.crop_size} is not divisible by mask.patch_size {m.patch_size}")
    if d.batch_size <= 0:
        raise ConfigError(f"data.batch_size: must be positive, got {d.batch_size}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if d.dataset == "imagefolder" and not (d.root_path or d.image_folder):
        raise ConfigError("data.image_folder: required when data.dataset is imagefolder")
    if d.builtin_samples <= 0 or d.builtin_raw_size < 8:
        raise ConfigError("data.builtin_samples / data.builtin_raw_size: must be positive (raw size >= 8)")
    _check_range("data.crop_scale", d.crop_scale, 0.0, 1.0)
    _check_range("mask.enc_mask_scale", m.enc_mask_scale, 0.0, 1.0)
    _check_range("mask.pred_mask_scale", m.pred_mask_scale, 0.0, 1.0)
    _check_range("mask.aspect_ratio", m.aspect_ratio, 1e-3, 1e3)
    if m.num_pred_masks < 1:
        raise ConfigError(f"mask.num_pred_masks: must be >= 1, got {m.num_pred_masks}")
    if m.num_enc_masks != 1:
        raise ConfigError(f"mask.num_enc_masks: only 1 context mask is supported, got {m.num_enc_masks}")
    grid = (d.crop_size // m.patch_size) ** 2
    if m.min_keep >= grid:
        raise ConfigError(f"mask.min_keep: {m.min_keep} leaves no room on a {grid}-patch grid")
    if cfg.meta.pred_depth < 1 or cfg.meta.pred_emb_dim < 1:
        raise ConfigError("meta.pred_depth / meta.pred_emb_dim: must be positive")
    if o.epochs < 1 and o.max_steps < 1:
        raise ConfigError("optimization.epochs: must be >= 1 (or set optimization.max_steps)")
    if o.lr <= 0 or o.start_lr < 0 or o.final_lr < 0:
        raise ConfigError(f"optimization.lr: learning rates must be positive, got {o.lr}")
    if o.warmup < 0 or o.max_steps < 0:
        raise ConfigError("optimization.warmup / optimization.max_steps: must be >= 0")
    _check_range("optimization.ema", o.ema, 0.0, 1.0)
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold"):
        v = getattr(a, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"augment.{key}: must be within [0, 1], got {v}")
    _check_range("augment.blur_sigma", a.blur_sigma, 0.0, 100.0)
    _check_range("augment.crop_ratio", a.crop_ratio, 1e-3, 1e3)
    if a.hue > 0.5 or a.hue < 0:
        raise ConfigError(f"augment.hue: must be within [0, 0.5], got {a.hue}")
    if lg.log_every < 1:
        raise ConfigError(f"logging.log_every: must be >= 1, got {lg.log_every}")
    if cfg.eval.mrr_candidates < 2:
        raise ConfigError(f"eval.mrr_candidates: must be >= 2, got {cfg.eval.mrr_candidates}")
    unknown_tasks = set(cfg.eval.tasks) - {"mrr", "linear", "predictor"}
    if unknown_tasks:
        raise ConfigError(f"eval.tasks: unknown task(s) {sorted(unknown_tasks)}; choose from mrr, linear, predictor")
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"{text}: overrides look like section.key=value")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"{dotted}: overrides look like section.key=value")
    section, key = dotted.split(".")
    # The raw text is coerced by the key's declared type (so `progress_bar=off` stays a string).
    return section.strip(), key.strip(), raw.strip()


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {path} must map section names to settings")
        for section, values in raw.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of settings, got {values!r}")
            for key, value in values.items():
                _apply(cfg, section, key, value)
    for text in overrides or []:
        _apply(cfg, *parse_override(text))
    return validate(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(raw: dict) -> Config:
    cfg = Config()
    for section, values in raw.items():
        for key, value in (values or {}).items():
            _apply(cfg, section, key, value)
    return validate(cfg)

"""Training configuration: I-JEPA's YAML sections (data, mask, meta, optimization, logging) plus ours.

An I-JEPA config file loads as is (its keys keep their meaning); IWM-specific settings have defaults
(`meta.conditioning`, `augment.*`, `eval.*`), so an I-JEPA YAML needs at most a conditioning line.
Every key is typed: an unknown key, a wrong type or an impossible value is a `ConfigError` that names
the key, raised before any work starts. Command-line overrides use dotted keys: `optimization.lr=1e-3`.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .augment_settings import AugmentSettings
from .eval import TASKS as EVAL_TASKS  # the eval package owns the list (importing it is light)


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only, no object construction) that refuses a key given twice in one
    mapping: PyYAML keeps the last one silently, so a doubled `lr:` would override without a word."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", set())
        return self.construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, path: str, visited: set) -> None:
    if id(node) in visited:  # an alias: already checked (and walking it again could blow up)
        return
    visited.add(id(node))
    children = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` is meant to be overridden
                continue
            if isinstance(key_node, yaml.ScalarNode):
                dotted = f"{path}.{key_node.value}" if path else key_node.value
                line = key_node.start_mark.line + 1
                if key_node.value in first_line:
                    raise ConfigError(f"{dotted}: given twice (YAML lines {first_line[key_node.value]} and "
                                      f"{line}); a YAML mapping keeps only the last, so one would be lost")
                first_line[key_node.value] = line
                children.append((dotted, value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(f"{path}[{i}]", n) for i, n in enumerate(node.value)]
    for child_path, child in children:
        _refuse_duplicate_keys(child, child_path, visited)


@dataclass
class DataConfig:
    dataset: str = "builtin"              # builtin | imagefolder | webdataset
    root_path: str = ""                   # imagefolder: root directory (I-JEPA: root_path + image_folder)
    image_folder: str = ""
    val_folder: str = ""                  # imagefolder probe: labelled val split (train split = image_folder)
    builtin_samples: int = 4096           # builtin: crops per epoch
    batch_size: int = 128                 # per process
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    num_workers: int = 2
    pin_mem: bool = True
    # imagefolder: how a worker turns a file into its crop (iwm.image_decode): draft = JPEG decoded at the
    # reduced DCT scale the crop allows (fast; equal to pil up to resampling), pil = full decode (the
    # reference), gpu = workers read bytes, nvJPEG decodes on the device (needs CUDA and torchvision),
    # fast = only the crop's region decoded (system libjpeg-turbo) and resized by torch's uint8 kernel.
    decode: str = "draft"
    # webdataset: the tar shards (iwm.shards), a pattern such as "/data/train-{000000..000099}.tar" (also
    # {a,b} lists and * globs) or a list of patterns; indexed once at start, read by offset.
    shards: Any = ""
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
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
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
    shared_context: bool = False          # False: the paper's predictor; True: faster, another model from depth 2
    loss: str = "l2"                      # l2 | smooth_l1
    use_bfloat16: bool = True
    compile: bool = False
    seed: int = 0
    device: str = "auto"                  # auto | cpu | cuda
    kernel_backend: str = ""              # "" = automatic; reference | triton | native
    load_checkpoint: bool = True          # resume from the run folder's latest checkpoint if present
    read_checkpoint: Optional[str] = None  # explicit checkpoint to resume from
    resume_with_changes: bool = False     # resume even if settings that change the result differ
    # DDP: the longest a rank waits for the others in a collective before failing with an error (a peer
    # that died, hung or was stopped). Must exceed the longest pause of one rank: a mid-run evaluation
    # (eval.every) runs on rank 0 alone while the others wait.
    dist_timeout_s: float = 600.0
    # More than one process: ddp (replicas) | fsdp2 (parameters, gradients, AdamW state sharded; iwm.parallel).
    parallel: str = "ddp"
    # Recompute encoder/predictor block activations in the backward: none | blocks | every_k (blocks
    # 0, k, 2k, ... with k = activation_checkpointing_every). Same gradients, less activation memory.
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 2
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
    ema: tuple[float, float] = (0.996, 1.0)
    grad_clip: float = 0.0                # 0: no clipping


@dataclass
class AugmentConfigSection(AugmentSettings):
    """iwm.augment_settings.AugmentSettings (the augmentation's settings and bounds, defined once) plus
    the photometric kernel's backend."""
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
    profile_steps: str = ""               # "A:B": steps A..B-1 under torch.profiler -> trace.json ("" = off)


@dataclass
class EvalConfig:
    every: int = 0                        # steps between evaluations during training (0: end only)
    at_end: bool = True
    tasks: tuple[str, ...] = ("mrr", "linear")
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


def _owned_choices() -> dict:
    """The choice lists other modules own, imported when a config is validated (not when iwm.config is
    imported: those modules import torch, and loader workers import iwm.config)."""
    from iwm_kernels import BACKENDS

    from .image_decode import DECODE_MODES
    from .masks import CONTEXT_MODES
    from .models.iwm import LOSSES
    from .models.predictor import CONDITIONING
    from .parallel import CHECKPOINT_MODES, PARALLEL_MODES

    return {("data", "decode"): DECODE_MODES, ("mask", "context_mode"): CONTEXT_MODES,
            ("meta", "conditioning"): CONDITIONING, ("meta", "loss"): LOSSES,
            ("meta", "kernel_backend"): ("",) + BACKENDS, ("meta", "parallel"): PARALLEL_MODES,
            ("meta", "activation_checkpointing"): CHECKPOINT_MODES, ("augment", "backend"): ("",) + BACKENDS}


# The lists config.py owns.
_CHOICES = {
    ("data", "dataset"): ("builtin", "imagefolder", "webdataset"),
    ("meta", "device"): ("auto", "cpu", "cuda"),
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
        return _to_int(value, key)
    if typ is float:
        return _to_float(value, key)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is tuple or origin is tuple:
        if isinstance(value, str):
            text = value if value.strip().startswith("[") else f"[{value}]"
            try:
                value = yaml.load(text, Loader=StrictLoader)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: {value!r} is not a list ({exc.problem or exc})") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        # An untyped list: scalars only (a nested list or mapping is a mistake, and unhashable).
        for i, v in enumerate(value):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}[{i}]: must be a finite number, got {v!r}")
            if v is not None and not isinstance(v, (str, int, float)):
                raise ConfigError(f"{key}[{i}]: expected a number or a string, got {v!r}")
        return tuple(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass  # "1e3" is a float spelling of an integer: try it as one
    if not isinstance(value, (float, str)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        f = float(value)
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return int(f)


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        f = float(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    # No setting has a meaning for inf or nan; they would only surface later as a NaN loss or a hang.
    if not math.isfinite(f):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return f


def _apply(cfg: Config, section: str, key: str, value: Any, record: bool = True) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config) if f.name != "explicit"}
    if section not in sections:
        raise ConfigError(f"{section}: unknown section (expected one of {', '.join(sections)})")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(type(obj))
    setattr(obj, key, _coerce(value, hints[key], f"{section}.{key}"))
    if record:
        cfg.explicit.add(f"{section}.{key}")


def _check_range(key: str, value: tuple, lo: float, hi: float, length: int = 2, low_open: bool = False) -> None:
    """low_open: the low end must exceed `lo` (a zero scale is an empty crop or mask block)."""
    if len(value) != length or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key}: expected {length} numbers, got {list(value)}")
    if not all(math.isfinite(v) for v in value):
        raise ConfigError(f"{key}: expected finite numbers, got {list(value)}")
    if length == 2 and not (lo <= value[0] <= value[1] <= hi) or (low_open and value[0] <= lo):
        relation = "<" if low_open else "<="
        raise ConfigError(f"{key}: expected {lo} {relation} low <= high <= {hi}, got {list(value)}")


# A file-name stem: no separator, no "..", not hidden; what `logging.write_tag` names (`<tag>.csv`).
_FILE_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_PATH_KEYS = (("data", "root_path"), ("data", "image_folder"), ("data", "val_folder"), ("logging", "folder"),
              ("meta", "read_checkpoint"))


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value}")


def model_choice(cfg: Config) -> tuple[str, int]:
    """(encoder name, predictor width) the run builds: meta.preset's, except where the config sets
    meta.model_name / meta.pred_emb_dim (the rule `iwm.train.model_preset` applies)."""
    from .models.presets import PRESETS

    m = cfg.meta
    if not m.preset:
        return m.model_name, m.pred_emb_dim
    base = PRESETS[m.preset]
    encoder = m.model_name if "meta.model_name" in cfg.explicit else base.encoder
    width = m.pred_emb_dim if "meta.pred_emb_dim" in cfg.explicit else base.pred_dim
    return encoder, width


def _check_model(cfg: Config) -> None:
    from .models.presets import PRESETS
    from .models.vit import ENCODERS

    m = cfg.meta
    if m.preset and m.preset not in PRESETS:
        raise ConfigError(f"meta.preset: unknown preset {m.preset!r}; choose one of {', '.join(PRESETS)}")
    if m.model_name not in ENCODERS:
        raise ConfigError(f"meta.model_name: unknown encoder {m.model_name!r}; choose one of {', '.join(ENCODERS)}")
    _at_least("meta.pred_depth", m.pred_depth, 1)
    _at_least("meta.pred_emb_dim", m.pred_emb_dim, 1)
    encoder, width = model_choice(cfg)
    if encoder not in ENCODERS:
        raise ConfigError(f"meta.model_name: unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    heads = ENCODERS[encoder].num_heads  # the predictor uses its encoder's head count
    if width % heads:
        raise ConfigError(f"meta.pred_emb_dim: the predictor width {width} is not divisible by its {heads} "
                          f"attention heads (the head count of encoder {encoder})")
    if not 0 <= m.seed < 2**63:
        raise ConfigError(f"meta.seed: must be within [0, 2**63), got {m.seed}")
    if not m.dist_timeout_s > 0:
        raise ConfigError(f"meta.dist_timeout_s: must be a positive number of seconds, got {m.dist_timeout_s}")
    _at_least("meta.activation_checkpointing_every", m.activation_checkpointing_every, 1)


def _check_data_and_masks(cfg: Config) -> None:
    d, m = cfg.data, cfg.mask
    _at_least("mask.patch_size", m.patch_size, 1)
    _at_least("data.crop_size", d.crop_size, 1)
    if d.crop_size % m.patch_size:
        raise ConfigError(f"data.crop_size: {d.crop_size} is not divisible by mask.patch_size {m.patch_size}")
    _at_least("data.batch_size", d.batch_size, 1)
    _at_least("data.num_workers", d.num_workers, 0)
    if d.dataset == "imagefolder" and not (d.root_path or d.image_folder):
        raise ConfigError("data.image_folder: required when data.dataset is imagefolder")
    if d.dataset == "webdataset":
        patterns = [d.shards] if isinstance(d.shards, str) else d.shards
        if not isinstance(patterns, (list, tuple)) or not patterns or not all(
                isinstance(p, str) and p.strip() for p in patterns):
            raise ConfigError(f"data.shards: required when data.dataset is webdataset (a pattern such as "
                              f"/data/train-{{000000..000099}}.tar, or a list of them), got {d.shards!r}")
    _at_least("data.builtin_samples", d.builtin_samples, 1)
    _at_least("data.color_jitter_strength", d.color_jitter_strength, 0.0)
    _check_range("data.crop_scale", d.crop_scale, 0.0, 1.0, low_open=True)
    _check_range("mask.enc_mask_scale", m.enc_mask_scale, 0.0, 1.0, low_open=True)
    _check_range("mask.pred_mask_scale", m.pred_mask_scale, 0.0, 1.0, low_open=True)
    _check_range("mask.aspect_ratio", m.aspect_ratio, 1e-3, 1e3)
    _at_least("mask.num_pred_masks", m.num_pred_masks, 1)
    if m.num_enc_masks != 1:
        raise ConfigError(f"mask.num_enc_masks: only 1 context mask is supported, got {m.num_enc_masks}")
    grid = (d.crop_size // m.patch_size) ** 2
    # min_keep = 0 would let a sample's context be empty: attention over no tokens has no defined output.
    _at_least("mask.min_keep", m.min_keep, 1)
    if m.min_keep >= grid:
        raise ConfigError(f"mask.min_keep: {m.min_keep} leaves no room on a {grid}-patch grid")


def _check_optimization(cfg: Config) -> None:
    o = cfg.optimization
    _at_least("optimization.epochs", o.epochs, 0)
    _at_least("optimization.max_steps", o.max_steps, 0)
    if o.epochs < 1 and o.max_steps < 1:
        raise ConfigError("optimization.epochs: must be >= 1 (or set optimization.max_steps)")
    if o.lr <= 0:
        raise ConfigError(f"optimization.lr: must be positive, got {o.lr}")
    for key in ("start_lr", "final_lr", "weight_decay", "final_weight_decay", "warmup", "grad_clip"):
        _at_least(f"optimization.{key}", getattr(o, key), 0.0)
    if o.ipe_scale <= 0:
        raise ConfigError(f"optimization.ipe_scale: must be positive, got {o.ipe_scale}")
    _check_range("optimization.ema", o.ema, 0.0, 1.0)


def _check_augment(cfg: Config) -> None:
    try:  # the bounds of AugmentSettings, the one definition; its message starts with the field's name
        cfg.augment.check()
    except ValueError as exc:
        raise ConfigError(f"augment.{exc}") from None


def _check_logging(cfg: Config) -> None:
    lg = cfg.logging
    for section, key in _PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value and "\0" in value:
            raise ConfigError(f"{section}.{key}: a path cannot contain a NUL character")
    if not lg.folder.strip():
        raise ConfigError("logging.folder: must name the run folder")
    # Every file a run writes is named inside logging.folder; the tag is the only name taken from the
    # config, so it must stay a bare name (a `../x` tag would truncate a file outside the run folder).
    if not _FILE_STEM.fullmatch(lg.write_tag) or ".." in lg.write_tag:
        raise ConfigError(f"logging.write_tag: must be a plain file-name stem (letters, digits, '_', '-', '.'; "
                          f"no path separator, no '..', at most 100 characters), got {lg.write_tag!r}")
    _at_least("logging.log_every", lg.log_every, 1)
    profile_window(lg.profile_steps)  # raises ConfigError naming logging.profile_steps
    _at_least("logging.checkpoint_every", lg.checkpoint_every, 0)
    _at_least("logging.keep_checkpoints", lg.keep_checkpoints, 0)


def profile_window(text: str) -> Optional[tuple[int, int]]:
    """logging.profile_steps "A:B" as (A, B), the steps A <= step < B (0-based, as metrics.jsonl counts
    them); "" is None (no profiling)."""
    text = str(text).strip()
    if not text:
        return None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"logging.profile_steps: expected A:B (two step numbers, e.g. 10:12), got {text!r}") from None
    if lo < 0 or hi <= lo:
        raise ConfigError(f"logging.profile_steps: need 0 <= A < B, got {text!r}")
    return lo, hi


def scheduled_eval_tasks(cfg: Config) -> tuple:
    """The evaluations a training run will do (none when it never evaluates)."""
    e = cfg.eval
    return tuple(e.tasks) if (e.at_end or e.every > 0) else ()


def check_eval_tasks(cfg: Config, tasks) -> None:
    """The evaluations `tasks` can run on this data config; else a ConfigError (before training, not after)."""
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; choose from {', '.join(EVAL_TASKS)}")
    d = cfg.data
    # Every task reads the labelled val split (MRR's images, the probes' held-out set); the builtin
    # photographs have one, an ImageFolder only through data.val_folder.
    if tasks and d.dataset == "webdataset" and not (d.image_folder and d.val_folder):
        raise ConfigError(f"data.val_folder: evaluation {', '.join(tasks)} of a webdataset run reads labelled "
                          f"ImageFolder splits (set data.image_folder and data.val_folder, or eval.tasks=[])")
    if tasks and d.dataset == "imagefolder" and not d.val_folder:
        raise ConfigError(f"data.val_folder: evaluation {', '.join(tasks)} on an ImageFolder dataset needs a "
                          f"labelled val split (set data.val_folder, or eval.tasks=[] to skip evaluation)")


def _check_eval(cfg: Config) -> None:
    e = cfg.eval
    _at_least("eval.every", e.every, 0)
    _at_least("eval.mrr_images", e.mrr_images, 1)
    _at_least("eval.mrr_candidates", e.mrr_candidates, 2)
    _at_least("eval.probe_epochs", e.probe_epochs, 1)
    _at_least("eval.predictor_epochs", e.predictor_epochs, 1)
    unknown = [t for t in e.tasks if t not in EVAL_TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; choose from {', '.join(EVAL_TASKS)}")
    # Checked when training will evaluate; `python -m iwm.eval` checks the tasks it is asked for.
    check_eval_tasks(cfg, scheduled_eval_tasks(cfg))


def validate(cfg: Config) -> Config:
    """Impossible values are errors here, before any work starts. (Whether the data folders exist is
    `check_data_paths`'s question: a config stays loadable on a machine without the data.)"""
    for (section, key), choices in {**_CHOICES, **_owned_choices()}.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    _check_data_and_masks(cfg)
    _check_model(cfg)
    _check_optimization(cfg)
    _check_augment(cfg)
    _check_logging(cfg)
    _check_eval(cfg)
    return cfg


def data_folder(cfg: Config, key: str) -> Path:
    """data.image_folder / data.val_folder as the data loaders read them: under data.root_path if set."""
    d = cfg.data
    sub = getattr(d, key)
    return Path(d.root_path) / sub if d.root_path else Path(sub)


def check_data_paths(cfg: Config, eval_tasks=None) -> None:
    """The ImageFolder directories the run reads exist and hold class folders: a ConfigError before
    any work, not a traceback after the model is built (or, for the val split, after training).
    eval_tasks: the evaluations to be run (default: those training will run)."""
    if cfg.data.dataset == "webdataset":  # the shards exist (their contents are indexed at start)
        from .shards import shard_paths

        try:
            shard_paths(cfg.data.shards)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(str(exc)) from None
    elif cfg.data.dataset != "imagefolder":
        return
    tasks = scheduled_eval_tasks(cfg) if eval_tasks is None else tuple(eval_tasks)
    check_eval_tasks(cfg, tasks)
    # webdataset: the evaluations read labelled image folders (data.image_folder, data.val_folder).
    train_folder = cfg.data.dataset == "imagefolder" or bool(tasks)
    for key in (("image_folder",) if train_folder else ()) + (("val_folder",) if tasks else ()):
        folder = data_folder(cfg, key)
        where = f"{folder} (data.root_path + data.{key})" if cfg.data.root_path else str(folder)
        if not folder.is_dir():
            raise ConfigError(f"data.{key}: {where} is not a directory")
        if not any(p.is_dir() for p in folder.iterdir()):
            raise ConfigError(f"data.{key}: {where} has no class sub-directories (expected <folder>/<class>/<image>)")


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
            raw = yaml.load(path.read_text(), Loader=StrictLoader) or {}
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


def config_from_dict(raw: dict, overrides: Optional[list[str]] = None) -> Config:
    """A config saved by `Config.to_dict` (e.g. a checkpoint's), then `section.key=value` overrides;
    validated once, after the overrides (so an override can repair a saved value).

    A saved config is a resolved one: which of its values were set by hand is not recorded, so they
    do not count as explicit (the model it trained is the checkpoint's preset, not re-derived)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of settings, got {values!r}")
        for key, value in values.items():
            _apply(cfg, section, key, value, record=False)
    for text in overrides or []:
        _apply(cfg, *parse_override(text))
    return validate(cfg)

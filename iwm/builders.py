"""What a training run is built from: the device, the model preset, the model, the optimiser, the
dataset, the loader, the mask sampler and the augmentation config, and loading a checkpoint's state
into them. Used by `iwm.train` (the Trainer), `iwm.eval` and the benchmarks; none of them import each
other for it."""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from . import augment as aug
from .config import Config, ConfigError, validate
from .data import BuiltinPhotos, ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator
from .masks import MultiBlockMaskSampler
from .models import IWM, get_preset
from .models.presets import ModelPreset
from .stopping import ignore_stop_signals_in_worker


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.meta.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("meta.device: cuda requested but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def model_preset(cfg: Config) -> ModelPreset:
    """meta.preset fills the model; the I-JEPA keys (model_name, pred_depth, pred_emb_dim) and ours
    (conditioning, shared_context) win where the config sets them. Without a preset they define it."""
    m = cfg.meta
    if not m.preset:
        return ModelPreset(m.model_name, cfg.data.crop_size, cfg.mask.patch_size, m.pred_depth, m.pred_emb_dim,
                           m.conditioning, m.shared_context)
    base = get_preset(m.preset)
    chosen = {"encoder": ("meta.model_name", m.model_name), "pred_depth": ("meta.pred_depth", m.pred_depth),
              "pred_dim": ("meta.pred_emb_dim", m.pred_emb_dim), "conditioning": ("meta.conditioning", m.conditioning),
              "shared_context": ("meta.shared_context", m.shared_context)}
    overrides = {field: value for field, (key, value) in chosen.items() if key in cfg.explicit}
    if "encoder" in overrides and overrides["encoder"] != base.encoder:
        overrides.update(encoder_depth=None, encoder_dim=None)
    # The preset's resolution and patch apply unless the config names them; the data follows the model.
    if "data.crop_size" not in cfg.explicit:
        cfg.data.crop_size = base.img_size
    if "mask.patch_size" not in cfg.explicit:
        cfg.mask.patch_size = base.patch_size
    validate(cfg)
    return replace(base, img_size=cfg.data.crop_size, patch_size=cfg.mask.patch_size, **overrides)


def build_model(cfg: Config, preset: ModelPreset, device: torch.device) -> IWM:
    model = IWM.from_preset(preset, loss=cfg.meta.loss).to(device)
    # No per-step finite check of the inputs (a host read each step, on every device): a NaN/Inf view
    # makes the loss non-finite, which the step turns into a skipped update and the trainer into a stop.
    model.check_inputs = False
    return model


def build_mask_sampler(cfg: Config, seed: int) -> MultiBlockMaskSampler:
    grid = cfg.data.crop_size // cfg.mask.patch_size
    mk = cfg.mask
    try:
        return MultiBlockMaskSampler(grid, num_targets=mk.num_pred_masks, target_scale=tuple(mk.pred_mask_scale),
                                     target_aspect=tuple(mk.aspect_ratio), context_mode=mk.context_mode,
                                     context_scale=tuple(mk.enc_mask_scale), min_keep=mk.min_keep,
                                     allow_overlap=mk.allow_overlap, seed=seed)
    except ValueError as exc:  # settings the sampler can never satisfy: a config problem, said as one
        raise ConfigError(f"mask: {exc} (data.crop_size {cfg.data.crop_size} / mask.patch_size "
                          f"{cfg.mask.patch_size} = a {grid}x{grid} grid)") from exc


class RankMasks:
    """Picklable mask function for the DataLoader workers: masks of the global batch, this rank's slice
    (so N processes see exactly the masks one process with the global batch would)."""

    def __init__(self, sampler: MultiBlockMaskSampler, global_batch: int, rank: int, batch: int, ragged: bool):
        self.sampler, self.global_batch, self.rank, self.batch, self.ragged = sampler, global_batch, rank, batch, ragged

    def __call__(self, step: int):
        masks = self.sampler.sample(self.global_batch, step)
        if not self.ragged:  # I-JEPA parity: truncate every mask to the batch minimum
            masks = masks.truncated()  # keeps the fallback count
        return masks.slice(self.rank * self.batch, (self.rank + 1) * self.batch)


def augment_config(cfg: Config) -> aug.AugmentConfig:
    """The config's augment section (every AugmentSettings field) with the output size and crop scale."""
    settings = {f.name: getattr(cfg.augment, f.name) for f in fields(aug.AugmentSettings)}
    return aug.AugmentConfig(**settings, out_size=cfg.data.crop_size, crop_scale=tuple(cfg.data.crop_scale))


def build_dataset(cfg: Config, seed: int):
    d = cfg.data
    if d.dataset == "builtin":
        return BuiltinPhotos(d.crop_size, d.builtin_samples, split="train", seed=seed, scale=tuple(d.crop_scale),
                             ratio=tuple(cfg.augment.crop_ratio), flip_p=cfg.augment.flip_p)
    if d.dataset == "webdataset":
        from .shards import ShardDataset

        return ShardDataset(d.shards, d.crop_size, seed=seed, scale=tuple(d.crop_scale),
                            ratio=tuple(cfg.augment.crop_ratio), flip_p=cfg.augment.flip_p, decode=d.decode)
    root = Path(d.root_path) / d.image_folder if d.root_path else Path(d.image_folder)
    return ImageFolderDataset(root, d.crop_size, seed=seed, scale=tuple(d.crop_scale),
                              ratio=tuple(cfg.augment.crop_ratio), flip_p=cfg.augment.flip_p, decode=d.decode)


def build_loader(cfg: Config, dataset, masks: MultiBlockMaskSampler, *, rank: int, world_size: int,
                 start_step: int, max_steps: int, device: torch.device) -> DataLoader:
    """The step-keyed loader: batch `step` (images + this rank's masks) is the same whatever step the
    run (re)started at."""
    d = cfg.data
    sampler = StepBatchSampler(len(dataset), d.batch_size, world_size=world_size, rank=rank, seed=cfg.meta.seed,
                               start_step=start_step, max_steps=max_steps)
    mask_fn = RankMasks(masks, d.batch_size * world_size, rank, d.batch_size, cfg.mask.ragged)
    return DataLoader(KeyedDataset(dataset), batch_sampler=sampler, collate_fn=StepCollator(mask_fn),
                      num_workers=d.num_workers, pin_memory=d.pin_mem and device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if d.num_workers > 0 else None,
                      worker_init_fn=ignore_stop_signals_in_worker if d.num_workers > 0 else None)


def param_groups(model: IWM) -> list[dict]:
    """I-JEPA's groups: weight decay on matrices, none on biases and norm/1-D parameters."""
    decay, no_decay = [], []
    for module in (model.encoder, model.predictor):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith("bias") or p.dim() == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "no_decay": True}]


def build_optimizer(model: IWM, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on `param_groups`, with PyTorch's fused implementation where the parameters' device has
    one (CPU and CUDA): one kernel over all parameters instead of a dozen ops per tensor (the step
    breakdown of the CPU benchmark report shows the optimiser phase of each). The update is the same.
    The fused kernel also takes a device-side `found_inf` flag (iwm.step skips a non-finite step with it)."""
    device = next(model.encoder.parameters()).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=weight_decay, fused=fused)


def load_training_state(state: dict, model: IWM, optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's weights and optimiser state into the built model and optimiser (raises
    KeyError / RuntimeError / ValueError when they do not fit)."""
    model.encoder.load_state_dict(state["encoder"])
    model.target_encoder.load_state_dict(state["target_encoder"])
    model.predictor.load_state_dict(state["predictor"])
    optimizer.load_state_dict(state["optimizer"])

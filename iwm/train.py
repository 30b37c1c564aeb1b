"""IWM training: `python -m iwm.train --config CONFIG.yaml [section.key=value ...]` (or `iwm-train`).

Reads top to bottom as the method: build the models, the data and the masks; each step makes the two
views on the device, runs the IWM loss, steps AdamW, updates the EMA target; logs, checkpoints,
evaluates. `torchrun --nproc_per_node=N -m iwm.train ...` runs the same code under DDP.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from . import augment as aug
from .checkpoint import (LATEST, CheckpointError, config_changes, find_resume_checkpoint, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import Config, ConfigError, check_data_paths, load_config, save_config, validate
from .data import BuiltinPhotos, ImageFolderDataset, KeyedDataset, StepBatchSampler, StepCollator
from .image_decode import gpu_decode_problem
from .distributed import DistInfo, DistributedError, all_reduce_mean, init_distributed, shutdown
from .masks import MultiBlockMaskSampler
from .metrics import MetricsWriter, Progress, format_duration, peak_memory_mb, plot_run
from .models import IWM, get_preset
from .models.presets import ModelPreset
from .schedules import Schedules, apply_lr_wd
from .stopping import StopFlag, blocked_stop_signals, ignore_stop_signals_in_worker


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the message says why and where."""


# --------------------------------------------------------------------------------------------- set-up
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


def build_mask_sampler(cfg: Config, seed: int) -> MultiBlockMaskSampler:
    grid = cfg.data.crop_size // cfg.mask.patch_size
    mk = cfg.mask
    return MultiBlockMaskSampler(grid, num_targets=mk.num_pred_masks, target_scale=tuple(mk.pred_mask_scale),
                                 target_aspect=tuple(mk.aspect_ratio), context_mode=mk.context_mode,
                                 context_scale=tuple(mk.enc_mask_scale), min_keep=mk.min_keep,
                                 allow_overlap=mk.allow_overlap, seed=seed)


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
    a = cfg.augment
    return aug.AugmentConfig(out_size=cfg.data.crop_size, jitter_p=a.jitter_p, brightness=a.brightness,
                             contrast=a.contrast, saturation=a.saturation, hue=a.hue, grayscale_p=a.grayscale_p,
                             blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma), solarize_p=a.solarize_p,
                             solarize_threshold=a.solarize_threshold)


def build_dataset(cfg: Config, seed: int):
    d = cfg.data
    if d.dataset == "builtin":
        return BuiltinPhotos(d.crop_size, d.builtin_samples, split="train", seed=seed, scale=tuple(d.crop_scale),
                             ratio=tuple(cfg.augment.crop_ratio), flip_p=cfg.augment.flip_p)
    root = Path(d.root_path) / d.image_folder if d.root_path else Path(d.image_folder)
    return ImageFolderDataset(root, d.crop_size, seed=seed, scale=tuple(d.crop_scale),
                              ratio=tuple(cfg.augment.crop_ratio), flip_p=cfg.augment.flip_p, decode=d.decode)


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
    breakdown of the CPU benchmark report shows the optimiser phase of each). The update is the same."""
    device = next(model.encoder.parameters()).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model), lr=lr, weight_decay=weight_decay, fused=fused)


# ---------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, cfg: Config, *, log=print):
        self.cfg = cfg
        check_data_paths(cfg)  # a missing data folder is an error now, not after the model is built
        self.device = resolve_device(cfg)
        if cfg.data.dataset == "imagefolder" and cfg.data.decode == "gpu":
            problem = gpu_decode_problem(self.device)
            if problem:  # at start, not in the first step's worker
                raise ConfigError(problem)
        self.dist = init_distributed(self.device.type, timeout_s=cfg.meta.dist_timeout_s)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.folder = Path(cfg.logging.folder)
        seed = cfg.meta.seed
        torch.manual_seed(seed)
        if cfg.meta.kernel_backend:
            os.environ["IWM_KERNELS_BACKEND"] = cfg.meta.kernel_backend

        self.preset = model_preset(cfg)
        self.model = IWM.from_preset(self.preset, loss=cfg.meta.loss).to(self.device)
        self.model.check_inputs = self.device.type != "cuda"  # a finite check costs a sync per step on GPU
        self.optimizer = build_optimizer(self.model, cfg.optimization.lr, cfg.optimization.weight_decay)
        self.dataset = build_dataset(cfg, seed)
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        if len(self.dataset) < self.global_batch:
            raise ConfigError(f"data.batch_size: the dataset has {len(self.dataset)} images, fewer than one global "
                              f"batch of {self.global_batch}")
        self.steps_per_epoch = len(self.dataset) // self.global_batch
        o = cfg.optimization
        self.total_steps = o.max_steps if o.max_steps > 0 else o.epochs * self.steps_per_epoch
        # Schedules span the configured epochs; max_steps only stops the run early (a resume continues).
        self.schedule_steps = o.epochs * self.steps_per_epoch if o.epochs > 0 else o.max_steps
        self.schedules = Schedules(total_steps=self.schedule_steps,
                                   warmup_steps=int(o.warmup * self.steps_per_epoch),
                                   start_lr=o.start_lr, lr=o.lr, final_lr=o.final_lr, weight_decay=o.weight_decay,
                                   final_weight_decay=o.final_weight_decay, ema_start=o.ema[0], ema_end=o.ema[1],
                                   ipe_scale=o.ipe_scale)
        self.masks = build_mask_sampler(cfg, seed)
        self.aug_cfg = augment_config(cfg)
        self.step = 0
        self._fault_nan_step = int(os.environ.get("IWM_FAULT_NAN_STEP", "-1"))
        self._fault_nan_rank = int(os.environ.get("IWM_FAULT_NAN_RANK", "-1"))  # -1: every rank
        self._fault_stop_step = int(os.environ.get("IWM_FAULT_SIGSTOP_STEP", "-1"))
        self._fault_stop_rank = int(os.environ.get("IWM_FAULT_SIGSTOP_RANK", "1"))
        self.skipped_images = 0
        self.best_loss = math.inf
        self.resumed_from: Optional[Path] = None
        self._maybe_resume()
        self.ddp = None
        if self.dist.enabled:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _StepModule(self.model), device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.compiled_step = None
        if cfg.meta.compile:
            self.compiled_step = torch.compile(self.ddp if self.ddp is not None else _StepModule(self.model))
        self.step_module = self.compiled_step or self.ddp or _StepModule(self.model)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        m = self.model
        return {
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "encoder": m.encoder.state_dict(),
            "target_encoder": m.target_encoder.state_dict(),
            "predictor": m.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedules": self.schedules.__dict__,
            "rng": rng_state(),
            "sampler": {"seed": self.cfg.meta.seed, "next_step": self.step, "global_batch": self.global_batch},
            "mask_sampler": {"seed": self.cfg.meta.seed, "grid": self.masks.grid},
            "skipped_images": self.skipped_images,
            "preset": self.preset.__dict__,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
        }

    def save(self, periodic: bool) -> None:
        # Every rank checks: under DDP the parameters and optimizer state are the same on all ranks, so
        # all decide alike (and stop together) without another collective.
        self._refuse_non_finite_state()
        if self.dist.is_main:
            save_checkpoint(self.state(), self.folder, self.step, periodic=periodic,
                            keep=self.cfg.logging.keep_checkpoints)
        self._saved_step = self.step
        self._last_checkpoint = (self.folder / LATEST, self.step)

    def _refuse_non_finite_state(self) -> None:
        """A NaN/Inf in the weights or in AdamW's moments is never written as a checkpoint: it would
        replace the last good `latest.pt` with a state no resume can recover from. (A finite loss does
        not prove a finite state: the update that follows it can overflow.) One host read per save."""
        named = [(f"{part}.{k}", v) for part in ("encoder", "target_encoder", "predictor")
                 for k, v in getattr(self.model, part).state_dict().items() if v.is_floating_point()]
        named += [(f"optimizer.state.{i}.{k}", v) for i, st in self.optimizer.state_dict()["state"].items()
                  for k, v in st.items() if torch.is_tensor(v) and v.is_floating_point()]
        if not named:
            return
        finite = torch.stack([torch.isfinite(v).all().to(self.device) for _, v in named]).tolist()
        bad = [name for (name, _), ok in zip(named, finite) if not ok]
        if bad:
            raise TrainingStopped(
                f"non-finite values in {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} after step "
                f"{self.step - 1} (the update made the model state NaN/Inf although the loss was finite): "
                f"stopping without saving it; {self._checkpoint_note()}")

    def _checkpoint_note(self) -> str:
        """What is on disk to go back to, said truthfully (also when nothing is)."""
        saved = getattr(self, "_last_checkpoint", None)
        if saved is None:
            return ("no checkpoint has been written in this run folder yet (the run started from scratch), so "
                    "there is nothing to resume: fix the cause (e.g. a lower optimization.lr) and start again")
        path, step = saved
        return (f"the last checkpoint, {path} (step {step}), is left as it was; resuming it as is replays the "
                f"same steps on the same data and, unless the cause was transient, stops here again: resume it "
                f"with changed settings (e.g. a lower optimization.lr and meta.resume_with_changes=true) or from "
                f"an earlier step-*.pt (meta.read_checkpoint=...)")

    def _non_finite_loss_message(self, loss_value: float, step: int) -> str:
        return f"non-finite loss ({loss_value}) at step {step}: stopping; {self._checkpoint_note()}"

    def _maybe_resume(self) -> None:
        if not self.cfg.meta.load_checkpoint and not self.cfg.meta.read_checkpoint:
            return
        path = find_resume_checkpoint(self.folder, self.cfg.meta.read_checkpoint)
        if path is None:
            return
        state = load_checkpoint(path, map_location=self.device)
        self._refuse_config_changes(path, state)
        try:
            self.model.encoder.load_state_dict(state["encoder"])
            self.model.target_encoder.load_state_dict(state["target_encoder"])
            self.model.predictor.load_state_dict(state["predictor"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint: {path} does not fit this configuration ({exc}); "
                                  f"refusing to restart from scratch") from exc
        if state.get("sampler", {}).get("global_batch", self.global_batch) != self.global_batch:
            self.log(f"warning: resuming with global batch {self.global_batch} "
                     f"(checkpoint: {state['sampler']['global_batch']}); the data order changes")
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self.resumed_from = path
        self._last_checkpoint = (path, self.step)
        self.log(f"resumed from {path} at step {self.step}")

    def _refuse_config_changes(self, path: Path, state: dict) -> None:
        """A resume continues the run the checkpoint belongs to: a setting that changes the result
        (seed, lr, model, data, ...) differing from the checkpoint's is refused before anything is
        written (config.yaml included), unless meta.resume_with_changes=true says it is meant."""
        changes = config_changes(state.get("config") or {}, self.cfg.to_dict(), Config().to_dict())
        if not changes:
            return
        listed = "; ".join(changes)
        if not self.cfg.meta.resume_with_changes:
            raise CheckpointError(
                f"checkpoint: resuming {path} with settings that change the result: {listed}. Resume with the "
                f"checkpoint's settings (its run's config.yaml), or pass meta.resume_with_changes=true to "
                f"continue with the new ones.")
        self.log(f"warning: resuming {path} with changed settings (meta.resume_with_changes=true): {listed}")

    # ------------------------------------------------------------------ data
    def loader(self) -> DataLoader:
        d = self.cfg.data
        sampler = StepBatchSampler(len(self.dataset), d.batch_size, world_size=self.dist.world_size,
                                   rank=self.dist.rank, seed=self.cfg.meta.seed, start_step=self.step,
                                   max_steps=self.total_steps)
        mask_fn = RankMasks(self.masks, self.global_batch, self.dist.rank, d.batch_size, self.cfg.mask.ragged)
        return DataLoader(KeyedDataset(self.dataset), batch_sampler=sampler, collate_fn=StepCollator(mask_fn),
                          num_workers=d.num_workers, pin_memory=d.pin_mem and self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if d.num_workers > 0 else None,
                          worker_init_fn=ignore_stop_signals_in_worker if d.num_workers > 0 else None)

    def views(self, images: torch.Tensor, step: int):
        """Both views and the action for this rank's samples, from the global batch's parameters."""
        gen = aug.generator_for_step(self.cfg.meta.seed, step)
        params = aug.sample_view_params(self.global_batch, self.aug_cfg, gen)
        lo = self.dist.rank * self.cfg.data.batch_size
        params = params.slice(lo, lo + images.shape[0])
        source, target = aug.render_views(images, params, self.aug_cfg, backend=self.cfg.augment.backend or None)
        return source, target, aug.action_from_params(params).to(images.device, non_blocking=True)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        stop = StopFlag()  # installed until the end, so a signal during the final evaluation is handled too
        stop.install()
        try:
            return self._train(stop)
        finally:
            stop.restore()

    def _train(self, stop: StopFlag) -> dict:
        cfg, model, device = self.cfg, self.model, self.device
        if self.dist.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.folder / "config.yaml")
        writer = MetricsWriter(self.folder, tag=cfg.logging.write_tag, enabled=self.dist.is_main,
                               tensorboard=cfg.logging.tensorboard, resume_step=self.step)
        progress = Progress(self.total_steps, cfg.logging.progress_bar if self.dist.is_main else "off")
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.meta.use_bfloat16)
        n_params = sum(p.numel() for p in model.encoder.parameters()) + sum(
            p.numel() for p in model.predictor.parameters())
        self.log(f"iwm: {self.preset.encoder} {self.preset.img_size}px/{self.preset.patch_size}, predictor "
                 f"{self.preset.pred_depth}x{self.preset.pred_dim}, conditioning={self.preset.conditioning}, "
                 f"shared_context={self.preset.shared_context}; {n_params / 1e6:.1f}M trainable parameters; "
                 f"{self.dist.world_size} process(es) on {device}; global batch {self.global_batch}; "
                 f"{self.steps_per_epoch} steps/epoch; steps {self.step}->{self.total_steps}")
        start_step, t_start = self.step, time.time()
        window = {"images": 0, "steps": 0, "time": 0.0, "wait": 0.0}
        last_loss = float("nan")
        stopped_by = None
        t_prev = time.time()
        batches = None
        try:
            if self._eval_pending(writer):  # killed during the evaluation that followed the checkpoint
                self.evaluate(writer, final=False, stop=stop)
            # Workers start with the stop signals blocked and then ignore them (iwm.stopping): a signal to
            # the process group stops the run through this process only, at a step boundary.
            with blocked_stop_signals():
                batches = iter(self.loader())
            for batch in batches:
                if stop.signal is not None and not self.dist.enabled:  # came during an evaluation
                    stopped_by = stop.name
                    break
                t_data = time.time()
                step = batch.step
                assert step == self.step, (step, self.step)
                lr, wd, momentum = (self.schedules.lr_at(step), self.schedules.wd_at(step),
                                    self.schedules.momentum_at(step))
                apply_lr_wd(self.optimizer, lr, wd)
                images = batch.images_on(device)  # data.decode=gpu: nvJPEG decodes the batch here
                masks = batch.masks.to(device)
                source, target, action = self.views(images, step)
                with autocast:
                    loss, stats = self.step_module(source, target, masks,
                                                   action if model.conditioning != "none" else None)
                if step == self._fault_nan_step and self._fault_nan_rank in (-1, self.dist.rank):
                    # fault injection for tests: IWM_FAULT_NAN_STEP=<step> [IWM_FAULT_NAN_RANK=<rank>]
                    loss = loss * float("nan")
                if step == self._fault_stop_step and self.dist.rank == self._fault_stop_rank:
                    # fault injection for tests: a hung peer, IWM_FAULT_SIGSTOP_STEP=<step> [..._RANK=<rank>]
                    os.kill(os.getpid(), signal.SIGSTOP)
                # One read of the step's scalars, averaged over ranks: every rank then sees the same loss
                # (NaN if any rank's is) and the same stop request, and all stop at the same step.
                scalars = {"loss": float(loss.detach()), "target_std": float(stats["target_std"]),
                           "pred_std": float(stats["pred_std"]), "stop": float(stop.signal is not None)}
                scalars = all_reduce_mean(scalars, self.dist, device)
                loss_value = scalars["loss"]
                if not math.isfinite(loss_value):
                    raise TrainingStopped(self._non_finite_loss_message(loss_value, step))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optimization.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in self.optimizer.param_groups for p in g["params"]], cfg.optimization.grad_clip)
                self.optimizer.step()
                model.update_target(momentum)
                self.step = step + 1
                self.skipped_images += batch.skipped
                now = time.time()
                wait, step_time = t_data - t_prev, now - t_prev
                t_prev = now
                window["images"] += images.shape[0] * self.dist.world_size
                window["steps"] += 1
                window["time"] += step_time
                window["wait"] += wait
                last_loss = loss_value
                row = {"step": step, "epoch": step // self.steps_per_epoch, "loss": loss_value, "lr": lr, "wd": wd,
                       "momentum": momentum, "target_std": scalars["target_std"],
                       "pred_std": scalars["pred_std"], "context_tokens": stats["context_tokens"],
                       "target_tokens": stats["target_tokens"], "skipped_images": self.skipped_images,
                       "mask_fallbacks": batch.masks.fallbacks,
                       "data_wait_s": wait, "step_time_s": step_time,
                       "img_per_s": images.shape[0] * self.dist.world_size / max(step_time, 1e-9)}
                if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps or self.step == start_step + 1:
                    img_s = window["images"] / max(window["time"], 1e-9)
                    eta = (self.total_steps - self.step) * window["time"] / max(1, window["steps"])
                    pct = 100.0 * self.step / max(1, self.total_steps)
                    mem = peak_memory_mb(device)
                    row["peak_mem_mb"] = mem
                    self.log(f"Train: step {self.step}/{self.total_steps} ({pct:.0f}%) epoch {row['epoch']} "
                             f"loss {row['loss']:.4f} lr {lr:.2e} wd {wd:.3f} momentum {momentum:.5f} "
                             f"{img_s:.1f} img/s data-wait {window['wait']:.2f}s ETA {format_duration(eta)}"
                             + (f" peak-mem {mem:.0f}MB" if mem else ""), flush=True)
                    window = {"images": 0, "steps": 0, "time": 0.0, "wait": 0.0}
                writer.log_step(row)
                progress.update(self.step, f"loss {loss_value:.4f}")
                at_epoch_end = self.step % self.steps_per_epoch == 0
                periodic = (cfg.logging.checkpoint_every > 0 and self.step % cfg.logging.checkpoint_every == 0)
                if periodic or at_epoch_end:
                    writer.sync()  # the rows up to this step reach the disk before the checkpoint does
                    self.save(periodic=True)
                    self._saved_step = self.step
                if cfg.eval.every > 0 and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                    self.evaluate(writer, final=False, stop=stop)
                if scalars["stop"] > 0:  # this rank or another was asked to stop
                    stopped_by = stop.name or "a signal on another rank"
                    break
        finally:
            del batches  # shuts the workers down now, not whenever the iterator is collected
            progress.close()
        if self._last_saved_step() != self.step:
            writer.sync()
            self.save(periodic=stopped_by is None)
        writer.flush()
        summary = {"steps": self.step - start_step, "final_step": self.step, "final_loss": last_loss,
                   "wall_s": time.time() - t_start, "skipped_images": self.skipped_images}
        if stopped_by:
            self.log(f"received {stopped_by}: saved {self.folder / 'latest.pt'} at step {self.step}; "
                     f"run the same command to resume")
            summary["stopped_by"] = stopped_by
        elif cfg.eval.at_end and self.step >= self.total_steps:
            summary["eval"] = self.evaluate(writer, final=True, stop=stop)
            if stop.signal is not None:
                summary["stopped_by"] = stop.name
        if self.skipped_images:
            self.log(f"skipped {self.skipped_images} unreadable image(s)")
        writer.close()
        if self.dist.is_main:
            if self.step >= self.total_steps:
                from .export import export_encoder_safetensors

                export_encoder_safetensors(self.model.target_encoder, self.folder / "target_encoder.safetensors")
            plots = plot_run(self.folder)
            self.log(f"run folder {self.folder}: checkpoints, metrics.jsonl, {len(plots)} plot(s)")
        return summary

    def _last_saved_step(self) -> int:
        """The step of the checkpoint this run last wrote or resumed from; -1 when there is none."""
        saved = getattr(self, "_last_checkpoint", None)
        return getattr(self, "_saved_step", saved[1] if saved else -1)

    def _eval_pending(self, writer: MetricsWriter) -> bool:
        """A resume at an evaluation step whose evaluation is not in evals.jsonl: the run was stopped or
        killed during it (it runs after the checkpoint of its step), so it is run again before going on."""
        every = self.cfg.eval.every
        return (self.resumed_from is not None and self.dist.is_main and bool(self.cfg.eval.tasks) and every > 0
                and 0 < self.step < self.total_steps and self.step % every == 0 and self.step not in writer.eval_steps)

    def evaluate(self, writer: MetricsWriter, final: bool, stop: Optional[StopFlag] = None) -> dict:
        if not self.dist.is_main or not self.cfg.eval.tasks:
            return {}
        from .eval.runner import run_evaluations

        results = run_evaluations(self.model, self.cfg, self.device, self.folder, step=self.step, log=self.log,
                                  stop=(lambda: stop.name) if stop is not None else None)
        if "interrupted_by" in results:
            # Not logged to evals.jsonl: a resume at this step runs it again (see _eval_pending).
            again = "run the same command to finish it" if final else "a resume at this step runs it again"
            self.log(f"received {results['interrupted_by']} during the evaluation at step {self.step}: stopped; "
                     f"finished tasks are in {self.folder / f'eval-step{self.step}.json'}; {again}")
            return results
        writer.log_eval(self.step, {k: v for k, v in results.items() if isinstance(v, (int, float))})
        return results


class _StepModule(torch.nn.Module):
    """The differentiable part of a step, as one module (what DDP wraps and torch.compile compiles)."""

    def __init__(self, model: IWM):
        super().__init__()
        self.model = model

    def forward(self, source, target, masks, action):
        return self.model(source, target, masks, action)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="iwm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with sections data, mask, meta, optimization, logging, ...")
    parser.add_argument("overrides", nargs="*", help="section.key=value (e.g. optimization.max_steps=100)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    info = DistInfo()
    try:
        trainer = Trainer(cfg)
        info = trainer.dist
        trainer.train()
    except (ConfigError, CheckpointError, TrainingStopped, DistributedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second stop signal (iwm.stopping.StopFlag): stop at once, no traceback
        print("error: stopped at once by a second stop signal, without saving; the checkpoints on disk are as "
              "they were", file=sys.stderr)
        return 130
    finally:
        shutdown(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

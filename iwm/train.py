"""IWM training: `python -m iwm.train --config CONFIG.yaml [section.key=value ...]` (or `iwm-train`).

The loop around the step: iwm.builders builds the models, the data and the masks; iwm.step runs each
step (views, forward, backward, clip, AdamW, EMA) without reading anything back from the device; this
module applies the schedules, reads the steps' losses and statistics once per window (log steps,
checkpoints, evaluations, stop requests), logs them, checkpoints, evaluates, and stops on signals or
a non-finite step. `torchrun --nproc_per_node=N -m iwm.train ...` runs the same code under DDP.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import iwm_kernels

from .builders import (augment_config, build_dataset, build_loader, build_mask_sampler, build_model,
                       build_optimizer, load_training_state, model_preset, resolve_device)
from .checkpoint import (LATEST, CheckpointError, config_changes, find_resume_checkpoint, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import Config, ConfigError, check_data_paths, load_config, profile_window, save_config
from .distributed import (DistInfo, DistributedError, all_gather_objects, all_reduce_mean, init_distributed,
                          shutdown)
from .image_decode import gpu_decode_problem
from .metrics import MetricsWriter, Progress, format_duration, peak_memory_mb, plot_run
from .schedules import Schedules, apply_lr_wd
from .sharded_checkpoint import full_state_dict, load_sharded, load_trainer_state, save_sharded
from .parallel import describe as describe_parallel
from .step import ROW_COLUMNS, TrainStep, profiled_submodules
from .stopping import StopFlag, blocked_stop_signals

# The names above from .builders stay importable from iwm.train (the benchmarks use build_optimizer and
# param_groups); new code imports them from iwm.builders.


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the message says why and where."""


# ---------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, cfg: Config, *, log=print):
        self.cfg = cfg
        check_data_paths(cfg)  # a missing data folder is an error now, not after the model is built
        self.device = resolve_device(cfg)
        if cfg.data.dataset in ("imagefolder", "webdataset") and cfg.data.decode == "gpu":
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
        # meta.kernel_backend applies inside train() (iwm_kernels.use_backend), not process-wide.
        self.kernel_backend = cfg.meta.kernel_backend or None

        self.preset = model_preset(cfg)
        self.model = build_model(cfg, self.preset, self.device)
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
        self._pending: list = []  # (host part, device row) of each step since the last read
        self._fault_nan_step = int(os.environ.get("IWM_FAULT_NAN_STEP", "-1"))
        self._fault_nan_rank = int(os.environ.get("IWM_FAULT_NAN_RANK", "-1"))  # -1: every rank
        self._fault_stop_step = int(os.environ.get("IWM_FAULT_SIGSTOP_STEP", "-1"))
        self._fault_stop_rank = int(os.environ.get("IWM_FAULT_SIGSTOP_RANK", "1"))
        self.skipped_images = 0
        # Each unreadable file counts once per run, however many epochs visit it: the dataset indices
        # seen so far (saved in the checkpoint, so a resume keeps counting the same files once).
        self.unreadable_files: set[int] = set()
        self.resumed_from: Optional[Path] = None
        # meta.parallel=fsdp2: sharded checkpoints (iwm.sharded_checkpoint, DCP), written by every rank.
        self.sharded_checkpoints = getattr(cfg.meta, "parallel", "ddp") == "fsdp2"
        self._load_into_shards: Optional[tuple] = None
        self._maybe_resume()
        self.step_fn = TrainStep(self.model, self.optimizer, device=self.device, aug_cfg=self.aug_cfg, seed=seed,
                                 global_batch=self.global_batch, rank=self.dist.rank, batch_size=cfg.data.batch_size,
                                 grad_clip=cfg.optimization.grad_clip, use_bfloat16=cfg.meta.use_bfloat16,
                                 augment_backend=cfg.augment.backend or None, distributed=self.dist.enabled,
                                 compile=cfg.meta.compile, parallel=cfg.meta.parallel,
                                 activation_checkpointing=cfg.meta.activation_checkpointing,
                                 activation_checkpointing_every=cfg.meta.activation_checkpointing_every)
        if self._load_into_shards is not None:
            path, state = self._load_into_shards
            load_sharded(path, self.model, self.optimizer, trainer_state=state)
        self.profile_window = profile_window(cfg.logging.profile_steps)

    # ------------------------------------------------------------------ checkpoints
    def state(self, weights: bool = True) -> dict:
        """The checkpoint's content; weights=False: without the model and optimizer tensors (a sharded
        checkpoint has DCP store those, each rank its shards)."""
        m = self.model
        state = {
            "step": self.step,
            "encoder": m.encoder.state_dict(),
            "target_encoder": m.target_encoder.state_dict(),
            "predictor": m.predictor.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedules": self.schedules.__dict__,
            "rng": rng_state(),
            "sampler": {"seed": self.cfg.meta.seed, "next_step": self.step, "global_batch": self.global_batch},
            "mask_sampler": {"seed": self.cfg.meta.seed, "grid": self.masks.grid},
            "skipped_images": self.skipped_images,
            "unreadable_files": sorted(self.unreadable_files),
            "preset": self.preset.__dict__,
            "config": self.cfg.to_dict(),
        }
        if not weights:
            for key in ("encoder", "target_encoder", "predictor", "optimizer"):
                del state[key]
        return state

    def save(self, periodic: bool) -> None:
        # Every rank checks: under DDP the parameters and optimizer state are the same on all ranks, so
        # all decide alike (and stop together) without another collective.
        self._refuse_non_finite_state()
        path = self.folder / LATEST
        if self.sharded_checkpoints:  # every rank writes its shards; rank 0 commits (a new step-*.dcp each save)
            path = save_sharded(self.model, self.optimizer, self.state(weights=False), self.folder, self.step,
                                keep=self.cfg.logging.keep_checkpoints)
        elif self.dist.is_main:
            save_checkpoint(self.state(), self.folder, self.step, periodic=periodic,
                            keep=self.cfg.logging.keep_checkpoints)
        self._saved_step = self.step
        self._last_checkpoint = (path, self.step)

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
        # Under FSDP2 each rank checks its own shards (DTensor.to_local) and the ranks agree in one all-reduce.
        finite = torch.stack([torch.isfinite(v.to_local() if hasattr(v, "to_local") else v).all().to(self.device)
                              for _, v in named])
        if self.sharded_checkpoints and self.dist.enabled:
            finite = all_reduce_mean(finite.double(), self.dist) == 1.0
        finite = finite.tolist()
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
        what = f"non-finite loss ({loss_value})" if not math.isfinite(loss_value) else "non-finite gradients"
        return (f"{what} at step {step}: stopping (the first such step; its update was skipped on the device, "
                f"and nothing after it is saved); {self._checkpoint_note()}")

    def _maybe_resume(self) -> None:
        if not self.cfg.meta.load_checkpoint and not self.cfg.meta.read_checkpoint:
            return
        path = find_resume_checkpoint(self.folder, self.cfg.meta.read_checkpoint)
        if path is None:
            return
        if path.is_dir():  # sharded (iwm.sharded_checkpoint): saved by any number of ranks, loads into this many
            state = load_trainer_state(path)
            self._refuse_config_changes(path, state)
            if self.dist.enabled:
                # The tensors go into the shards once TrainStep has sharded the model: each rank reads
                # only its slices and never holds the full weights and AdamW state.
                self._load_into_shards = (path, state)
            else:
                load_sharded(path, self.model, self.optimizer, trainer_state=state)
        else:
            state = load_checkpoint(path, map_location=self.device)
            self._refuse_config_changes(path, state)
            try:
                load_training_state(state, self.model, self.optimizer)
            except (KeyError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint: {path} does not fit this configuration ({exc}); "
                                      f"refusing to restart from scratch") from exc
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.skipped_images = int(state.get("skipped_images", 0))
        self.unreadable_files = {int(i) for i in state.get("unreadable_files", ())}
        self.resumed_from = path
        self._last_checkpoint = (path, self.step)
        self.log(f"resumed from {path} at step {self.step}"
                 + (" (each rank reads its own shards)" if self._load_into_shards else ""))

    def _refuse_config_changes(self, path: Path, state: dict) -> None:
        """A resume continues the run the checkpoint belongs to: a setting that changes the result
        (seed, lr, model, data, ...) differing from the checkpoint's is refused before anything is
        written (config.yaml included), unless meta.resume_with_changes=true says it is meant."""
        changes = config_changes(state.get("config") or {}, self.cfg.to_dict(), Config().to_dict())
        saved_batch = (state.get("sampler") or {}).get("global_batch")
        # Another process count with the same global batch (data.batch_size x processes) computes the
        # same steps (masks, views and data are drawn for the global batch): a resharded resume. Another
        # global batch changes the data order and the schedules' steps per epoch, whichever of data.batch_size
        # and the process count changed.
        if saved_batch is not None:
            changes = [c for c in changes if not c.startswith("data.batch_size ")]
        if saved_batch is not None and saved_batch != self.global_batch:
            changes.append(f"global batch = data.batch_size x processes (checkpoint: {saved_batch}, now: "
                           f"{self.cfg.data.batch_size} x {self.dist.world_size} = {self.global_batch})")
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
    def loader(self):
        return build_loader(self.cfg, self.dataset, self.masks, rank=self.dist.rank, world_size=self.dist.world_size,
                            start_step=self.step, max_steps=self.total_steps, device=self.device)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        stop = StopFlag()  # installed until the end, so a signal during the final evaluation is handled too
        stop.install()
        try:
            with iwm_kernels.use_backend(self.kernel_backend):
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
        n_params = sum(p.numel() for p in model.encoder.parameters()) + sum(
            p.numel() for p in model.predictor.parameters())
        self.log(f"iwm: {self.preset.encoder} {self.preset.img_size}px/{self.preset.patch_size}, predictor "
                 f"{self.preset.pred_depth}x{self.preset.pred_dim}, conditioning={self.preset.conditioning}, "
                 f"shared_context={self.preset.shared_context}; {n_params / 1e6:.1f}M trainable parameters; "
                 f"{self.dist.world_size} process(es) on {device}; global batch {self.global_batch}; "
                 f"{self.steps_per_epoch} steps/epoch; steps {self.step}->{self.total_steps}")
        self.log(describe_parallel(cfg.meta.parallel, cfg.meta.activation_checkpointing,
                                   cfg.meta.activation_checkpointing_every, self.dist.world_size))
        start_step, t_start = self.step, time.time()
        window = Window()
        self._last_loss = float("nan")
        stopped_by = None
        t_prev = time.time()
        batches = None
        profiler = StepProfiler(self.profile_window, self.folder / "trace.json", model, device,
                                enabled=self.dist.is_main, submodules=not cfg.meta.compile, log=self.log)
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
                with profiler.around(step):
                    images = batch.images_on(device)  # data.decode=gpu: nvJPEG decodes the batch here
                    # fault injection for tests: IWM_FAULT_NAN_STEP=<step> [IWM_FAULT_NAN_RANK=<rank>]
                    poison = step == self._fault_nan_step and self._fault_nan_rank in (-1, self.dist.rank)
                    result = self.step_fn(images, batch.masks, step, momentum, geometry=batch.geometry,
                                          poison_loss=poison)
                if step == self._fault_stop_step and self.dist.rank == self._fault_stop_rank:
                    # fault injection for tests: a hung peer, IWM_FAULT_SIGSTOP_STEP=<step> [..._RANK=<rank>]
                    os.kill(os.getpid(), signal.SIGSTOP)
                self.step = step + 1
                now = time.time()
                wait, step_time = t_data - t_prev, now - t_prev
                t_prev = now
                n_images = images.shape[0] * self.dist.world_size
                window.add(n_images, step_time, wait, timed=step != start_step)
                # The host part of the step's log row now; the device part (ROW_COLUMNS) at the next read.
                self._pending.append((
                    {"step": step, "epoch": step // self.steps_per_epoch, "lr": lr, "wd": wd, "momentum": momentum,
                     "context_tokens": result.stats["context_tokens"], "target_tokens": result.stats["target_tokens"],
                     "unreadable": batch.unreadable_files,
                     "skipped_without_index": batch.skipped - len(batch.unreadable_files),
                     "mask_fallbacks": batch.masks.fallbacks,
                     "data_wait_s": wait, "step_time_s": step_time, "img_per_s": n_images / max(step_time, 1e-9)},
                    result.row))
                log_now = (self.step % cfg.logging.log_every == 0 or self.step == self.total_steps
                           or self.step == start_step + 1)
                at_epoch_end = self.step % self.steps_per_epoch == 0
                periodic = (cfg.logging.checkpoint_every > 0 and self.step % cfg.logging.checkpoint_every == 0)
                eval_now = cfg.eval.every > 0 and self.step % cfg.eval.every == 0 and self.step < self.total_steps
                # Reads happen at the same steps on every rank (a stop request on one rank is agreed on at
                # the next of them); a single process also reads as soon as it is asked to stop.
                asked = stop.signal is not None
                if log_now or at_epoch_end or periodic or eval_now or (asked and not self.dist.enabled):
                    stop_any = self._read_window(writer, progress, asked, log_line=log_now, window=window)
                else:
                    continue
                if periodic or at_epoch_end:
                    writer.sync()  # the rows up to this step reach the disk before the checkpoint does
                    self.save(periodic=True)
                    self._saved_step = self.step
                if eval_now:
                    self.evaluate(writer, final=False, stop=stop)
                if stop_any:  # this rank or another was asked to stop
                    stopped_by = stop.name or "a signal on another rank"
                    break
            if self._pending:  # the loader ended between reads (it stops at total_steps, a read step)
                self._read_window(writer, progress, stop.signal is not None, log_line=False, window=window)
        except DistributedError:
            writer.close()  # the rows read so far reach the disk: the process leaves without its exit handlers
            raise
        finally:
            del batches  # shuts the workers down now, not whenever the iterator is collected
            profiler.close()
            progress.close()
        if self._last_saved_step() != self.step:
            writer.sync()
            self.save(periodic=stopped_by is None)
        writer.flush()
        summary = {"steps": self.step - start_step, "final_step": self.step, "final_loss": self._last_loss,
                   "wall_s": time.time() - t_start, "skipped_images": self.skipped_images}
        if stopped_by:
            self.log(f"received {stopped_by}: saved {self._last_checkpoint[0]} at step {self.step}; "
                     f"run the same command to resume")
            summary["stopped_by"] = stopped_by
        elif cfg.eval.at_end and self.step >= self.total_steps:
            summary["eval"] = self.evaluate(writer, final=True, stop=stop)
            if stop.signal is not None:
                summary["stopped_by"] = stop.name
        if self.skipped_images:
            self.log(f"skipped {self.skipped_images} unreadable image(s)")
        writer.close()
        # FSDP2: the target encoder's full weights are gathered on rank 0 (a collective, on every rank).
        target = (full_state_dict(self.model.target_encoder)
                  if self.sharded_checkpoints and self.step >= self.total_steps else None)
        if self.dist.is_main:
            if self.step >= self.total_steps:
                from .export import export_encoder_safetensors

                export_encoder_safetensors(self.model.target_encoder, self.folder / "target_encoder.safetensors",
                                           state=target)
            plots = plot_run(self.folder)
            self.log(f"run folder {self.folder}: checkpoints, metrics.jsonl, {len(plots)} plot(s)")
        return summary

    def _read_window(self, writer: MetricsWriter, progress: Progress, asked_to_stop: bool, *, log_line: bool,
                     window: "Window") -> bool:
        """The one host read of the steps since the last read: their device rows, averaged over ranks
        with the stop requests in the same collective (every rank then sees the same losses, NaN if any
        rank's is, and the same stop decision). Writes their log rows; raises TrainingStopped naming the
        first step whose loss or gradients were not finite (its update was skipped on the device, and
        nothing after it is saved). Returns whether any rank was asked to stop."""
        pending, self._pending = self._pending, []
        # Unreadable images: each rank's per-step (new file indices, images without an index); the ranks'
        # lists are gathered only in a window where some rank met one (the flag rides on the all-reduce).
        skips = [(tuple(i for i in host["unreadable"] if i not in self.unreadable_files),
                  host["skipped_without_index"]) for host, _ in pending]
        any_skip = any(files or n for files, n in skips)
        values = torch.cat([torch.stack([row for _, row in pending]).flatten().double(),
                            torch.tensor([float(any_skip), float(asked_to_stop)], dtype=torch.float64,
                                         device=self.device)])
        values = all_reduce_mean(values, self.dist).tolist()
        every_rank = all_gather_objects(skips, self.dist) if values[-2] > 0 else []
        width = len(ROW_COLUMNS)
        for i, (host, _) in enumerate(pending):
            self.skipped_images += self._newly_skipped([rank_skips[i] for rank_skips in every_rank])
            host["skipped_images"] = self.skipped_images
            device_part = dict(zip(ROW_COLUMNS, values[i * width:(i + 1) * width]))
            if device_part["non_finite"] > 0 or not math.isfinite(device_part["loss"]):
                writer.flush()
                raise TrainingStopped(self._non_finite_loss_message(device_part["loss"], host["step"]))
            row = {"step": host["step"], "epoch": host["epoch"], "loss": device_part["loss"], "lr": host["lr"],
                   "wd": host["wd"], "momentum": host["momentum"], "target_std": device_part["target_std"],
                   "pred_std": device_part["pred_std"], **{k: host[k] for k in (
                       "context_tokens", "target_tokens", "skipped_images", "mask_fallbacks", "data_wait_s",
                       "step_time_s", "img_per_s")}}
            last = i == len(pending) - 1
            if last and log_line:
                row["peak_mem_mb"] = self._log_progress_line(row, window)
            writer.log_step(row)
            self._last_loss = row["loss"]
        progress.update(self.step, f"loss {self._last_loss:.4f}")
        return values[-1] > 0

    def _log_progress_line(self, row: dict, window: "Window") -> Optional[float]:
        mem = peak_memory_mb(self.device)
        pct = 100.0 * self.step / max(1, self.total_steps)
        eta = window.eta_s(self.total_steps - self.step)
        self.log(f"Train: step {self.step}/{self.total_steps} ({pct:.0f}%) epoch {row['epoch']} "
                 f"loss {row['loss']:.4f} lr {row['lr']:.2e} wd {row['wd']:.3f} momentum {row['momentum']:.5f} "
                 f"{window.images_per_s():.1f} img/s data-wait {window.wait:.2f}s "
                 f"ETA {format_duration(eta) if eta is not None else '-'}"
                 + (f" peak-mem {mem:.0f}MB" if mem else ""), flush=True)
        window.reset()
        return mem

    def _newly_skipped(self, per_rank: list) -> int:
        """Unreadable images of one step over all ranks, not counted before: files by their dataset index
        (once per run, whichever rank meets them in which epoch), plus images that failed without an
        index (a GPU decode failure) each time. Every rank keeps the same set and count."""
        files = {i for indices, _ in per_rank for i in indices} - self.unreadable_files
        self.unreadable_files |= files
        return len(files) + sum(n for _, n in per_rank)

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
        if not self.cfg.eval.tasks:
            return {}
        model = self._eval_model()  # under FSDP2 a collective: every rank calls it
        if not self.dist.is_main:
            # The other ranks go on; their next collective waits for rank 0's evaluation to end.
            return {}
        from .eval.runner import run_evaluations

        results = run_evaluations(model, self.cfg, self.device, self.folder, step=self.step, log=self.log,
                                  stop=(lambda: stop.name) if stop is not None else None)
        if "interrupted_by" in results:
            # Not logged to evals.jsonl: a resume at this step runs it again (see _eval_pending).
            again = "run the same command to finish it" if final else "a resume at this step runs it again"
            self.log(f"received {results['interrupted_by']} during the evaluation at step {self.step}: stopped; "
                     f"finished tasks are in {self.folder / f'eval-step{self.step}.json'}; {again}")
            return results
        writer.log_eval(self.step, {k: v for k, v in results.items() if isinstance(v, (int, float))})
        return results

    def _eval_model(self):
        """The model rank 0 evaluates (None on the other ranks under FSDP2). The evaluation runs on rank 0
        alone, but a sharded forward all-gathers from every rank: under FSDP2 every rank takes part in
        gathering the full weights, and rank 0 evaluates an unsharded copy built like the trainer's."""
        if not self.step_fn.sharded:
            return self.model
        state = full_state_dict(self.model)  # on rank 0's CPU; {} on the others
        if not self.dist.is_main:
            return None
        # Built on the meta device and given the gathered tensors: no random init (nor a draw from
        # rank 0's RNG, which the other ranks would not make), no second copy of the weights.
        with torch.device("meta"):
            copy = build_model(self.cfg, self.preset, torch.device("meta"))
        copy.load_state_dict(state, assign=True)
        return copy.to(self.device)


class Window:
    """Throughput of the steps since the last progress line, and the ETA from it.

    The run's first step is left out of the rate (timed=False): it carries torch.compile, the first
    kernel launches and the loader's start, and extrapolating from it made the first ETA wrong by an
    order of magnitude. Until a timed step is in the window the ETA is unknown (None)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.images, self.time, self.wait = 0, 0.0, 0.0
        self.timed_steps, self.timed_time = 0, 0.0

    def add(self, images: int, step_time: float, wait: float, *, timed: bool = True) -> None:
        self.images += images
        self.time += step_time
        self.wait += wait
        if timed:
            self.timed_steps += 1
            self.timed_time += step_time

    def images_per_s(self) -> float:
        return self.images / max(self.time, 1e-9)

    def eta_s(self, remaining_steps: int) -> Optional[float]:
        if remaining_steps <= 0:
            return 0.0
        if self.timed_steps == 0:
            return None
        return remaining_steps * self.timed_time / self.timed_steps


class StepProfiler:
    """logging.profile_steps=A:B: steps A <= step < B run under torch.profiler (CPU, and CUDA on a GPU),
    with the step's phases as named ranges (iwm/views, iwm/forward, ...), and the trace is written as
    `trace.json` (Chrome trace format: open it in https://ui.perfetto.dev or chrome://tracing)."""

    def __init__(self, window: Optional[tuple[int, int]], path: Path, model, device: torch.device, *,
                 enabled: bool, submodules: bool, log=print):
        self.window = window if enabled else None
        self.path, self.model, self.device, self.submodules, self.log = path, model, device, submodules, log
        self.profile = None
        self.hooks = None

    def around(self, step: int):
        import contextlib

        if self.window is None:
            return contextlib.nullcontext()
        lo, hi = self.window
        if lo <= step < hi and self.profile is None:
            self._start()
        ctx = profiled_submodules(self.model, self.device.type == "cuda") if (
            self.profile is not None and self.submodules) else contextlib.nullcontext()

        @contextlib.contextmanager
        def scope():
            with ctx:
                yield
            if self.profile is not None and step >= hi - 1:
                self.close()
        return scope()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profile = profile(activities=activities)
        self.profile.__enter__()

    def close(self) -> None:
        if self.profile is None:
            return
        profile, self.profile = self.profile, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the trace covers the kernels of the profiled steps
        profile.__exit__(None, None, None)
        profile.export_chrome_trace(str(self.path))
        self.log(f"profiler: wrote {self.path} (open it in https://ui.perfetto.dev or chrome://tracing)")


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
    except DistributedError as exc:
        # A peer is hung or gone: destroy_process_group, and the backend's destructors at interpreter exit,
        # can wait on it without bound. The trainer has closed its logs (checkpoints are written whole);
        # leave now, without them.
        print(f"error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except (ConfigError, CheckpointError, TrainingStopped) as exc:
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

"""One IWM training step, in the order of the method (docs/design.md, "What one training step computes"):

    views     the two augmented views x, y of each image and the action a(x -> y), rendered on the device
    masks     the context / target token indices (made in the loader workers) moved to the device
    forward   target = layer_norm(f̄(y)) at the target positions (EMA target encoder, no grad);
              context encoder f on x's context tokens; predictor g(context, a) at the target
              positions; the L2 (or smooth-L1) loss — one module call (what DDP and torch.compile wrap)
    backward  the gradients (DDP all-reduces them here)
    clip      the global gradient norm, clipped to optimization.grad_clip
    adamw     AdamW, skipped on the device when the loss or the gradient norm is not finite
    ema       target <- m * target + (1 - m) * encoder
    record    the step's loss and statistics into a device row (read by the trainer once per window)

Each phase runs inside `torch.profiler.record_function("iwm/<phase>")` (and an NVTX range on CUDA), so a
profiler trace or an Nsight timeline shows them by name; under `profiled_submodules` the forward's
parts (iwm/target, iwm/context_encoder, iwm/predictor) show too.

Nothing here reads a device value back to the host: the non-finite check is a device flag handed to
the fused AdamW kernel (as torch.amp.GradScaler hands it `found_inf`) and to the EMA, and the trainer
reads the flags with the rest of a window's rows (iwm.train).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import augment as aug
from . import parallel as parallelism
from .models import IWM

# The columns of a step's device row, in order.
ROW_COLUMNS = ("loss", "target_std", "pred_std", "non_finite")


@contextlib.contextmanager
def phase(name: str, nvtx: bool = False) -> Iterator[None]:
    """A named range `iwm/<name>` for the profiler (and Nsight, when `nvtx`)."""
    with torch.profiler.record_function(f"iwm/{name}"):
        if nvtx:
            torch.cuda.nvtx.range_push(f"iwm/{name}")
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


@contextlib.contextmanager
def profiled_submodules(model: IWM, nvtx: bool = False) -> Iterator[None]:
    """While active, the forward's parts run in named ranges too (forward hooks: installed only for a
    profiled window, so the ordinary step, compiled or not, runs without them)."""
    handles, open_ranges = [], []
    for name, module in (("target", model.target_encoder), ("context_encoder", model.encoder),
                         ("predictor", model.predictor)):
        def enter(_module, _args, name=name):
            ctx = phase(name, nvtx)
            ctx.__enter__()
            open_ranges.append(ctx)

        def leave(_module, _args, _out):
            if open_ranges:
                open_ranges.pop().__exit__(None, None, None)
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while open_ranges:
            open_ranges.pop().__exit__(None, None, None)


@dataclass
class StepResult:
    loss: torch.Tensor     # 0-dim, on the device
    stats: dict            # target_std / pred_std (device tensors), context_tokens / target_tokens (ints)
    row: torch.Tensor      # [len(ROW_COLUMNS)] float32 on the device: loss, target_std, pred_std, non_finite


class TrainStep:
    """The training step, built once per run: `step_fn(images, masks, step, momentum)` runs it.

    model: the IWM (its parameters on `device`); optimizer: AdamW over its trainable parameters (fused
    where the device has it: iwm.builders.build_optimizer); the learning rate and weight decay of the
    step are already in its param groups (iwm.schedules.apply_lr_wd).
    seed, global_batch, rank, batch_size: the photometric view parameters are sampled for the global
    batch from (seed, step) and sliced for this rank, so N processes render what one process would (the
    crops come with the batch: `views`).
    distributed: more than one process; parallel: how they split the work, "ddp" (replicas, gradients
    all-reduced) or "fsdp2" (iwm.parallel.shard_model: parameters, gradients and AdamW state sharded;
    the optimizer is rebound to the sharded parameters in place). compile: torch.compile the result.
    activation_checkpointing ("none" | "blocks" | "every_k", with activation_checkpointing_every = k):
    recompute encoder / predictor block activations in the backward (iwm.parallel), applied before wrapping.
    """

    def __init__(self, model: IWM, optimizer: torch.optim.Optimizer, *, device: torch.device,
                 aug_cfg: aug.AugmentConfig, seed: int, global_batch: int, rank: int = 0, batch_size: int,
                 grad_clip: float = 0.0, use_bfloat16: bool = False, augment_backend: Optional[str] = None,
                 distributed: bool = False, compile: bool = False, parallel: str = "ddp",
                 activation_checkpointing: str = "none", activation_checkpointing_every: int = 1):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.aug_cfg, self.seed, self.global_batch = aug_cfg, seed, global_batch
        self.rank, self.batch_size, self.grad_clip = rank, batch_size, grad_clip
        self.augment_backend = augment_backend or None
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bfloat16)
        self.nvtx = device.type == "cuda"
        if parallel not in parallelism.PARALLEL_MODES:
            raise ValueError(f"parallel: {parallel!r} is not one of {', '.join(parallelism.PARALLEL_MODES)}")
        parallelism.apply_activation_checkpointing(model, activation_checkpointing, activation_checkpointing_every)
        # FSDP2 only with more than one process (one process has nothing to shard).
        self.sharded = distributed and parallel == "fsdp2"
        # The differentiable part, wrapped in one place: DDP or FSDP2 hooks its backward, torch.compile compiles it.
        self.forward_module: torch.nn.Module = model
        if self.sharded:
            names = parallelism.parameter_names(model)
            parallelism.shard_model(model, use_bfloat16=use_bfloat16)
            parallelism.rebind_optimizer(optimizer, names, model)
        elif distributed:
            self.forward_module = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.fused = bool(optimizer.defaults.get("fused")) and all(g.get("fused") for g in optimizer.param_groups)
        if compile:
            self.forward_module = torch.compile(self.forward_module)
            # Every step's masks have new token counts: marked dynamic before the trace, so one compile
            # serves every step (the model hands the lengths to the attention as CPU tensors, no ints).
            self.forward_module.register_forward_pre_hook(lambda _module, args: args[2].mark_dynamic())
        self.compiled = compile
        self.on_phase_end: Optional[Callable[[str], None]] = None

    # ------------------------------------------------------------------ the phases
    def views(self, images: torch.Tensor, step: int, geometry: Optional[aug.Geometry] = None) -> aug.Views:
        """Both views, the action and the parameters of this rank's samples: the photometric parameters
        drawn for the global batch from (seed, step) and sliced for this rank; the crop and flip those the
        loader workers applied (`geometry`, iwm.data.Batch.geometry, checked there; None: the images as
        they are, the whole image). Nothing geometric is drawn here."""
        params = aug.batch_view_params(self.aug_cfg, seed=self.seed, step=step, global_batch=self.global_batch,
                                       start=self.rank * self.batch_size, count=images.shape[0], geometry=geometry)
        source, target = aug.render_views(images, params, self.aug_cfg, backend=self.augment_backend)
        return aug.Views(source, target, aug.action_from_params(params).to(images.device, non_blocking=True), params)

    def forward(self, source, target, masks, action):
        with self.autocast:
            return self.forward_module(source, target, masks,
                                       action if self.model.conditioning != "none" else None)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def clip(self) -> torch.Tensor:
        """The global gradient norm (clipped to grad_clip when > 0): with the loss, it tells whether the
        update is finite. It is computed after DDP's all-reduce, so every rank gets the same answer.
        Under FSDP2 the gradients are DTensor shards: torch's norm sums the shards' squares over the ranks
        (so the clip is the global one) and comes back as a DTensor, made a plain tensor here (on the
        device: no host read) for the non-finite flag and the step's row."""
        if self.grad_clip > 0:
            return parallelism.full_norm(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return parallelism.full_norm(torch.nn.utils.get_total_norm(grads))

    def adamw(self, found_inf: torch.Tensor) -> None:
        """optimizer.step(), a no-op on the device when found_inf is 1 (no host read).

        The fused kernel takes the flag itself: torch.amp.GradScaler sets `optimizer.found_inf` the
        same way, and the fused AdamW then leaves parameters, moments and step counts as they were.
        Elsewhere (no fused AdamW for the device) the step runs and is undone with torch.where."""
        if self.fused:
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return
        keep = found_inf > 0
        before = [(t, t.detach().clone()) for t in self._optimizer_tensors()]
        self.optimizer.step()
        with torch.no_grad():
            for t, old in before:
                t.copy_(torch.where(keep, old, t))

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        out = list(self.params)
        for p in self.params:
            out += [v for v in self.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        return out

    def ema(self, momentum: float, found_inf: torch.Tensor) -> None:
        """target <- m * target + (1 - m) * encoder; on a skipped step m = 1 (exact: the target stays
        bit-identical, on every device).

        m is a 0-dim fp64 tensor on the device made from the skip flag, which only the kernel reads
        (check_values=False: it is valid by construction, and a CPU tensor is then not read on the host
        either); fp64, so a good step's m is the float itself."""
        skipped = found_inf.to(torch.float64)
        m = skipped + (1.0 - skipped) * momentum  # exactly `momentum` at 0, exactly 1 at 1
        self.model.update_target(m, check_values=False)

    # ------------------------------------------------------------------ the step
    def __call__(self, images: torch.Tensor, masks, step: int, momentum: float, *,
                 geometry: Optional[aug.Geometry] = None, poison_loss: bool = False) -> StepResult:
        """images: this rank's uint8 batch on the device; masks: its MaskBatch (CPU or device);
        geometry: the crops and flips the loader applied to the images (iwm.data.Batch.geometry).
        poison_loss: multiply the loss by NaN (fault injection for the tests)."""
        with self._phase("views"):
            source, target, action, _ = self.views(images, step, geometry)
        with self._phase("masks"):
            masks = masks.to(self.device, non_blocking=True) if self.device.type == "cuda" else masks.to(self.device)
        with self._phase("forward"):
            loss, stats = self.forward(source, target, masks, action)
        if poison_loss:
            loss = loss * float("nan")
        with self._phase("backward"):
            self.backward(loss)
        with self._phase("clip"):
            norm = self.clip()
            found_inf = (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()
        with self._phase("adamw"):
            self.adamw(found_inf)
        with self._phase("ema"):
            self.ema(momentum, found_inf)
        with self._phase("record"):
            row = torch.stack([loss.detach().float(), stats["target_std"].float(), stats["pred_std"].float(),
                               found_inf])
        return StepResult(loss, stats, row)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        with phase(name, self.nvtx):
            yield
        if self.on_phase_end is not None:  # the step benchmark's timer: the same phase names as the trace
            self.on_phase_end(name)

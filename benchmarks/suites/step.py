"""Step suite: one whole IWM training step, end to end, under every implementation.

A step, as `iwm.train` runs it (ours is `iwm.step.TrainStep` itself, phase names = its profiler
ranges): copy a batch of cropped uint8 images to the device and render both views and the action
(views), sample the multi-block masks and copy them (masks), the forward (target encoder on the whole
target view, encoder on the source's context tokens, predictor, loss), backward, the gradient norm
(clip), AdamW, and the EMA update of the target encoder (ema). Images are synthetic (smoothed noise);
decoding and cropping happen in DataLoader workers in training and are not part of the step.

Cases: the `tiny` preset (IWM's complement masks) and I-JEPA's own configuration `ijepa_vitt16`
(ViT-Ti/16 at 224 px, batch 32, a 6x96 predictor, no conditioning, I-JEPA's block masks: 4 targets of
15-20 %, a context block of 85-100 % minus the targets, min_keep 4, fp32); on a GPU also the paper's
ViT-B/L presets (bf16 autocast).

Variants. Every row starts from the same weights, images, augmentation parameters and sampled masks,
and every row's loss is smooth-L1 (I-JEPA's; L2 costs the same). What each row holds equal or changes:

  I-JEPA (faithful, eager)    the baseline: `benchmarks.ijepa_baseline`, I-JEPA's step written from its
                              semantics on the same weights: truncated masks (the collator's batch
                              minimum), apply_masks with torch.gather, the context repeated per target
                              block as a dense [M*B, Kc+Kt] batch, hand-written attention (q @ k^T *
                              scale, softmax, @ v), layer_norm of the whole target output then gather,
                              smooth-L1, torch's default AdamW on I-JEPA's four parameter groups, the
                              per-parameter EMA loop; augmentation as the per-transform chain.
  I-JEPA (faithful) + torch.compile   the same with its forward compiled.
  I-JEPA (faithful) + oneDNN linears  the same with every linear layer on `iwm_kernels.linear` (fp32
                              products on oneDNN instead of MKL, forward and backward): how much of our
                              step's lead is the GEMM engine alone. CPU only (on CUDA both are cuBLAS).
  eager reference kernels (equal work)   our step on the baseline's masks and layout with every
                              iwm_kernels op on backend="reference" (what the fused kernels replace).
                              Its attention is a per-sequence loop: on a GPU it measures launch
                              overhead (skipped in --quick there).
  ours, equal work            our fused step (automatic backends; on the CPU the linears on oneDNN,
                              `iwm_kernels.linear`) on exactly the baseline's masks
                              (MaskBatch.truncated(): the same context and target tokens) and the
                              paper's repeated predictor layout: the same model, the same tokens, the
                              same FLOPs (the suite checks the two losses agree at step 0). The
                              headline's speedup is this row (or its compiled form) against the baseline.
  ours, equal work + torch.compile   the same with the forward compiled (iwm.train's meta.compile).
  ours, ragged masks          model option: the sampler's ragged masks, every sampled patch kept (no
                              truncation bias): more context tokens than the baseline, more work.
  ours, shared context        model option: the baseline's masks, the opt-in shared-context predictor
                              (context computed once per sample; a different model from depth 2): less
                              work. Neither model-option row is the headline's "ours".

The optimiser is AdamW with I-JEPA's parameter groups: torch's default implementation in the baselines
(as I-JEPA builds it), the fused one in ours (as `iwm.train` builds it).

torch.compile covers the forward (and so its backward); augmentation, masks, AdamW and the EMA run as
in the eager form of the variant. It compiles with dynamic=True, because the token counts change every
step. A compile that fails, or takes longer than its time limit, leaves a row with the reason.

Taking turns: after the rows, the baseline runs once more in alternation with the equal-work row, then
with each model-option row (ragged masks, shared context), step by step on the same step indices, and
each records the median of its per-step ratios ("speedup vs the baseline, taking turns", with the number
of steps and their range): on a shared machine whose speed drifts over the minutes between two rows,
that ratio is the steadier one.

Measures: step ms (median over the timed steps, warm-up and compilation excluded), img/s, peak memory
(CUDA: max allocated; CPU: the process's peak resident set during the timed steps), the context and
target tokens per step, and model FLOPs: `benchmarks.flops` counts the step's FLOPs from each
variant's own masks and layout, and the report divides the achieved rate by the matmul ceiling
measured in the same run (MFU); per phase (target encoder, context encoder, predictor, attention,
backward) the FLOPs computed against the FLOPs its tokens need (`benchmarks.phase_flops`, the worst
phase in the row's text, all phases in its `flop_phases`). Breakdown: CUDA events (GPU) or the wall
clock (CPU) at the boundaries of the phases below, read after each step's final synchronisation; the phases of a compiled forward
are not separable (one "forward" phase).
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from iwm import augment as aug
from iwm.masks import MultiBlockMaskSampler
from iwm.models import IWM
from iwm.models.presets import PRESETS, ModelPreset
from iwm.builders import build_optimizer, param_groups
from iwm.step import TrainStep
from iwm_kernels import use_backend

from .. import ijepa_baseline, phase_flops
from ..common import TAKING_TURNS, Row, TimeLimitExceeded, quiet_compile, time_left, time_limit
from ..flops import mask_lengths, step_flops
from ..ijepa_baseline import IJEPAForward

SUITE = "step"
BASELINE = "I-JEPA (faithful, eager)"
EQUAL_WORK = "ours, equal work"
ONEDNN_BASELINE = "I-JEPA (faithful) + oneDNN linears"
# The breakdown's phases: iwm.step's profiler ranges (iwm/<phase>), in step order; the baseline marks
# the same boundaries around its own code (it has no clip and no device row).
PHASES = ("views", "masks", "forward", "backward", "clip", "adamw", "ema", "record")
MOMENTUM = 0.996
LOSS = ijepa_baseline.LOSS
HELD_EQUAL = ("weights, images, augmentation, I-JEPA's truncated masks (same context/target tokens), "
              "repeated predictor layout, model FLOPs, smooth-L1 loss, AdamW groups and EMA")

# I-JEPA's own configuration (ViT-Ti/16, 6x96 predictor, no conditioning), beside the presets.
IJEPA_VITT16 = ModelPreset("vit_tiny", 224, 16, pred_depth=6, pred_dim=96, conditioning="none",
                           shared_context=False, description="I-JEPA ViT-Ti/16, 6x96 predictor")
MODELS = dict(PRESETS, ijepa_vitt16=IJEPA_VITT16)
# Mask settings per case (the rest are the sampler's defaults, I-JEPA's: 4 targets of 15-20 %,
# aspect 0.75-1.5, context scale 0.85-1.0).
IJEPA_MASKS = {"context_mode": "block", "min_keep": 4}
FP32_CASES = ("tiny", "ijepa_vitt16")


def mask_settings(case_name: str, grid: int) -> dict:
    if case_name == "ijepa_vitt16":
        return dict(IJEPA_MASKS)
    return {"context_mode": "complement", "min_keep": 4 if grid < 14 else 10}


@dataclass(frozen=True)
class StepCase:
    preset: str       # a key of MODELS
    batch: int
    bf16: bool        # bf16 autocast around the forward (GPU presets), else fp32
    warmup: int       # untimed steps first (compilation happens there)
    iters: int        # timed steps
    compile_limit_s: float  # longest a compiled variant may spend on its untimed steps
    only: Optional[tuple[str, ...]] = None  # run only these variants (the others get a row saying so)

    @property
    def label(self) -> str:
        return f"{self.preset} b{self.batch} {'bf16' if self.bf16 else 'fp32'}"


@dataclass(frozen=True)
class Variant:
    name: str
    impl: str                # "ijepa" (benchmarks.ijepa_baseline) or "ours" (IWM.forward)
    masks: str               # "truncated" (I-JEPA's collator form) or "ragged" (the sampler's)
    layout: str              # predictor layout: "repeated" (the paper's) or "shared" (opt-in option)
    backend: Optional[str]   # iwm_kernels backend for every op; None = automatic (the fused kernels)
    compiled: bool = False
    essential: bool = False  # run even when the suite's time share is spent (the baseline and ours)
    changes: str = ""        # what a model-option row changes against the baseline ("" = equal work)

    @property
    def same_work(self) -> bool:
        return not self.changes


VARIANTS = (
    Variant(BASELINE, "ijepa", "truncated", "repeated", "reference", essential=True),
    Variant("I-JEPA (faithful) + torch.compile", "ijepa", "truncated", "repeated", "reference", compiled=True),
    Variant(ONEDNN_BASELINE, "ijepa", "truncated", "repeated", None),
    Variant("eager reference kernels (equal work)", "ours", "truncated", "repeated", "reference"),
    Variant(EQUAL_WORK, "ours", "truncated", "repeated", None, essential=True),
    Variant(EQUAL_WORK + " + torch.compile", "ours", "truncated", "repeated", None, compiled=True),
    Variant("ours, ragged masks", "ours", "ragged", "repeated", None,
            changes="ragged masks: every sampled context patch kept (no truncation to the batch minimum), "
                    "more tokens"),
    Variant("ours, shared context", "ours", "truncated", "shared", None,
            changes="shared-context predictor (opt-in model option, a different model from depth 2): "
                    "the context computed once per sample, less work"),
)


def variant(name: str) -> Variant:
    return next(v for v in VARIANTS if v.name == name)


def configs(device: torch.device, quick: bool) -> list[StepCase]:
    """The cases to run; IWM_BENCH_STEP_PRESETS=name,name restricts them (e.g. to fit a short GPU slot)."""
    if device.type == "cuda":
        if quick:
            cases = [StepCase("iwm_equi_vitb16", 128, True, warmup=3, iters=8, compile_limit_s=120),
                     StepCase("ijepa_vitt16", 32, False, warmup=3, iters=8, compile_limit_s=0)]
        else:
            cases = [StepCase(p, 128, True, warmup=3, iters=15, compile_limit_s=240)
                     for p in ("iwm_inv_vitb16", "iwm_equi_vitb16", "iwm_equi_vitl16")]
            cases.append(StepCase("ijepa_vitt16", 32, False, warmup=3, iters=15, compile_limit_s=240))
    elif quick:
        # I-JEPA's ViT-Ti/16 takes seconds per step on a few cores: the baseline and the equal-work
        # row only, one timed step.
        cases = [StepCase("tiny", 32, False, warmup=1, iters=3, compile_limit_s=0),
                 StepCase("ijepa_vitt16", 32, False, warmup=1, iters=1, compile_limit_s=0,
                          only=(BASELINE, EQUAL_WORK))]
    else:
        cases = [StepCase("tiny", 32, False, warmup=2, iters=8, compile_limit_s=240),
                 StepCase("ijepa_vitt16", 32, False, warmup=1, iters=3, compile_limit_s=240)]
    wanted = [p.strip() for p in os.environ.get("IWM_BENCH_STEP_PRESETS", "").split(",") if p.strip()]
    if wanted:
        unknown = set(wanted) - set(MODELS)
        if unknown:
            raise ValueError(f"IWM_BENCH_STEP_PRESETS: unknown preset(s) {sorted(unknown)}; "
                             f"choose from {', '.join(MODELS)}")
        template = cases[0]
        cases = [c for c in cases if c.preset in wanted] + [
            replace(template, preset=p, bf16=p not in FP32_CASES and device.type == "cuda")
            for p in wanted if p not in {c.preset for c in cases}]
    return cases


# ---- timing helpers -------------------------------------------------------------------------------------
class Marks:
    """Phase boundaries of one step: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.names: list[str] = []
        self.points: list = []

    def reset(self) -> None:
        self.names, self.points = [], []

    def __call__(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())
        self.names.append(name)

    def phases(self) -> dict[str, float]:
        """Phase -> ms (the first mark is the start). Call after synchronising."""
        out: dict[str, float] = {}
        for name, a, b in zip(self.names[1:], self.points[:-1], self.points[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


def _peak_rss_reset() -> bool:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, and earlier suites leave
    hundreds of MB resident), then reset the process's peak resident set (Linux), so that VmHWM
    measures what follows."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- one configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """Mean work of one step of a variant: model FLOPs and the tokens each part sees."""
    flops: float
    context_tokens: float     # encoder tokens (context patches over the batch)
    target_tokens: float      # predicted target tokens over the batch
    predictor_tokens: float   # tokens in the predictor's sequences (the context counted once per copy)


class StepBench:
    """The model, data and masks of one StepCase, and the step of each variant."""

    def __init__(self, case: StepCase, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        if case.preset not in MODELS:
            raise ValueError(f"case.preset: unknown {case.preset!r}; choose from {', '.join(MODELS)}")
        preset = MODELS[case.preset]
        torch.manual_seed(seed)
        self.model = IWM.from_preset(preset, loss=LOSS).to(device)
        self.model.check_inputs = False       # as iwm.train does on GPU: no host sync for a finite check
        self.grid = preset.img_size // preset.patch_size
        self.mask_settings = mask_settings(case.preset, self.grid)
        self.sampler = MultiBlockMaskSampler(self.grid, seed=seed, **self.mask_settings)
        self.aug_cfg = aug.AugmentConfig(out_size=preset.img_size)
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (case.batch, 3, preset.img_size, preset.img_size), generator=gen,
                               dtype=torch.uint8)
        # smooth the noise a little so the colour transforms see photo-like colours
        images = F.avg_pool2d(images.float(), 5, 1, 2).round().to(torch.uint8)
        self.host_images = images.pin_memory() if device.type == "cuda" else images
        # Every variant starts from these weights (each one trains the shared model as it is timed).
        self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def masks_for(self, variant: Variant, step: int):
        """The variant's masks for `step`, on the CPU: I-JEPA's lists of [B, K], or a MaskBatch
        (truncated to the baseline's tokens, or ragged)."""
        masks = self.sampler.sample(self.case.batch, step)
        if variant.impl == "ijepa":
            return masks.to_ijepa()
        return masks.truncated() if variant.masks == "truncated" else masks

    def work(self, variant: Variant, steps: range) -> Work:
        """Mean work of `variant`'s steps, counted from its own masks and layout."""
        flops = ctx_tokens = tgt_tokens = pred_tokens = 0.0
        n = max(1, len(steps))
        for i in steps:
            masks = self.sampler.sample(self.case.batch, i)
            if variant.masks == "truncated":
                masks = masks.truncated()
            ctx, tgt = mask_lengths(masks)
            shared = variant.layout == "shared"
            dense = variant.impl == "ijepa"  # the baseline's own algorithm: unsplit action MLP, unpruned last block
            flops += step_flops(self.model, ctx, tgt, shared=shared, split_conditioning=not dense,
                                prune_last_block=not dense).step
            ctx_tokens += sum(ctx)
            tgt_tokens += sum(map(sum, tgt))
            pred_tokens += sum(c + sum(t) if shared else len(t) * c + sum(t) for c, t in zip(ctx, tgt))
        return Work(flops / n, ctx_tokens / n, tgt_tokens / n, pred_tokens / n)

    def flops(self, variant: Variant, steps: range) -> float:
        return self.work(variant, steps).flops

    def flop_phases(self, variant: Variant) -> list:
        """Per-phase FLOPs computed (FlopCounterMode over one eager forward and backward of the variant,
        step 0) against what its tokens need (`benchmarks.phase_flops`). Call with the variant's layout
        set (after make_step); leaves no gradients behind."""
        case, device, model = self.case, self.device, self.model
        params = aug.sample_view_params(case.batch, self.aug_cfg, aug.generator_for_step(0, 0))
        source, target = aug.render_views(self.host_images.to(device), params, self.aug_cfg, backend="reference")
        action = aug.action_from_params(params).to(device) if model.conditioning != "none" else None
        masks = self.masks_for(variant, 0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            with use_backend(variant.backend):
                if variant.impl == "ijepa":
                    enc, pred = ([m.to(device) for m in ms] for ms in masks)
                    return phase_flops.baseline(IJEPAForward(model), source, target, enc, pred, action)
                return phase_flops.ours(model, source, target, masks.to(device), action)

    def optimizer_for(self, variant: Variant) -> torch.optim.Optimizer:
        """Ours: the optimiser iwm.train builds (fused AdamW); the baseline: torch's default AdamW on
        I-JEPA's four groups, as I-JEPA builds it; the reference-kernel variant: torch's default AdamW on
        our groups. Same hyperparameters, the same decay/no-decay split."""
        if variant.impl == "ijepa":
            return ijepa_baseline.build_optimizer(self.model, 1e-4, 0.04)
        if variant.backend is None:
            return build_optimizer(self.model, 1e-4, 0.04)
        return torch.optim.AdamW(param_groups(self.model), lr=1e-4, weight_decay=0.04)

    def make_step(self, variant: Variant, optimizer: torch.optim.Optimizer, marks: Marks
                  ) -> tuple[Callable[[int], None], Callable[[], None]]:
        """(step(i), cleanup()) for `variant`; step(i) runs training step i, marking its phases.

        Ours is `iwm.step.TrainStep`, the step `iwm.train` runs, with the phase names of its profiler
        ranges; the baseline marks the same phases around its own code."""
        model = self.model
        layout_before = model.predictor.shared_context
        shared = model.predictor.shared_context = variant.layout == "shared"
        if variant.impl == "ijepa":
            inner = self._ijepa_step(variant, optimizer, marks)
        else:
            inner = self._our_step(variant, optimizer, marks)

        def step(i: int) -> None:
            model.predictor.shared_context = shared  # each call: steps of two layouts may take turns
            inner(i)

        def cleanup() -> None:
            model.predictor.shared_context = layout_before
            if variant.compiled:
                torch._dynamo.reset()
        return step, cleanup

    def _our_step(self, variant: Variant, optimizer: torch.optim.Optimizer, marks: Marks) -> Callable[[int], None]:
        case = self.case
        train_step = TrainStep(self.model, optimizer, device=self.device, aug_cfg=self.aug_cfg, seed=0,
                               global_batch=case.batch, batch_size=case.batch, use_bfloat16=case.bf16,
                               augment_backend=variant.backend, compile=variant.compiled)
        train_step.on_phase_end = marks

        def step(i: int) -> None:
            with use_backend(variant.backend):
                marks("start")
                images = self.host_images.to(self.device, non_blocking=True)
                masks = self.masks_for(variant, i)
                train_step(images, masks, i, MOMENTUM)
        return step

    def _ijepa_step(self, variant: Variant, optimizer: torch.optim.Optimizer, marks: Marks) -> Callable[[int], None]:
        model, device, case = self.model, self.device, self.case
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16)
        fwd = IJEPAForward(model)
        if variant.compiled:
            fwd = torch.compile(fwd, dynamic=True)
        needs_action = model.conditioning != "none"

        def step(i: int) -> None:
            with use_backend(variant.backend):  # the model's linears: torch's own F.linear ("reference")
                run(i)

        def run(i: int) -> None:
            marks("start")
            images = self.host_images.to(device, non_blocking=True)
            params = aug.sample_view_params(case.batch, self.aug_cfg, aug.generator_for_step(0, i))
            source, target = aug.render_views(images, params, self.aug_cfg, backend="reference")
            action = aug.action_from_params(params).to(device, non_blocking=True) if needs_action else None
            marks("views")
            enc, pred = self.masks_for(variant, i)  # I-JEPA's collator truncates on the CPU, then the copy
            enc = [m.to(device, non_blocking=True) for m in enc]
            pred = [m.to(device, non_blocking=True) for m in pred]
            marks("masks")
            with autocast:
                loss = fwd(source, target, enc, pred, action)
            marks("forward")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            marks("backward")
            optimizer.step()
            marks("adamw")
            ijepa_baseline.ema_(model.target_encoder, model.encoder, MOMENTUM)
            marks("ema")
        return step

    def config(self, variant: Variant) -> dict:
        case = self.case
        return {"preset": case.preset, "batch": case.batch, "dtype": "bf16 autocast" if case.bf16 else "fp32",
                "img_size": self.model.encoder.img_size, "grid": self.grid, "impl": variant.impl,
                "masks": variant.masks, "mask_settings": self.mask_settings, "predictor_layout": variant.layout,
                "conditioning": self.model.conditioning, "loss": LOSS,
                "backend": variant.backend or "automatic", "compiled": variant.compiled,
                "changes": variant.changes or "nothing (equal work)", "warmup_steps": case.warmup,
                "timed_steps": case.iters}

    def row(self, variant: Variant, ms: Optional[float], note: str = "", work: Optional[Work] = None,
            extra: Optional[dict] = None) -> Row:
        config = self.config(variant)
        if work is not None:
            config.update(context_tokens=work.context_tokens, target_tokens=work.target_tokens,
                          predictor_tokens=work.predictor_tokens, model_flops=work.flops)
        return Row(SUITE, self.case.label, variant.name, ms, flops=work.flops if work else None, baseline=BASELINE,
                   note=note, config=config, extra=extra or {}, headline=True, same_work=variant.same_work,
                   differs=variant.changes, held_equal=HELD_EQUAL)

    def run_variant(self, variant: Variant, progress: Callable[[str], None]) -> Row:
        case, device = self.case, self.device
        timed = range(case.warmup, case.warmup + case.iters)
        work = self.work(variant, timed)

        def row(ms: Optional[float], note: str = "", **kw) -> Row:
            return self.row(variant, ms, note, work, **kw)

        if case.only is not None and variant.name not in case.only:
            return row(None, "skipped in --quick for this case (seconds per step on a few cores): "
                             "the baseline and the equal-work row only")
        if time_left() <= 0 and not variant.essential:
            return row(None, "skipped: the step suite's share of the report's time budget is spent")
        if variant.compiled and case.compile_limit_s <= 0:
            where = "on the CPU (compiling takes minutes on a few cores)" if device.type == "cpu" else \
                "for this case (GPU time is kept for the main case's compile)"
            return row(None, f"skipped in --quick {where}")
        if variant.compiled:
            left = time_left()
            if left < 0.5 * case.compile_limit_s:
                return row(None, f"skipped: {max(left, 0):.0f} s of the report's time budget left "
                                 f"(a compile may take {case.compile_limit_s:.0f} s)")
        self.model.load_state_dict(self.initial_state)
        optimizer = self.optimizer_for(variant)
        marks = Marks(device)
        step, cleanup = self.make_step(variant, optimizer, marks)
        totals, phases = [], []
        try:
            accounting = self.flop_phases(variant)
            with quiet_compile():
                t0 = time.perf_counter()
                limit = min(case.compile_limit_s, max(time_left(), 1.0)) if variant.compiled else None
                with time_limit(limit, "compiling and warming up"):
                    for i in range(case.warmup):
                        marks.reset()
                        step(i)
                        _sync(device)
                warm_s = time.perf_counter() - t0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rss_ok = device.type == "cpu" and _peak_rss_reset()
                for i in timed:
                    marks.reset()
                    step(i)
                    _sync(device)
                    split = marks.phases()
                    phases.append(split)
                    totals.append(sum(split.values()))
        except TimeLimitExceeded as exc:
            return row(None, f"not timed: {exc}")
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return row(None, f"failed: {exc.__class__.__name__}: {msg}"[:240])
        finally:
            cleanup()
            optimizer.zero_grad(set_to_none=True)
            del optimizer
        ms = statistics.median(totals)
        worst = phase_flops.worst(accounting)
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                else _peak_rss_mb() if rss_ok else None)
        names = [p for p in PHASES if any(p in s for s in phases)]
        breakdown = {p: statistics.fmean(s.get(p, 0.0) for s in phases) for p in names}
        progress(f"  {variant.name}: {ms:.1f} ms/step, {case.batch / ms * 1e3:.1f} img/s")
        peak_key = "peak MB (allocated)" if device.type == "cuda" else "peak MB (process RSS)"
        return row(ms, extra={"img/s": case.batch / ms * 1e3, peak_key: peak,
                              "context tokens": work.context_tokens, "target tokens": work.target_tokens,
                              "model GFLOP/step": work.flops / 1e9,
                              "warm-up s" + (" incl. compile" if variant.compiled else ""): warm_s,
                              "FLOPs computed/needed (worst phase)": f"{worst.ratio:.2f} ({worst.name})",
                              "flop_phases": phase_flops.as_dict(accounting),
                              "breakdown_ms": breakdown})

    def paired_speedup(self, base: Variant, ours: Variant) -> Optional[dict]:
        """The baseline and ours taking turns step by step on the same masks (step i of one, then of the
        other, the order swapped every step), so that a slow spell of a shared machine hits both: the
        median over the steps of baseline ms / ours ms. Eager variants only."""
        case, device = self.case, self.device
        self.model.load_state_dict(self.initial_state)
        steps, cleanups, times = [], [], {base.name: [], ours.name: []}
        try:
            for v in (base, ours):
                optimizer = self.optimizer_for(v)
                step, cleanup = self.make_step(v, optimizer, Marks(device))
                cleanups.append(cleanup)
                steps.append((v.name, step))
                for i in range(case.warmup):
                    step(i)
                _sync(device)
            for n, i in enumerate(range(case.warmup, case.warmup + max(case.iters, 5))):
                for name, step in steps if n % 2 == 0 else steps[::-1]:
                    t0 = time.perf_counter()
                    step(i)
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
        finally:
            for cleanup in cleanups:
                cleanup()
            self.model.zero_grad(set_to_none=True)
        ratios = [b / o for b, o in zip(times[base.name], times[ours.name])]
        return {"speedup": statistics.median(ratios), "steps": len(ratios),
                "spread": (min(ratios), max(ratios))}

    def losses_at_step0(self) -> dict[str, float]:
        """Step-0 losses from the initial weights and the reference views: the baseline, ours on equal
        work (fused and reference kernels), ours on the ragged masks (fused and reference kernels)."""
        case, device, model = self.case, self.device, self.model
        params = aug.sample_view_params(case.batch, self.aug_cfg, aug.generator_for_step(0, 0))
        images = self.host_images.to(device)
        action = aug.action_from_params(params).to(device) if model.conditioning != "none" else None
        source, target = aug.render_views(images, params, self.aug_cfg, backend="reference")
        enc, pred = self.masks_for(variant(BASELINE), 0)
        equal = self.masks_for(variant(EQUAL_WORK), 0).to(device)
        ragged = self.sampler.sample(case.batch, 0).to(device)
        layout_before = model.predictor.shared_context
        model.predictor.shared_context = False
        out = {}
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
                with use_backend(variant(BASELINE).backend):
                    out["baseline"] = float(IJEPAForward(model)(source, target, [m.to(device) for m in enc],
                                                                [m.to(device) for m in pred], action))
                for name, masks in (("equal work", equal), ("ragged", ragged)):
                    for backend in ("reference", None):
                        key = f"{name} ({backend or 'fused'})"
                        out[key] = float(model(source, target, masks, action, backend=backend)[0])
        finally:
            model.predictor.shared_context = layout_before
        return out

    def check(self) -> Optional[str]:
        """At step 0, on the same weights and views: ours against the reference kernels (same masks),
        and the equal-work row against the faithful baseline (same tokens: the losses must agree)."""
        self.model.load_state_dict(self.initial_state)
        losses = self.losses_at_step0()
        tol = 3e-2 if self.case.bf16 else 1e-3
        problems = []
        for a, b in (("ragged (fused)", "ragged (reference)"), ("equal work (fused)", "equal work (reference)"),
                     ("equal work (fused)", "baseline")):
            x, y = losses[a], losses[b]
            if not abs(x - y) <= tol * max(abs(y), 1e-3):
                problems.append(f"loss {x:.5g} ({a}) vs {y:.5g} ({b})")
        return ("MISMATCH: " + "; ".join(problems)) if problems else None


# Ours that take turns with the baseline after the rows: equal work first (the headline's figure), then the
# model options, whose rows otherwise compare two runs minutes apart on a machine whose speed drifts.
TURN_TAKERS = (EQUAL_WORK, "ours, ragged masks", "ours, shared context")


def take_turns(bench: "StepBench", case_rows: list[Row], progress: Callable[[str], None]) -> None:
    """Adds the taking-turns speedup (median, steps and range) to each eager row of TURN_TAKERS that ran,
    while the report's time lasts; a failure is a note on that row."""
    if not any(r.impl == BASELINE and r.ms for r in case_rows):
        return
    for name in TURN_TAKERS:
        row = next((r for r in case_rows if r.impl == name and r.ms), None)
        if row is None or time_left() <= 0:
            continue
        progress(f"step | {bench.case.label} | the baseline and {name}, taking turns")
        try:
            paired = bench.paired_speedup(variant(BASELINE), variant(name))
        except Exception as exc:
            row.note = "; ".join(x for x in (row.note, f"taking turns failed: {type(exc).__name__}: "
                                                          f"{str(exc)[:120]}") if x)
            continue
        lo, hi = paired["spread"]
        row.extra[TAKING_TURNS] = paired["speedup"]
        row.extra[TAKING_TURNS + " (steps, range)"] = f"{paired['steps']}, {lo:.2f}-{hi:.2f}"


def variants_for(device: torch.device, quick: bool) -> list[tuple[Variant, str]]:
    """(variant, why not run or '') in report order."""
    out = []
    for v in VARIANTS:
        why = ""
        if v.backend == "reference" and v.impl == "ours" and device.type == "cuda" and quick:
            why = "skipped in --quick on the GPU (per-sequence reference attention: launch-bound, seconds per step)"
        if v.name == ONEDNN_BASELINE and device.type != "cpu":
            why = "CPU only: on CUDA every linear is cuBLAS's, the same as the baseline's"
        out.append((v, why))
    return out


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    rows: list[Row] = []
    for case in configs(device, quick):
        if rows and time_left() < 30:
            rows.append(Row(SUITE, case.label, "(all)", None, note="skipped: the report's time budget is spent"))
            continue
        progress(f"step | {case.label} | building the model")
        bench = StepBench(case, device)
        problem = bench.check()
        if problem:
            rows.append(Row(SUITE, case.label, EQUAL_WORK, None, note=problem))
        for v, why in variants_for(device, quick):
            progress(f"step | {case.label} | {v.name}")
            if why:
                rows.append(bench.row(v, None, why))
                continue
            rows.append(bench.run_variant(v, progress))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        take_turns(bench, [r for r in rows if r.case == case.label], progress)
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows

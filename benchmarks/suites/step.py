"""Step suite: one whole IWM training step, end to end, under every implementation.

A step, as `iwm.train` runs it: copy a batch of cropped uint8 images to the device and render both
views and the action (data/augment), sample the multi-block masks and copy them (masks), the forward
(target encoder on the whole target view, encoder on the source's context tokens, predictor, loss),
backward, AdamW, and the EMA update of the target encoder. Images are synthetic (smoothed noise);
decoding and cropping happen in DataLoader workers in training and are not part of the step.

Variants (same weights, same images, same augmentation parameters and masks, step by step):

  eager I-JEPA-style (baseline)   the step as I-JEPA's code does it on the same model: masks truncated
                                  to the batch minimum (rectangular [B, K]), I-JEPA's `apply_masks`
                                  (torch.gather), one dense predictor sequence per (sample, target
                                  block) with the context repeated, layer_norm of the whole target
                                  encoder output before gathering, augmentation as the per-transform
                                  chain, the per-parameter EMA loop. Dense attention is PyTorch's SDPA
                                  (I-JEPA writes q @ k^T, softmax, @ v by hand: SDPA favours the
                                  baseline). Every iwm_kernels op in it runs with backend="reference".
  eager I-JEPA-style + torch.compile   the same, with its forward compiled.
  eager reference kernels (same model) our step and model (ragged masks, the preset's predictor
                                  layout) with every op on backend="reference": what the fused
                                  kernels replace, same math. Its attention is a per-sequence loop,
                                  so on a GPU it measures launch overhead; timed on the CPU, and on
                                  the GPU outside --quick.
  ours (fused)                    our step: ragged masks, fused kernels (automatic backends).
  ours + torch.compile            the same with the forward compiled (iwm.train's meta.compile).

The optimiser is AdamW with I-JEPA's parameter groups: torch's default implementation in the baselines
(as I-JEPA builds it), the fused one in ours (as `iwm.train` builds it).

torch.compile covers the forward (and so its backward); augmentation, masks, AdamW and the EMA run as
in the eager form of the variant. It compiles with dynamic=True, because the token counts change every
step. A compile that fails, or takes longer than its time limit, leaves a row with the reason.

Measures: step ms (median over the timed steps, warm-up and compilation excluded), img/s, peak memory
(CUDA: max allocated; CPU: the process's peak resident set during the timed steps), and model FLOPs
utilisation: `benchmarks.flops` counts the step's FLOPs from its masks (each variant's own layout),
and the report divides the achieved rate by the matmul ceiling measured in the same run. Breakdown:
CUDA events (GPU) or the wall clock (CPU) at the boundaries of the phases below, read after each step's
final synchronisation; the phases of a compiled forward are not separable (one "forward" phase).
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
from torch import nn

from iwm import augment as aug
from iwm.masks import MultiBlockMaskSampler
from iwm.models import IWM, get_preset
from iwm.models.presets import PRESETS
from iwm.train import build_optimizer, param_groups

from ..common import Row, TimeLimitExceeded, quiet_compile, time_left, time_limit
from ..flops import mask_lengths, step_flops
from .gather import ijepa_apply_masks

SUITE = "step"
BASELINE = "eager I-JEPA-style"
PHASES = ("data/augment", "masks", "target encoder", "encoder", "predictor", "loss", "forward (compiled)",
          "backward", "optimizer", "EMA")
MOMENTUM = 0.996


@dataclass(frozen=True)
class StepCase:
    preset: str
    batch: int
    bf16: bool        # bf16 autocast around the forward (GPU presets), else fp32
    warmup: int       # untimed steps first (compilation happens there)
    iters: int        # timed steps
    compile_limit_s: float  # longest a compiled variant may spend on its untimed steps

    @property
    def label(self) -> str:
        return f"{self.preset} b{self.batch} {'bf16' if self.bf16 else 'fp32'}"


@dataclass(frozen=True)
class Variant:
    name: str
    dataflow: str            # "ijepa" (truncated masks, dense, repeated context) or "packed" (ours)
    backend: Optional[str]   # iwm_kernels backend for every op; None = automatic (the fused kernels)
    compiled: bool = False
    essential: bool = False  # run even when the suite's time share is spent (the baseline and ours)


VARIANTS = (
    Variant(BASELINE, "ijepa", "reference", essential=True),
    Variant(BASELINE + " + torch.compile", "ijepa", "reference", compiled=True),
    Variant("eager reference kernels (same model)", "packed", "reference"),
    Variant("ours (fused)", "packed", None, essential=True),
    Variant("ours + torch.compile", "packed", None, compiled=True),
)


def configs(device: torch.device, quick: bool) -> list[StepCase]:
    """The cases to run; IWM_BENCH_STEP_PRESETS=name,name restricts them (e.g. to fit a short GPU slot)."""
    if device.type == "cuda":
        if quick:
            cases = [StepCase("iwm_equi_vitb16", 128, True, warmup=3, iters=8, compile_limit_s=120)]
        else:
            cases = [StepCase(p, 128, True, warmup=3, iters=15, compile_limit_s=240)
                     for p in ("iwm_inv_vitb16", "iwm_equi_vitb16", "iwm_equi_vitl16")]
    elif quick:
        cases = [StepCase("tiny", 32, False, warmup=1, iters=3, compile_limit_s=0)]
    else:
        cases = [StepCase("tiny", 32, False, warmup=2, iters=8, compile_limit_s=240)]
    wanted = [p.strip() for p in os.environ.get("IWM_BENCH_STEP_PRESETS", "").split(",") if p.strip()]
    if wanted:
        unknown = set(wanted) - set(PRESETS)
        if unknown:
            raise ValueError(f"IWM_BENCH_STEP_PRESETS: unknown preset(s) {sorted(unknown)}")
        template = cases[0]
        cases = [c for c in cases if c.preset in wanted] + [
            replace(template, preset=p, bf16=p != "tiny" and device.type == "cuda")
            for p in wanted if p not in {c.preset for c in cases}]
    return cases


# ---- the I-JEPA-style forward ---------------------------------------------------------------------------
class IJEPAStyleForward(nn.Module):
    """I-JEPA's forward on an `IWM`'s weights (see the module docstring): returns the loss."""

    def __init__(self, model: IWM):
        super().__init__()
        self.model = model
        self.mark: Optional[Callable[[str], None]] = None   # phase marks (eager only)

    def _mark(self, name: str) -> None:
        if self.mark is not None:
            self.mark(name)

    def forward(self, source, target, masks_enc, masks_pred, action):
        m = self.model
        with torch.no_grad():
            h = m.target_encoder(target, backend="reference")
            h = F.layer_norm(h, (h.size(-1),))
            h = ijepa_apply_masks(h, masks_pred)                       # [M*B, Kt, D], mask-major
        self._mark("target encoder")
        z = m.encoder(source, masks_enc, backend="reference")          # [B, Kc, D]
        self._mark("encoder")
        z = m.predictor(z, masks_enc, masks_pred, action=action, backend="reference")
        self._mark("predictor")
        loss_fn = F.mse_loss if m.loss_name == "l2" else F.smooth_l1_loss
        return loss_fn(z.float(), h.float())


class PackedForward(nn.Module):
    """`IWM.forward` with every op on one backend (None: automatic), as one module to compile."""

    def __init__(self, model: IWM, backend: Optional[str]):
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, source, target, masks, action):
        return self.model(source, target, masks, action, backend=self.backend)


def ijepa_ema_(target: nn.Module, online: nn.Module, m: float) -> None:
    """I-JEPA's EMA: one mul_ and one add_ per parameter."""
    with torch.no_grad():
        for q, k in zip(online.parameters(), target.parameters()):
            k.data.mul_(m).add_((1.0 - m) * q.detach().data)


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
class StepBench:
    """The model, data and masks of one StepCase, and the step of each variant."""

    def __init__(self, case: StepCase, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        preset = get_preset(case.preset)
        torch.manual_seed(seed)
        self.model = IWM.from_preset(preset).to(device)
        self.model.check_inputs = False       # as iwm.train does on GPU: no host sync for a finite check
        self.grid = preset.img_size // preset.patch_size
        self.sampler = MultiBlockMaskSampler(self.grid, context_mode="complement", min_keep=4 if self.grid < 14 else 10,
                                             seed=seed)
        self.aug_cfg = aug.AugmentConfig(out_size=preset.img_size)
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (case.batch, 3, preset.img_size, preset.img_size), generator=gen,
                               dtype=torch.uint8)
        # smooth the noise a little so the colour transforms see photo-like colours
        images = F.avg_pool2d(images.float(), 5, 1, 2).round().to(torch.uint8)
        self.host_images = images.pin_memory() if device.type == "cuda" else images
        self.shared = preset.shared_context
        # Every variant starts from these weights (each one trains the shared model as it is timed).
        self.initial_state = {k: v.clone() for k, v in self.model.state_dict().items()}

    def flops(self, variant: Variant, steps: range) -> float:
        """Mean model FLOPs of `variant`'s steps (each variant counts its own layout)."""
        total = 0.0
        for i in steps:
            masks = self.sampler.sample(self.case.batch, i)
            if variant.dataflow == "ijepa":
                enc, pred = masks.to_ijepa()
                kc, kt = enc[0].shape[1], pred[0].shape[1]
                ctx, tgt = [kc] * self.case.batch, [[kt] * len(pred)] * self.case.batch
                total += step_flops(self.model, ctx, tgt, shared=False).step
            else:
                ctx, tgt = mask_lengths(masks)
                total += step_flops(self.model, ctx, tgt, shared=self.shared).step
        return total / max(1, len(steps))

    def optimizer_for(self, variant: Variant) -> torch.optim.Optimizer:
        """Ours: the optimiser iwm.train builds (fused AdamW); the baselines: torch's default AdamW, as
        I-JEPA builds it. Same groups and hyperparameters."""
        if variant.backend is None:
            return build_optimizer(self.model, 1e-4, 0.04)
        return torch.optim.AdamW(param_groups(self.model), lr=1e-4, weight_decay=0.04)

    def make_step(self, variant: Variant, optimizer: torch.optim.Optimizer, marks: Marks
                  ) -> tuple[Callable[[int], None], Callable[[], None]]:
        """(step(i), cleanup()) for `variant`; step(i) runs training step i, marking its phases."""
        model, device, case = self.model, self.device, self.case
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16)
        backend = variant.backend
        hooks = []
        if variant.dataflow == "ijepa":
            fwd = IJEPAStyleForward(model)
            if variant.compiled:
                fwd = torch.compile(fwd, dynamic=True)
            else:
                fwd.mark = marks
        else:
            fwd = PackedForward(model, backend)
            if variant.compiled:
                fwd = torch.compile(fwd, dynamic=True)
            else:
                hooks = [model.encoder.register_forward_pre_hook(lambda *_: marks("target encoder")),
                         model.encoder.register_forward_hook(lambda *_: marks("encoder")),
                         model.predictor.register_forward_hook(lambda *_: marks("predictor"))]
        needs_action = model.conditioning != "none"

        def step(i: int) -> None:
            marks("start")
            images = self.host_images.to(device, non_blocking=True)
            params = aug.sample_view_params(case.batch, self.aug_cfg, aug.generator_for_step(0, i))
            source, target = aug.render_views(images, params, self.aug_cfg, backend=backend)
            action = aug.action_from_params(params).to(device, non_blocking=True) if needs_action else None
            marks("data/augment")
            masks = self.sampler.sample(case.batch, i)
            if variant.dataflow == "ijepa":  # I-JEPA's collator truncates on the CPU, then the copy
                enc, pred = masks.to_ijepa()
                enc = [m.to(device, non_blocking=True) for m in enc]
                pred = [m.to(device, non_blocking=True) for m in pred]
            else:
                masks = masks.to(device, non_blocking=True)
            marks("masks")
            with autocast:
                if variant.dataflow == "ijepa":
                    loss = fwd(source, target, enc, pred, action)
                else:
                    loss, _ = fwd(source, target, masks, action)
            marks("forward (compiled)" if variant.compiled else "loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            marks("backward")
            optimizer.step()
            marks("optimizer")
            if variant.dataflow == "ijepa":
                ijepa_ema_(model.target_encoder, model.encoder, MOMENTUM)
            else:
                model.update_target(MOMENTUM, backend=backend)
            marks("EMA")

        def cleanup() -> None:
            for h in hooks:
                h.remove()
            if variant.compiled:
                torch._dynamo.reset()
        return step, cleanup

    def run_variant(self, variant: Variant, progress: Callable[[str], None]) -> Row:
        case, device = self.case, self.device
        config = {"preset": case.preset, "batch": case.batch, "dtype": "bf16 autocast" if case.bf16 else "fp32",
                  "img_size": self.model.encoder.img_size, "grid": self.grid, "dataflow": variant.dataflow,
                  "backend": variant.backend or "automatic", "compiled": variant.compiled,
                  "predictor_layout": "repeated" if variant.dataflow == "ijepa" or not self.shared else "shared",
                  "warmup_steps": case.warmup, "timed_steps": case.iters}
        timed = range(case.warmup, case.warmup + case.iters)
        flops = self.flops(variant, timed)

        def row(ms: Optional[float], note: str = "", **kw) -> Row:
            return Row(SUITE, case.label, variant.name, ms, flops=flops, baseline=BASELINE, note=note, config=config,
                       headline=True, **kw)

        if time_left() <= 0 and not variant.essential:
            return row(None, "skipped: the step suite's share of the report's time budget is spent")
        if variant.compiled and case.compile_limit_s <= 0:
            return row(None, "skipped in --quick on the CPU (compiling takes minutes on a few cores)")
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
        peak = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                else _peak_rss_mb() if rss_ok else None)
        names = [p for p in PHASES if any(p in s for s in phases)]
        breakdown = {p: statistics.fmean(s.get(p, 0.0) for s in phases) for p in names}
        progress(f"  {variant.name}: {ms:.1f} ms/step, {case.batch / ms * 1e3:.1f} img/s")
        peak_key = "peak MB (allocated)" if device.type == "cuda" else "peak MB (process RSS)"
        return row(ms, extra={"img/s": case.batch / ms * 1e3, peak_key: peak, "model GFLOP/step": flops / 1e9,
                              "warm-up s" + (" incl. compile" if variant.compiled else ""): warm_s,
                              "breakdown_ms": breakdown})

    def check(self) -> Optional[str]:
        """Ours against the reference backends on one batch: the losses must agree (same model)."""
        case = self.case
        masks = self.sampler.sample(case.batch, 0).to(self.device)
        params = aug.sample_view_params(case.batch, self.aug_cfg, aug.generator_for_step(0, 0))
        images = self.host_images.to(self.device)
        action = aug.action_from_params(params).to(self.device)
        losses = {}
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=case.bf16):
            for backend in ("reference", None):
                source, target = aug.render_views(images, params, self.aug_cfg, backend=backend)
                losses[backend] = float(self.model(source, target, masks, action, backend=backend)[0])
        ref, ours = losses["reference"], losses[None]
        tol = 3e-2 if case.bf16 else 1e-3
        if abs(ours - ref) > tol * max(abs(ref), 1e-3):
            return f"MISMATCH: loss {ours:.5g} (ours) vs {ref:.5g} (reference kernels)"
        return None


def variants_for(device: torch.device, quick: bool) -> list[tuple[Variant, str]]:
    """(variant, why not run or '') in report order."""
    out = []
    for v in VARIANTS:
        why = ""
        if v.backend == "reference" and v.dataflow == "packed" and device.type == "cuda" and quick:
            why = "skipped in --quick on the GPU (per-sequence reference attention: launch-bound, seconds per step)"
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
            rows.append(Row(SUITE, case.label, "ours (fused)", None, note=problem))
        for variant, why in variants_for(device, quick):
            progress(f"step | {case.label} | {variant.name}")
            if why:
                rows.append(Row(SUITE, case.label, variant.name, None, baseline=BASELINE, note=why, headline=True))
                continue
            rows.append(bench.run_variant(variant, progress))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del bench
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows

"""EMA suite: the parameter lists of ViT-S/B/L/16 under every implementation.

Bytes per element: read target, read online, write target. Ours vs: I-JEPA's per-parameter loop,
torch._foreach_lerp_, and the loop under torch.compile.
"""
from __future__ import annotations

from typing import Callable

import torch

from iwm_kernels._backend import runs_on
from iwm_kernels.ema import reference, run_backend

from ..common import Row, time_fns, try_compile
from ..shapes import VITS, vit_params

SUITE = "ema"
MOMENTUM = 0.996


def per_parameter_loop(targets, onlines, m):
    for t, o in zip(targets, onlines):
        t.mul_(m).add_((1 - m) * o)


def foreach_lerp(targets, onlines, m):
    torch._foreach_lerp_(targets, onlines, 1 - m)


def implementations(device: torch.device) -> dict[str, tuple[Callable | None, str]]:
    impls: dict[str, tuple[Callable | None, str]] = {
        "per-parameter loop (I-JEPA)": (per_parameter_loop, ""),
        "torch._foreach_lerp_": (foreach_lerp, ""),
    }
    compiled, why = try_compile(per_parameter_loop)
    impls["loop + torch.compile"] = (compiled, why)
    for backend in ("native", "triton"):
        status = runs_on(backend, device, "ema_update_")
        if backend == "triton" and device.type == "cpu":
            status = status._replace(available=False, detail="the Triton interpreter is a correctness tool, not timed")
        fn = (lambda t, o, m, b=backend: run_backend(b, t, o, m, None)) if status.available else None
        impls[f"ours ({backend})"] = (fn, "" if status.available else status.detail)
    return impls


def configs(device: torch.device, quick: bool) -> list[tuple[str, torch.dtype]]:
    if device.type == "cuda":
        names = ["vit_base", "vit_large"] if quick else ["vit_small", "vit_base", "vit_large"]
        return [(n, d) for n in names for d in (torch.float32, torch.bfloat16)]
    names = ["vit_small", "vit_base"] if quick else ["vit_small", "vit_base", "vit_large"]
    return [(n, torch.float32) for n in names]


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    rows = []
    impls = implementations(device)
    for vit, dtype in configs(device, quick):
        targets = vit_params(VITS[vit], dtype, device, seed=0)
        onlines = vit_params(VITS[vit], dtype, device, seed=1)
        numel = sum(t.numel() for t in targets)
        nbytes = numel * 3 * targets[0].element_size()
        case = f"{vit} {str(dtype).replace('torch.', '')} ({numel / 1e6:.0f}M params, {len(targets)} tensors)"
        check = [t.clone() for t in targets]
        reference.ema_update_(check, onlines, MOMENTUM)
        progress(f"ema | {case} | {', '.join(name for name, (fn, _) in impls.items() if fn is not None)}")
        runnable = {name: (lambda f=fn: f(targets, onlines, MOMENTUM)) for name, (fn, _) in impls.items()
                    if fn is not None}
        with torch.no_grad():
            timed = time_fns(runnable, device, budget_s=0.5 if quick else 1.5)
        for name, (fn, why) in impls.items():
            ms = timed.get(name)
            if fn is None:
                rows.append(Row(SUITE, case, name, None, nbytes, note=why))
            elif isinstance(ms, BaseException):
                rows.append(Row(SUITE, case, name, None, nbytes, note=f"failed: {ms.__class__.__name__}: {ms}"[:200]))
            else:
                rows.append(Row(SUITE, case, name, ms, nbytes, baseline="per-parameter loop (I-JEPA)",
                                config={"vit": vit, "dtype": str(dtype), "numel": numel, "tensors": len(targets)},
                                headline=vit == "vit_base" and dtype == torch.float32))
        # One more correctness look on real shapes (cheap next to the timing): ours after one step.
        for backend in ("native", "triton"):
            if impls[f"ours ({backend})"][0] is not None:
                t = [x.clone() for x in vit_params(VITS[vit], dtype, device, seed=0)]
                run_backend(backend, t, onlines, MOMENTUM, None)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                bad = max(float((a.float() - b.float()).abs().max()) for a, b in zip(t, check))
                if bad > tol * 10:
                    rows.append(Row(SUITE, case, f"ours ({backend})", None, note=f"MISMATCH vs reference: {bad:.3g}"))
        del targets, onlines, check
    return rows

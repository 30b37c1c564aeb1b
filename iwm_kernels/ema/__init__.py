"""EMA parameter update: `target <- m * target + (1 - m) * online` over a whole model at once.

Public entry: `ema_update_(target, online, momentum, *, backend=None)`. The work runs inside the
custom op `iwm::ema_update_` (declared as mutating its targets, with a fake implementation), so a
compiled training step can call it without a graph break in the caller's code.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._backend import resolve_backend
from .._registry import Op, Support
from .._validate import FLOAT_DTYPES, check_momentum
from ..names import strip_wrapper_prefixes
from . import reference
from .momentum_flag import momentum_error_flag, raise_if_momentum_was_invalid, valid_or_one
from .overlap import check_no_overlap
from .plan import signature
from .version_counters import bump_versions

__all__ = ["ema_update_", "run_backend", "momentum_error_flag", "raise_if_momentum_was_invalid"]

TensorsOrModule = Union[nn.Module, Sequence[torch.Tensor]]

# Every backend runs every dtype on every device it runs on (native: C++ on the CPU, CUDA kernel on GPUs).
EMA = Op("ema_update_", {"reference": Support(), "triton": Support(), "native": Support()}, dtype_arg="target")


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: the EMA works on the local shard it is handed.
    if type(t) is torch.Tensor or type(t) is nn.Parameter:
        return t
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _module_tensors(module: nn.Module, copy_buffers: bool) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    names, params = [], []
    for name, p in module.named_parameters():
        if p.dtype.is_floating_point:
            names.append(strip_wrapper_prefixes(name))  # paired by unwrapped names
            params.append(_local(p))
    buffers = [b for _, b in module.named_buffers()] if copy_buffers else []
    return names, params, buffers


def _collect(target: TensorsOrModule, online: TensorsOrModule, copy_buffers: bool
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    if isinstance(target, nn.Module) != isinstance(online, nn.Module):
        raise TypeError("target, online: pass two nn.Modules or two sequences of tensors, not one of each")
    if isinstance(target, nn.Module):
        t_names, targets, t_bufs = _module_tensors(target, copy_buffers)
        o_names, onlines, o_bufs = _module_tensors(online, copy_buffers)
        if t_names != o_names:
            missing = sorted(set(o_names) - set(t_names))
            extra = sorted(set(t_names) - set(o_names))
            raise ValueError(f"target: parameters differ from online's (missing {missing[:3]}, extra {extra[:3]})"
                             if missing or extra else "target: parameters are in a different order than online's")
        if copy_buffers:
            if len(t_bufs) != len(o_bufs):
                raise ValueError(f"target: {len(t_bufs)} buffers, online has {len(o_bufs)}")
            with torch.no_grad():
                for tb, ob in zip(t_bufs, o_bufs):
                    tb.copy_(ob)
        return targets, onlines, t_names
    if isinstance(target, torch.Tensor) or isinstance(online, torch.Tensor):
        raise TypeError("target, online: pass sequences of tensors (e.g. [t]) or nn.Modules, not a bare tensor")
    targets = [_local(t) for t in target]
    onlines = [_local(o) for o in online]
    if len(targets) != len(onlines):
        raise ValueError(f"target: {len(targets)} tensors but online has {len(onlines)}")
    return targets, onlines, [f"[{i}]" for i in range(len(targets))]


def _validate(targets: list[torch.Tensor], onlines: list[torch.Tensor], names: list[str]) -> None:
    """Structural checks (traceable by torch.compile): types, dtypes, shapes, devices, layout."""
    device = None
    for t, o, name in zip(targets, onlines, names):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"target{name}: expected a tensor, got {type(t).__name__}")
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"online{name}: expected a tensor, got {type(o).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"target{name}: integer/bool tensors cannot be averaged (dtype {t.dtype})")
        if not o.dtype.is_floating_point:
            raise TypeError(f"online{name}: integer/bool tensors cannot be averaged (dtype {o.dtype})")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"target{name}: dtype {t.dtype} is not supported (float32, bfloat16, float16, float64)")
        if o.dtype not in FLOAT_DTYPES:
            raise TypeError(f"online{name}: dtype {o.dtype} is not supported (float32, bfloat16, float16, float64)")
        if t.shape != o.shape:
            raise ValueError(f"target{name}: shape {tuple(t.shape)} differs from online's {tuple(o.shape)}")
        if device is None:
            device = t.device
        if t.device != device:
            raise ValueError(f"target{name}: on {t.device}, but the first target is on {device}")
        if o.device != device:
            raise ValueError(f"online{name}: on {o.device}, but its target is on {device}")
        if not t.is_contiguous():
            raise ValueError(f"target{name}: must be contiguous")
        if not o.is_contiguous():
            raise ValueError(f"online{name}: must be contiguous")


def _check_concrete_momentum(momentum: float, momentum_tensor: Optional[torch.Tensor], check_values: bool) -> None:
    """Inside the op, values are concrete: a number or a checked CPU tensor is read here (no device sync;
    under torch.compile this is the first point where its value is known). A device tensor, or a CPU
    tensor with check_values=False, is left to the kernels' rule (momentum_flag)."""
    if momentum_tensor is None:
        value = momentum
    elif momentum_tensor.device.type == "cpu" and check_values:
        value = float(momentum_tensor)
    else:
        return
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"momentum: must be finite and within [0, 1], got {value}")


# Signatures (plan.signature: pointer, dtype, shape and strides of every tensor) of tensor sets that passed
# every check: the checks read nothing else, so a hit means they would pass again.
_validated: dict[tuple, None] = {}


@torch.library.custom_op("iwm::ema_update_", mutates_args=("targets",), device_types=None)
def _ema_update_op(targets: list[torch.Tensor], onlines: list[torch.Tensor], momentum: float,
                   momentum_tensor: Optional[torch.Tensor], backend: str, check_values: bool = True) -> None:
    _check_concrete_momentum(momentum, momentum_tensor, check_values)
    check_no_overlap(targets, onlines)
    with torch.no_grad():
        run_backend(backend, targets, onlines, momentum, momentum_tensor)


@_ema_update_op.register_fake
def _(targets, onlines, momentum, momentum_tensor, backend, check_values=True) -> None:
    return None


@EMA.implementation("reference")
def _reference(targets, onlines, momentum, momentum_tensor, key):
    reference.ema_update_(targets, onlines, momentum, momentum_tensor)  # no launch plan to reuse


@EMA.implementation("triton")
def _triton(targets, onlines, momentum, momentum_tensor, key):
    from . import triton_kernels  # imported on first use: `import iwm_kernels` never needs triton

    triton_kernels.ema_update_(targets, onlines, momentum, momentum_tensor, key)


@EMA.implementation("native")
def _native(targets, onlines, momentum, momentum_tensor, key):
    from . import native

    native.ema_update_(targets, onlines, momentum, momentum_tensor, key)


def run_backend(backend: str, targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor],
                momentum: float, momentum_tensor: Optional[torch.Tensor], key: Optional[tuple] = None) -> None:
    """Run one named backend on validated inputs (benchmarks call this directly)."""
    EMA.impl(backend)(targets, onlines, momentum, momentum_tensor, key)
    bump_versions(targets)


def ema_update_(target: TensorsOrModule, online: TensorsOrModule, momentum: Union[float, torch.Tensor], *,
                backend: Optional[str] = None, copy_buffers: bool = False, check_values: bool = True) -> None:
    """In place, for every floating-point parameter pair: `t <- m * t + (1 - m) * o`.

    target, online: two nn.Modules (parameters paired by name, wrapper prefixes such as `module.`
        ignored), or two equally long sequences of tensors. Mixed fp32/bf16/fp16/fp64 lists are fine;
        arithmetic is fp64 when either tensor of a pair is fp64, else fp32, rounded once into the
        target's dtype. The form t*m + o*(1-m) stays finite for finite inputs (also near the fp32
        maximum); m == 1 leaves a target bit-identical, m == 0 makes it equal to its online tensor.
        No target may share a byte with another target or with any online tensor (ValueError).
    momentum: a float in [0, 1], or a 0-dim floating tensor. A Python number or a CPU tensor is
        checked on the host (eagerly, or when the compiled op runs): not finite or outside [0, 1]
        raises ValueError before any target changes. A tensor on the GPU is read only by the kernel
        (no host sync, so a schedule can live in a CUDA graph or a compiled region): an invalid value
        leaves every target unchanged and sets a per-device flag; `raise_if_momentum_was_invalid(device)`
        reads it (one sync) and raises ValueError.
    backend: "reference" | "triton" | "native"; default from IWM_KERNELS_BACKEND, else automatic.
    copy_buffers: also copy module buffers (BatchNorm statistics...) from online to target.
    check_values: False treats a CPU momentum tensor like a device one: read only by the kernel (no
        host read: a training step computes it from its skip flag, valid by construction); an invalid
        value then leaves every target unchanged and sets the CPU's momentum error flag.

    Every backend bumps the targets' version counters, so a target saved for a pending backward
    makes that backward raise autograd's "modified by an inplace operation" error.
    """
    targets, onlines, names = _collect(target, online, copy_buffers)
    if not targets:
        return
    compiling = torch.compiler.is_compiling()
    key = None if compiling else signature(targets, onlines)
    if key is None or key not in _validated:
        _validate(targets, onlines, names)
    device = targets[0].device
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
    value, tensor = check_momentum(momentum, "momentum", device, check_values=check_values)
    if tensor is not None and not check_values and tensor.device.type == "cpu":
        tensor = valid_or_one(tensor)  # read by no one on the host: the device rule, as tensor ops
    chosen = resolve_backend(backend, device, EMA.name)
    if compiling:
        _ema_update_op([t.detach() for t in targets], [o.detach() for o in onlines], value, tensor, chosen,
                       check_values)
        return
    # Eager: skip the custom-op wrapper (hundreds of microseconds for a few hundred tensors) and the
    # checks already passed by this exact set of tensors.
    if key is None or key not in _validated:
        check_no_overlap(targets, onlines)
        if key is not None:
            _validated[key] = None
        while len(_validated) > 16:
            _validated.pop(next(iter(_validated)))
    with torch.no_grad():
        run_backend(chosen, targets, onlines, value, tensor, key)

"""EMA parameter update: `target <- m * target + (1 - m) * online` over a whole model at once.

Public entry: `ema_update_(target, online, momentum, *, backend=None)`. The work runs inside the
custom op `iwm::ema_update_` (declared as mutating its targets, with a fake implementation), so a
compiled training step can call it without a graph break in the caller's code.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .._backend import resolve_backend
from .._validate import check_momentum
from . import reference
from .plan import signature

TensorsOrModule = Union[nn.Module, Sequence[torch.Tensor]]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _strip(name: str) -> str:
    # DDP / torch.compile / FSDP wrappers add prefixes; pair parameters by their unwrapped names.
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
            name = name.replace("." + prefix, ".")
    return name


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
            names.append(_strip(name))
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


def _check_no_aliasing(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor]) -> None:
    """Memory checks, run inside the op (on real tensors, also under torch.compile)."""
    online_storages = {o.untyped_storage().data_ptr() for o in onlines if o.numel()}
    seen: dict[int, int] = {}
    for i, t in enumerate(targets):
        if not t.numel():
            continue
        if t.untyped_storage().data_ptr() in online_storages:
            raise ValueError(f"target[{i}]: shares storage with an online tensor (target and online alias)")
        if t.data_ptr() in seen:
            raise ValueError(f"target[{i}]: the same memory as target[{seen[t.data_ptr()]}] (listed twice)")
        seen[t.data_ptr()] = i


# Signatures (plan.signature: pointer, size and dtype of every tensor) of tensor sets that passed every
# check: a hit means the same memory read the same way, so the checks would pass again.
_validated: dict[tuple, None] = {}


@torch.library.custom_op("iwm::ema_update_", mutates_args=("targets",), device_types=None)
def _ema_update_op(targets: list[torch.Tensor], onlines: list[torch.Tensor], momentum: float,
                   momentum_tensor: Optional[torch.Tensor], backend: str) -> None:
    _check_no_aliasing(targets, onlines)
    with torch.no_grad():
        run_backend(backend, targets, onlines, momentum, momentum_tensor)


@_ema_update_op.register_fake
def _(targets, onlines, momentum, momentum_tensor, backend) -> None:
    return None


def run_backend(backend: str, targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor],
                momentum: float, momentum_tensor: Optional[torch.Tensor], key: Optional[tuple] = None) -> None:
    """Run one named backend on validated inputs (benchmarks call this directly)."""
    if backend == "reference":
        reference.ema_update_(targets, onlines, momentum, momentum_tensor)
    elif backend == "triton":
        from . import triton_kernels

        triton_kernels.ema_update_(targets, onlines, momentum, momentum_tensor, key)
    elif backend == "native":
        from . import native

        native.ema_update_(targets, onlines, momentum, momentum_tensor, key)
    else:
        raise ValueError(f"backend: unknown backend {backend!r}")


def ema_update_(target: TensorsOrModule, online: TensorsOrModule, momentum: Union[float, torch.Tensor], *,
                backend: Optional[str] = None, copy_buffers: bool = False) -> None:
    """In place, for every floating-point parameter pair: `t <- m * t + (1 - m) * o`.

    target, online: two nn.Modules (parameters paired by name, wrapper prefixes such as `module.`
        ignored), or two equally long sequences of tensors. Mixed fp32/bf16/fp16 lists are fine;
        arithmetic is fp32, rounded once into each target's dtype.
    momentum: a float in [0, 1], or a 0-dim tensor (its value is read on the device, so a schedule
        can live inside a CUDA graph or a compiled region).
    backend: "reference" | "triton" | "native"; default from IWM_KERNELS_BACKEND, else automatic.
    copy_buffers: also copy module buffers (BatchNorm statistics...) from online to target.
    """
    targets, onlines, names = _collect(target, online, copy_buffers)
    if not targets:
        return
    compiling = torch.compiler.is_compiling()
    key = None if compiling else signature(targets, onlines)
    if key is None or key not in _validated:
        _validate(targets, onlines, names)
    device = targets[0].device
    value, tensor = check_momentum(momentum, "momentum", device)
    chosen = resolve_backend(backend, device, "ema_update_")
    if compiling:
        _ema_update_op([t.detach() for t in targets], [o.detach() for o in onlines], value, tensor, chosen)
        return
    # Eager: skip the custom-op wrapper (hundreds of microseconds for a few hundred tensors) and the
    # checks already passed by this exact set of tensors.
    if key not in _validated:
        _check_no_aliasing(targets, onlines)
        _validated[key] = None
        while len(_validated) > 16:
            _validated.pop(next(iter(_validated)))
    with torch.no_grad():
        run_backend(chosen, targets, onlines, value, tensor, key)

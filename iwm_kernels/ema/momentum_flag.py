"""What happens to a momentum tensor whose value can only be read on the device.

A momentum tensor on a GPU is read by the kernel, never by the host (a host read is a sync per step, and
breaks CUDA-graph capture). Design choice, as in PyTorch's fused optimizers with `found_inf`: a value
that is not finite or outside [0, 1] makes the kernel skip the update (every target keeps its value) and
set a sticky per-device int32 flag. Reading the flag is the caller's choice of sync point:
`raise_if_momentum_was_invalid(device)` raises ValueError (and clears it) when an update was skipped.
A device-side assert was rejected: it would poison the whole CUDA context.

Python numbers and CPU momentum tensors are checked on the host instead (also inside the compiled op):
a bad one raises ValueError before anything runs. The exception is a CPU tensor passed with
`check_values=False` (a training step's momentum, computed from its skip flag): it follows the rule
above, with the CPU's flag.
"""
from __future__ import annotations

from typing import Union

import torch

_flags: dict[torch.device, torch.Tensor] = {}


def _normalize(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def momentum_error_flag(device: Union[str, torch.device]) -> torch.Tensor:
    """The int32 [1] flag on `device` that kernels set to 1 when they skipped an update."""
    device = _normalize(device)
    flag = _flags.get(device)
    if flag is None:
        flag = _flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return flag


def valid_or_one(m: torch.Tensor) -> torch.Tensor:
    """The rule above with tensor ops, for an unchecked CPU momentum tensor (check_values=False) before
    any backend sees it (the native CPU op raises on a bad value instead): a value not finite or outside
    [0, 1] becomes 1 (every target unchanged) and sets the flag. Nothing is read on the host."""
    valid = (m >= 0) & (m <= 1)  # False for NaN
    flag = momentum_error_flag(m.device)
    flag.copy_(flag | ~valid)
    return torch.where(valid, m, torch.ones_like(m))


def raise_if_momentum_was_invalid(device: Union[str, torch.device]) -> None:
    """Read the flag (one host sync) and raise ValueError if an update on `device` was skipped."""
    flag = _flags.get(_normalize(device))
    if flag is not None and int(flag.item()):
        flag.zero_()
        raise ValueError("momentum: a momentum tensor read on the device was not finite or outside [0, 1]; "
                         "those ema_update_ calls left every target unchanged")

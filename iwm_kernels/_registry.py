"""The backend registry: the backends, what each can run on in this process, what each op's backends
have code for (device types, dtypes), and, for anything that cannot run, the reasons in words (a list,
as xformers' `not_supported_reasons`). Which backend a call gets is _backend's job; this module answers
"can it run, and if not, why not", and holds each op's implementations so that a call dispatches by
looking its backend up instead of an if/elif per family.

Two levels of reasons:
  the backend's  (environment): triton not importable, no TRITON_INTERPRET for CPU tensors, the native
                 extension not built, or built without CUDA;
  the op's       (code): the op has no code of that backend for the device type (gather's and
                 photometric's native code is CPU only), or not for the dtype (Triton attention).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ._availability import Availability

Device = Union[str, torch.device]


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- the backends and their environment ------------------------------------------------------------------

def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_status: Optional[Availability] = None


def triton_status() -> Availability:
    """Whether `import triton` works here (cached; never raises)."""
    global _triton_status
    if _triton_status is None:
        try:
            import triton  # noqa: F401

            _triton_status = Availability(True, f"triton {triton.__version__}")
        except Exception as exc:  # ImportError, or a broken install
            text = " ".join(str(exc).split())  # one line
            _triton_status = Availability(False, f"triton is not importable ({exc.__class__.__name__}: {text}); "
                                                 "pip install triton", (f"triton is not importable ({text})",))
    return _triton_status


def _triton_reasons(device: torch.device) -> list[str]:
    status = triton_status()
    if not status.available:
        return [status.detail]
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        if triton_interpreter_enabled():
            return []
        return [f"{status.detail} runs CPU tensors only under TRITON_INTERPRET=1, set before triton is imported"]
    return [f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not {device.type} tensors"]


def _native_reasons(device: torch.device) -> list[str]:
    from . import _native  # builds the extension on first use (cached)

    status = _native.status()
    if not status.available:
        return [status.detail]
    if device.type == "cpu":
        return []
    if device.type == "cuda":
        return [] if _native.built_with_cuda() else [
            "the native extension was built without CUDA (no CUDA torch or no nvcc)"]
    return [f"the native extension has no code for {device.type} tensors"]


def _native_summary() -> str:
    from . import _native

    return _native.status().detail


@dataclass(frozen=True)
class Backend:
    name: str
    summary: Callable[[], str]                      # what it is here (for available_backends)
    reasons: Callable[[torch.device], list[str]]    # why it cannot run on such tensors here ([]: it can)


_BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", lambda: "eager PyTorch", lambda device: []),
    Backend("triton", lambda: triton_status().detail, _triton_reasons),
    Backend("native", _native_summary, _native_reasons),
)}
BACKENDS = tuple(_BACKENDS)


def backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _BACKENDS[name]


# ---- what each op's backends have code for ----------------------------------------------------------------

@dataclass(frozen=True)
class Support:
    """What one backend of one op has code for. None: no limit beyond the backend's own."""
    devices: Optional[tuple[str, ...]] = None        # device types
    dtypes: Optional[tuple[torch.dtype, ...]] = None  # of the op's `dtype_arg` tensor
    hint: str = ""                                   # what to use instead, appended to a reason


class Op:
    """One op: its backends' support, and its implementations by (backend, entry point).

    A family module makes one, registers each backend's functions with `@OP.implementation(name)`
    (entry "forward" unless named: "backward", ...), and dispatches with `OP.impl(name, entry)(...)`.
    """

    def __init__(self, name: str, support: dict[str, Support], dtype_arg: str = "x", register: bool = True):
        unknown = set(support) - set(BACKENDS)
        if unknown:
            raise ValueError(f"support: unknown backend(s) {sorted(unknown)} for {name}")
        self.name, self.support, self.dtype_arg = name, dict(support), dtype_arg
        self._impls: dict[tuple[str, str], Callable] = {}
        if register:
            _OPS[name] = self

    def implementation(self, backend_name: str, entry: str = "forward") -> Callable[[Callable], Callable]:
        if backend_name not in self.support:
            raise ValueError(f"backend: {backend_name!r} is not a backend of {self.name}")

        def register(fn: Callable) -> Callable:
            self._impls[(backend_name, entry)] = fn
            return fn
        return register

    def impl(self, backend_name: str, entry: str = "forward") -> Callable:
        fn = self._impls.get((backend_name, entry))
        if fn is None:
            raise ValueError(f"backend: unknown backend {backend_name!r} for {self.name} "
                             f"(choose one of {', '.join(b for b, e in self._impls if e == entry)})")
        return fn

    def code_reasons(self, backend_name: str, device_type: str) -> list[str]:
        """Why this op has no code of `backend_name` for `device_type` tensors ([]: it has)."""
        s = self.support.get(backend_name)
        if s is None:
            return [f"{self.name} has no {backend_name} backend"]
        if s.devices is not None and device_type not in s.devices:
            hint = f" ({s.hint})" if s.hint else ""
            return [f"{self.name} has no {backend_name} code for {device_type} tensors{hint}"]
        return []

    def dtype_reasons(self, backend_name: str, dtype: Optional[torch.dtype]) -> list[str]:
        s = self.support.get(backend_name)
        if s is None or s.dtypes is None or dtype is None or dtype in s.dtypes:
            return []
        hint = f"; {s.hint}" if s.hint else ""
        return [f"{self.dtype_arg}: dtype {_short(dtype)} is not supported by the {backend_name} backend of "
                f"{self.name} ({', '.join(map(_short, s.dtypes))}{hint})"]

    def not_supported_reasons(self, backend_name: str, device: Device, dtype: Optional[torch.dtype] = None
                              ) -> list[str]:
        """Every reason `backend_name` cannot run this op on `device` (`dtype`) tensors here; [] when it can."""
        device = torch.device(device)
        return (self.code_reasons(backend_name, device.type) + self.dtype_reasons(backend_name, dtype)
                + backend(backend_name).reasons(device))


_OPS: dict[str, Op] = {}
# What a name no family registered gets: every backend, limited only by its environment.
_ANY_OP = Op("op", {b: Support() for b in BACKENDS}, register=False)


def op(name: str) -> Op:
    """The registered op `name` (an unregistered name gets no limits beyond each backend's own)."""
    return _OPS.get(name, _ANY_OP)


def ops() -> tuple[str, ...]:
    """The registered op names (importing iwm_kernels registers every family's)."""
    return tuple(_OPS)


def not_supported_reasons(op_name: str, backend_name: str, device: Device, dtype: Optional[torch.dtype] = None
                          ) -> list[str]:
    """Why `backend_name` cannot run the op `op_name` ("gather_tokens", "apply_masks", "varlen_attention",
    "ema_update_", "photometric") on `device` tensors (of `dtype`, where the op's backends limit it)
    in this process, one reason per entry; [] when it can. Asking about `native` builds the extension
    on first use."""
    if op_name not in _OPS:
        raise ValueError(f"op_name: unknown op {op_name!r}; choose one of {', '.join(_OPS)}")
    backend(backend_name)  # a clear error for an unknown name
    return _OPS[op_name].not_supported_reasons(backend_name, device, dtype)

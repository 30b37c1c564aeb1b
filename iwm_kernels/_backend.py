"""Backend names, what can run here, and which backend a call uses.

Three backends implement every op:
  reference  eager PyTorch written for clarity (the one tests and benchmarks compare to);
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
  native     C++ (CPU, OpenMP via at::parallel_for) and CUDA, built just in time from csrc/.

Choice, in order: the per-call `backend=` argument, then the innermost `use_backend(name)` block, then
the IWM_KERNELS_BACKEND environment variable, then the automatic default (triton on CUDA tensors, native on CPU tensors, reference otherwise).
An automatic choice that cannot run here falls back to the reference and warns once; an explicit
choice that cannot run raises.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional

import torch

from ._availability import Availability, warn_once  # noqa: F401  (re-exported)

BACKENDS = ("reference", "triton", "native")
ENV_VAR = "IWM_KERNELS_BACKEND"


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
            _triton_status = Availability(False, f"triton is not importable ({exc.__class__.__name__}: {exc}); "
                                                 "pip install triton")
    return _triton_status


def triton_runs_on(device: torch.device) -> Availability:
    status = triton_status()
    if not status.available:
        return status
    if device.type == "cuda":
        return status
    if device.type == "cpu" and triton_interpreter_enabled():
        return Availability(True, status.detail + " (interpreter)")
    return Availability(False, f"{status.detail} is installed, but runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 "
                               f"set before triton is imported (got {device.type} tensors)")


def native_runs_on(device: torch.device) -> Availability:
    from . import _native

    status = _native.status()
    if not status.available:
        return status
    if device.type == "cpu":
        return status
    if device.type == "cuda":
        if _native.built_with_cuda():
            return status
        return Availability(False, "the native extension was built without CUDA (no CUDA torch or no nvcc)")
    return Availability(False, f"no native code for {device.type} tensors")


def runs_on(backend: str, device: torch.device) -> Availability:
    if backend == "reference":
        return Availability(True, "eager PyTorch")
    if backend == "triton":
        return triton_runs_on(device)
    if backend == "native":
        return native_runs_on(device)
    raise ValueError(_unknown(backend, "backend"))


def _unknown(name: object, source: str) -> str:
    return f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"


# The innermost use_backend() choice: a ContextVar, so each thread (and asyncio task) has its own and
# a block never leaks into another thread's calls, unlike writing os.environ.
_AUTO = "auto"
_scoped_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("iwm_kernels_backend", default=None)


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Within the block, calls without a `backend=` argument use `name` ("reference", "triton",
    "native"; "auto" for the automatic choice, ignoring IWM_KERNELS_BACKEND; None changes nothing).

    A torch.compile trace made inside the block bakes the block's choice into the compiled code (like
    every backend decision made while tracing): enter the block before the first compiled call."""
    if name is not None and name != _AUTO and name not in BACKENDS:
        raise ValueError(_unknown(name, "use_backend: name"))
    if name is None:
        yield
        return
    token = _scoped_backend.set(name)
    try:
        yield
    finally:
        _scoped_backend.reset(token)


@torch.compiler.assume_constant_result
def _scoped_choice_while_tracing() -> str:
    # Dynamo does not trace ContextVar reads: it runs this eagerly and keeps the answer as a constant.
    return _scoped_backend.get() or ""


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicit choice (argument, else use_backend block, else environment), validated; None means
    automatic."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(_unknown(backend, "backend"))
        return backend
    scoped = _scoped_choice_while_tracing() if torch.compiler.is_compiling() else _scoped_backend.get()
    if scoped:
        return None if scoped == _AUTO else scoped
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in BACKENDS:
        raise ValueError(_unknown(env, ENV_VAR))
    return env


def resolve_backend(backend: Optional[str], device: torch.device, op: str,
                    native_devices: tuple[str, ...] = ("cpu", "cuda")) -> str:
    """The backend that runs `op` on `device` tensors.

    Explicit choices that cannot run here raise (the user asked for something specific); the automatic
    choice degrades to the reference with a one-time warning. `native_devices` lists the device types
    the op has native code for (an op whose GPU path is Triton only passes ("cpu",)). The environment
    is read on every call; the decision for it is cached, because what can run does not change within
    a process and the checks behind it cost more than a small op.
    """
    args = (requested_backend(backend), device.type, op, tuple(native_devices))
    if torch.compiler.is_compiling():
        return _resolve_while_tracing(*args)
    return _resolve(*args)


@torch.compiler.assume_constant_result
def _resolve_while_tracing(explicit: Optional[str], device_type: str, op: str, native_devices: tuple[str, ...]) -> str:
    # The first call in a process may come from inside a torch.compile trace, and what can run is found
    # out by importing triton and building the native extension under a lock: nothing dynamo can trace.
    # Dynamo runs this function eagerly instead and bakes its answer into the graph as a constant (the
    # answer cannot change within a process).
    return _resolve(explicit, device_type, op, native_devices)


@functools.lru_cache(maxsize=512)
def _resolve(explicit: Optional[str], device_type: str, op: str, native_devices: tuple[str, ...]) -> str:
    device = torch.device(device_type)
    if explicit is not None:
        if explicit == "native" and device.type not in native_devices:
            raise RuntimeError(f"{op}: backend 'native' cannot run here: {op} has no native code for "
                               f"{device.type} tensors (use triton)")
        status = runs_on(explicit, device)
        if not status.available:
            raise RuntimeError(f"{op}: backend {explicit!r} cannot run here: {status.detail}")
        return explicit
    preferred = "triton" if device.type == "cuda" else "native" if device.type == "cpu" else "reference"
    if preferred == "reference":
        return "reference"
    status = runs_on(preferred, device)
    if status.available:
        return preferred
    if device.type == "cuda" and "cuda" in native_devices:  # triton missing: the native CUDA op is next best
        native = native_runs_on(device)
        if native.available:
            warn_once(f"fallback:{preferred}:{device.type}",
                      f"iwm_kernels: {preferred} unavailable ({status.detail}); using the native backend")
            return "native"
    warn_once(f"fallback:{preferred}:{device.type}",
              f"iwm_kernels: {preferred} backend unavailable on {device.type} ({status.detail}); "
              f"using the reference backend")
    return "reference"


def available_backends() -> dict[str, Availability]:
    """What can run here, and for what cannot, why.

    Asking about `native` builds the extension on first use (cached afterwards), so the answer is true.
    """
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    out = {}
    for name in BACKENDS:
        status = runs_on(name, torch.device("cpu"))
        if cuda is not None:
            on_cuda = runs_on(name, cuda)
            if on_cuda.available and not status.available:
                status = Availability(True, on_cuda.detail + f" (CUDA only; CPU: {status.detail})")
            elif on_cuda.available:
                status = Availability(True, on_cuda.detail + " (CPU and CUDA)")
        out[name] = status
    return out

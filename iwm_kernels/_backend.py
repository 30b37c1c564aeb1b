"""Which backend a call uses.

Three backends implement every op:
  reference  eager PyTorch written for clarity (the one tests and benchmarks compare to);
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1;
  native     C++ (CPU, OpenMP via at::parallel_for) and CUDA, built just in time from csrc/.
What each can run, per op, device type and dtype, and why not, is the registry's (_registry.py).

Choice, in order: the per-call `backend=` argument, then the innermost `use_backend(name)` block, then
the IWM_KERNELS_BACKEND environment variable (read, never written), then the automatic default (the
first of AUTO_ORDER that can run: triton, then native, on CUDA tensors; native on CPU tensors; else
the reference). An automatic choice whose best backend is missing here warns once; an explicit choice
that cannot run raises with the registry's reasons.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Optional

import torch

from ._availability import Availability, warn_once
from ._registry import BACKENDS, backend as _backend_entry, op as _op

ENV_VAR = "IWM_KERNELS_BACKEND"
# The automatic choice per device type, best first; the reference ends every list.
AUTO_ORDER = {"cuda": ("triton", "native"), "cpu": ("native",)}


class BackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot run the call here; `reasons` lists why, one per entry."""

    def __init__(self, op: str, backend: str, reasons: list[str]):
        super().__init__(f"{op}: backend {backend!r} cannot run here: {'; '.join(reasons)}")
        self.op, self.backend, self.reasons = op, backend, list(reasons)

    def __reduce__(self):  # picklable (errors cross process boundaries: loader workers, spawn)
        return type(self), (self.op, self.backend, self.reasons)


class UnsupportedDtype(TypeError):
    """An explicitly chosen backend has no code for the input's dtype; `reasons` says which and what it takes."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)

    def __reduce__(self):
        return type(self), (self.reasons,)


def runs_on(backend: str, device: torch.device, op: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> Availability:
    """Whether `backend` can run on `device` tensors here (for `op`, of `dtype`, when given), with the
    reasons when not."""
    reasons = _op(op or "").not_supported_reasons(_checked(backend, "backend"), device, dtype)
    if reasons:
        return Availability(False, "; ".join(reasons), tuple(reasons))
    return Availability(True, _backend_entry(backend).summary())


def _unknown(name: object, source: str) -> str:
    return f"{source}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"


def _checked(name: object, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(_unknown(name, source))
    return name  # type: ignore[return-value]


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


def applies_backend(forward):
    """For a module's forward(..., *, backend=None, ...): a backend given to the call also holds, as a
    use_backend block, for what inside it takes no backend argument (`iwm_kernels.linear`). Inside a
    torch.compile trace the call runs as it is (a trace keeps the block entered outside it)."""
    @functools.wraps(forward)
    def wrapper(*args, backend: Optional[str] = None, **kwargs):
        if backend is None or torch.compiler.is_compiling():
            return forward(*args, backend=backend, **kwargs)
        with use_backend(backend):
            return forward(*args, backend=backend, **kwargs)
    return wrapper


@torch.compiler.assume_constant_result
def _scoped_choice_while_tracing() -> str:
    # Dynamo does not trace ContextVar reads: it runs this eagerly and keeps the answer as a constant.
    return _scoped_backend.get() or ""


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The explicit choice (argument, else use_backend block, else environment), validated; None means
    automatic."""
    if backend is not None:
        return _checked(backend, "backend")
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
                    dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs `op` on `device` tensors (`dtype`: of the op's main input, for the ops
    whose backends limit it).

    An explicit choice that cannot run here raises, listing the registry's reasons (BackendUnavailable;
    UnsupportedDtype, a TypeError, when the dtype is the only one). The automatic choice takes the first
    of AUTO_ORDER for the device that can run, else the reference, and warns once when the first was
    skipped because this process lacks it (not installed, not built). The environment variable is read
    on every call; the decision is cached, because what can run does not change within a process and the
    checks behind it cost more than a small op.
    """
    args = (requested_backend(backend), device.type, op, dtype)
    if torch.compiler.is_compiling():
        return _resolve_while_tracing(*args)
    return _resolve(*args)


@torch.compiler.assume_constant_result
def _resolve_while_tracing(explicit: Optional[str], device_type: str, op: str, dtype: Optional[torch.dtype]) -> str:
    # The first call in a process may come from inside a torch.compile trace, and what can run is found
    # out by importing triton and building the native extension under a lock: nothing dynamo can trace.
    # Dynamo runs this function eagerly instead and bakes its answer into the graph as a constant (the
    # answer cannot change within a process).
    return _resolve(explicit, device_type, op, dtype)


@functools.lru_cache(maxsize=512)
def _resolve(explicit: Optional[str], device_type: str, op: str, dtype: Optional[torch.dtype]) -> str:
    spec, device = _op(op), torch.device(device_type)
    if explicit is not None:
        reasons = spec.not_supported_reasons(explicit, device, dtype)
        if reasons and reasons == spec.dtype_reasons(explicit, dtype):
            raise UnsupportedDtype(reasons)
        if reasons:
            raise BackendUnavailable(op, explicit, reasons)
        return explicit
    order = AUTO_ORDER.get(device_type, ())
    chosen = next((name for name in order if not spec.not_supported_reasons(name, device, dtype)), "reference")
    missing = _backend_entry(order[0]).reasons(device) if order and chosen != order[0] else []
    if missing:  # the best backend for the device is absent from this process: say so, once
        warn_once(f"fallback:{order[0]}:{device_type}:{chosen}",
                  f"iwm_kernels: {order[0]} backend unavailable on {device_type} ({'; '.join(missing)}); "
                  f"using the {chosen} backend")
    return chosen


def available_backends() -> dict[str, Availability]:
    """What can run here, and for what cannot, why (`reasons`: one per entry).

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

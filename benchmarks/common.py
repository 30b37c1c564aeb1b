"""Timing, hardware ceilings and result rows shared by every benchmark suite.

Timing: on CUDA, triton.testing.do_bench when triton is present (median of CUDA-event timings, caches
flushed, warm-up excluded), else CUDA events here; on CPU, a perf_counter loop with warm-up, median.
Ceilings are measured in the same process: a large device-to-device copy (bytes moved per second) and
a large matmul (bf16 on GPU, fp32 on CPU). Every row reports the fraction of the matching ceiling.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import torch

from iwm_kernels.gemm import linear, onednn_available


# Row.extra key: our row's speedup measured taking turns step by step with its baseline (the step
# suite writes it, the report's headline shows it).
TAKING_TURNS = "speedup vs the baseline, taking turns"


@dataclass
class Row:
    suite: str                    # "ema", "gather", "attention", ...
    case: str                     # shape/config label, e.g. "vit_base fp32"
    impl: str                     # "ours (native)", "per-parameter loop", ...
    ms: Optional[float]           # median milliseconds; None when the impl could not run
    bytes: Optional[float] = None  # bytes a memory-bound op must move (for GB/s)
    flops: Optional[float] = None  # useful FLOPs of a compute-bound op (for TFLOP/s)
    baseline: Optional[str] = None  # the impl this row's speedup is relative to
    note: str = ""               # why an impl did not run, or anything unusual
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # per-suite figures (img/s, peak memory, ...)
    headline: bool = False        # this row's case is the suite's representative one (report headline)
    same_work: bool = True        # computes what the baseline computes; False for a row that changes the
                                  # work (shared-context attention, ragged masks): never the headline's "ours"
    differs: str = ""             # with same_work=False: what the row changes against the baseline
    held_equal: str = ""          # what this row holds equal to its baseline (shown in the headline)

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes / self.ms / 1e6 if self.ms and self.bytes else None

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.ms / 1e9 if self.ms and self.flops else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gbps"], d["tflops"] = self.gbps, self.tflops
        return d


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: Optional[int] = None,
            budget_s: float = 1.0) -> float:
    """Median wall time of fn() in milliseconds."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=max(50, int(budget_s * 400)), return_mode="median"))
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(device)
        times = []
        n = reps or 20
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while (reps is None and (len(times) < 3 or time.perf_counter() < deadline)) or (reps is not None and len(times) < reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if reps is None and len(times) >= 200:
            break
    return statistics.median(times)


def time_fns(fns: dict[str, Callable[[], object]], device: torch.device, *, budget_s: float = 1.0,
             passes: int = 3) -> dict[str, object]:
    """Times several implementations of one case against each other: name -> median ms, or the
    exception that fn raised. On a shared CPU, neighbours' load comes and goes over seconds, so timing
    A fully and then B measures the machine as much as A and B. Here the implementations take turns in
    `passes` passes (A B C A B C ...), each turn a median over budget_s / passes, and each keeps its
    best turn: every implementation gets the same chances at a quiet period. On a GPU (its own device,
    do_bench flushes caches) one pass is enough."""
    passes = 1 if device.type == "cuda" else max(1, passes)
    out: dict[str, object] = {}
    for _ in range(passes):
        for name, fn in fns.items():
            if isinstance(out.get(name), BaseException):
                continue
            try:
                ms = time_fn(fn, device, warmup=1 if name in out else 3, budget_s=budget_s / passes)
            except Exception as exc:  # noqa: BLE001 - reported as a row by the caller
                out[name] = exc
                continue
            out[name] = min(ms, out.get(name, float("inf")))
    return out


@dataclass
class Ceilings:
    copy_gbps: float     # bytes read + written per second by a large copy
    matmul_tflops: float  # dense matmul rate (bf16 on CUDA, fp32 on CPU)
    matmul_dtype: str
    matmul_engine: str = "ATen"  # the faster GEMM engine on the CPU ("ATen" = MKL there, or "oneDNN")


def measure_ceilings(device: torch.device, quick: bool = False) -> Ceilings:
    n = (1 << 26) if device.type == "cuda" else (1 << 24 if quick else 1 << 25)  # fp32 elements
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, budget_s=0.5 if quick else 1.0)
    copy_gbps = 2 * n * 4 / ms / 1e6
    if device.type == "cuda":
        dtype, size = torch.bfloat16, 8192
    else:
        dtype, size = torch.float32, 1024 if quick else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, device, budget_s=0.5 if quick else 1.0)
    engine = "ATen"
    if device.type == "cpu" and onednn_available():
        # The faster of torch's two CPU GEMM engines is the machine's ceiling (MKL's sgemm runs AVX2
        # kernels on AMD CPUs, oneDNN AVX-512): otherwise our oneDNN rows would pass 100 %.
        bt = b.t().contiguous()
        onednn_ms = time_fn(lambda: linear(a, bt), device, budget_s=0.5 if quick else 1.0)
        if onednn_ms < ms:
            ms, engine = onednn_ms, "oneDNN"
    return Ceilings(copy_gbps, 2 * size**3 / ms / 1e9, str(dtype).replace("torch.", ""), engine)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _version(module: str) -> Optional[str]:
    """The module's version, or None (with the reason) when it does not import; never raises."""
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception as exc:
        return f"not importable ({exc.__class__.__name__})"


def _git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    import iwm_kernels

    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "iwm": iwm_kernels.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "xformers": _version("xformers"),
        "flash_attn": _version("flash_attn"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backends": {k: v.detail for k, v in iwm_kernels.available_backends().items()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_capability=f"{props.major}.{props.minor}", gpu_memory_gb=props.total_memory / 1e9,
                   gpu_sms=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    return env


def try_compile(fn: Callable, **kwargs) -> tuple[Optional[Callable], str]:
    """torch.compile(fn), or None with the reason when compile is unavailable here."""
    try:
        return torch.compile(fn, **kwargs), ""
    except Exception as exc:  # pragma: no cover - depends on the install
        return None, f"torch.compile unavailable: {exc.__class__.__name__}: {exc}"


# ---- time budget -------------------------------------------------------------------------------------
# `python -m benchmarks.report --time-budget S` gives each suite a deadline; suites with optional,
# expensive parts (torch.compile, extra configurations) ask time_left() before starting them.
_deadline: Optional[float] = None


def set_deadline(seconds_from_now: Optional[float]) -> None:
    global _deadline
    _deadline = None if seconds_from_now is None else time.monotonic() + seconds_from_now


def time_left() -> float:
    """Seconds until the current suite's deadline (infinite without a budget)."""
    return float("inf") if _deadline is None else _deadline - time.monotonic()


class TimeLimitExceeded(BaseException):
    """Raised by `time_limit` (a BaseException, so library code catching Exception cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float], what: str) -> Iterator[None]:
    """Raise TimeLimitExceeded in this thread when the block runs longer than `seconds` (SIGALRM; a
    no-op off the main thread or without setitimer). Used to stop a torch.compile that takes too long."""
    usable = (seconds is not None and seconds != float("inf") and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(f"{what} took longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def quiet_compile():
    """Silence torch.compile's warnings and dynamo's log while a benchmark compiles; restore both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch._dynamo").level
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch._dynamo").setLevel(level)

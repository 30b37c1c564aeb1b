"""Just-in-time build and load of the native extension (csrc/).

Why JIT and not setup.py: building in setup.py needs torch inside pip's isolated build environment,
which pulls a multi-GB CUDA wheel on a CPU machine, and ties the binary to one torch. Here the
extension is compiled on first use with torch.utils.cpp_extension + ninja into a cache folder whose
name is a hash of the sources, the torch version and the CUDA flag, so a rebuild happens exactly when
one of them changes. `python -m iwm_kernels.build` builds it ahead of time.

Every csrc/*.cpp registers its ops with TORCH_LIBRARY_FRAGMENT(iwm_native, ...), so the library is
loaded as a plain shared object and its ops appear under torch.ops.iwm_native. CUDA sources
(csrc/cuda/*.cu, torch-free launchers) and their bindings (csrc/*_cuda.cpp) join the build only when
a CUDA torch and nvcc are present.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from ._availability import Availability, warn_once

_lock = threading.Lock()
_status: Optional[Availability] = None
_with_cuda = False


def source_dir() -> Path:
    """csrc/ of a source checkout (editable install), else the copy shipped inside the package."""
    checkout = Path(__file__).resolve().parent.parent / "csrc"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "csrc"


def _cuda_build_possible() -> bool:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def sources(with_cuda: bool) -> list[Path]:
    root = source_dir()
    cpp = sorted(p for p in root.glob("*.cpp") if not p.name.endswith("_cuda.cpp"))
    if with_cuda:
        cpp += sorted(root.glob("*_cuda.cpp")) + sorted((root / "cuda").glob("*.cu"))
    return cpp


def _build_key(srcs: list[Path], with_cuda: bool) -> str:
    h = hashlib.sha256()
    h.update(torch.__version__.encode())
    h.update(str(with_cuda).encode())
    for path in sorted(srcs + list(source_dir().glob("*.h")) + list((source_dir() / "cuda").glob("*.h"))):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("IWM_KERNELS_CACHE", Path.home() / ".cache" / "iwm_kernels"))


def _build(verbose: bool) -> None:
    global _with_cuda
    from torch.utils import cpp_extension

    with_cuda = _cuda_build_possible()
    srcs = sources(with_cuda)
    key = _build_key(srcs, with_cuda)
    build_dir = cache_root() / f"native-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cflags = ["-O3", "-fopenmp", "-DIWM_WITH_CUDA" if with_cuda else "-UIWM_WITH_CUDA"]
    cuda_flags = ["-O3", "--use_fast_math", "-lineinfo"]
    with _build_dir_lock(build_dir):
        _load(cpp_extension, key, srcs, build_dir, cflags, cuda_flags, with_cuda, verbose)
    _with_cuda = with_cuda


@contextlib.contextmanager
def _build_dir_lock(build_dir: Path):
    """Serialise builds of one cache folder across processes with a lock the kernel releases when its
    holder dies.

    torch's JIT build guards the folder with a plain `lock` file (a FileBaton): a process killed while
    building (kill -9, a CI timeout) leaves that file behind, and every later process then waits on it
    forever, even when the library is already built. Holding an flock on our own file means no other
    process of ours is building here, so a `lock` file we find is stale and can go.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: keep torch's own behaviour
        yield
        return
    with open(build_dir / "iwm-build.flock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _load(cpp_extension, key, srcs, build_dir, cflags, cuda_flags, with_cuda, verbose) -> None:
    cpp_extension.load(
        name=f"iwm_native_{key}",
        sources=[str(s) for s in srcs],
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(source_dir())],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )


def status(verbose: bool = False) -> Availability:
    """Build (first time) and load the extension; never raises. Cached for the process."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is not None:
            return _status
        if os.environ.get("IWM_KERNELS_NO_NATIVE", "0") not in ("", "0"):
            _status = Availability(False, "disabled by IWM_KERNELS_NO_NATIVE")
            return _status
        try:
            _build(verbose)
            _status = Availability(True, "C++ extension" + (" with CUDA" if _with_cuda else " (CPU)"))
        except Exception as exc:  # no compiler, no ninja, a compile error: fall back, say why
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            _status = Availability(False, f"native extension could not be built: {first_line}")
            warn_once("native-build", f"iwm_kernels: {_status.detail}")
    return _status


def built_with_cuda() -> bool:
    return status().available and _with_cuda


def ops():
    """torch.ops.iwm_native, building the library first if needed."""
    st = status()
    if not st.available:
        raise RuntimeError(st.detail)
    return torch.ops.iwm_native

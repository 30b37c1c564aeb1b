"""Checkpoints that survive a kill at any moment.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the destination and
the folder is fsynced: a reader sees the old complete file or the new complete file, never a torn one.
`latest.pt` is rewritten at every save; periodic `step-XXXXXXX.pt` files are kept up to a limit.
State dicts are stored unwrapped (no `module.` / `_orig_mod.` prefixes). A checkpoint that exists but
cannot be read is an error, never a silent restart from step 0.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

LATEST = "latest.pt"
_PERIODIC = re.compile(r"^step-(\d+)\.pt$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    pass


def unwrap_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Drop DDP / torch.compile prefixes wherever they occur in the key."""
    out = {}
    for key, value in state.items():
        parts = [p for p in key.split(".") if p not in ("module", "_orig_mod")] if any(
            w in key for w in _WRAPPER_PREFIXES) else key.split(".")
        out[".".join(parts)] = value
    return out


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def periodic_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PERIODIC.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict[str, Any], folder: str | Path, step: int, *, periodic: bool,
                    keep: int = 3) -> Path:
    """Write latest.pt (always) and step-XXXXXXX.pt (when periodic); prune old periodic files."""
    folder = Path(folder)
    atomic_save(state, folder / LATEST)
    if periodic:
        atomic_save(state, folder / f"step-{step:07d}.pt")
        old = periodic_checkpoints(folder)
        for path in old[:-keep] if keep > 0 else []:
            path.unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp"):  # leftovers of a write killed mid-way
        stale.unlink(missing_ok=True)
    return folder / LATEST


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path} exists but cannot be read "
                              f"({exc.__class__.__name__}: {exc}); refusing to restart from scratch. "
                              f"Move it away to start over, or point meta.read_checkpoint at a good one.") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint: {path} is not an iwm training checkpoint (no 'step')")
    return state


def find_resume_checkpoint(folder: str | Path, explicit: Optional[str] = None) -> Optional[Path]:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise CheckpointError(f"meta.read_checkpoint: no such file {p}")
        return p
    latest = Path(folder) / LATEST
    return latest if latest.exists() else None

"""Checkpoints that survive a kill at any moment, load without running code and prove their integrity.

Durability: writes go to a temporary file in the same folder, are fsynced, then renamed over the
destination and the folder is fsynced: a reader sees the old complete file or the new complete file,
never a torn one. `latest.pt` is rewritten at every save; periodic `step-XXXXXXX.pt` files are kept up
to a limit. A checkpoint that exists but cannot be read is an error, never a silent restart from step 0.

Safety: a checkpoint holds only tensors and plain Python values (dict, list, tuple, str, int, float,
bool, None), including the RNG states, and is read with `torch.load(weights_only=True)`. A file that
would need unpickling arbitrary objects (which can run code) is refused, whoever wrote it.

Integrity: every save stores a SHA-256 digest of the checkpoint's content, verified on load; see `seal`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

LATEST = "latest.pt"
FORMAT = "iwm-checkpoint/2"  # 2: weights-only content with an integrity digest
_PERIODIC = re.compile(r"^step-(\d+)\.pt$")
_INTEGRITY = "integrity"


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- reading
def load_weights_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load restricted to tensors and plain values: a crafted file cannot run code here.

    Used for our checkpoints and for files from elsewhere (I-JEPA checkpoints) alike."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: no such file {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(
            f"checkpoint: {path} exists but cannot be read: it is not a weights-only file (loading it would "
            f"need unpickling Python objects, which can run code) or it is damaged, so it is refused. "
            f"Checkpoints written by an older iwm (pickled NumPy RNG state) are refused the same way. "
            f"[torch: {reason}]") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {path} exists but cannot be read "
                              f"({exc.__class__.__name__}: {exc}); refusing to restart from scratch. "
                              f"Move it away to start over, or point meta.read_checkpoint at a good one.") from exc


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    path = Path(path)
    state = load_weights_only(path, map_location)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint: {path} is not an iwm training checkpoint (no 'step')")
    if state.get("format") != FORMAT or _INTEGRITY not in state:
        raise CheckpointError(f"checkpoint: {path} has format {state.get('format', 'unknown')!r}, not {FORMAT!r} "
                              f"(no integrity digest: written by an older iwm?); refusing to load it unverified")
    verify(state, path)
    return state


def find_resume_checkpoint(folder: str | Path, explicit: Optional[str] = None) -> Optional[Path]:
    """The checkpoint a resume loads: `explicit` (a file, or a sharded step-*.dcp folder), else the run
    folder's latest.pt or the sharded checkpoint latest-sharded.json names (iwm.sharded_checkpoint),
    whichever was written last when both are there (a run that switched meta.parallel)."""
    from .sharded_checkpoint import LATEST_SHARDED, TRAINER_STATE, latest_sharded

    if explicit:
        p = Path(explicit)
        if p.is_dir():
            if not (p / TRAINER_STATE).is_file():
                raise CheckpointError(f"meta.read_checkpoint: {p} is not a complete sharded checkpoint "
                                      f"(no {TRAINER_STATE})")
            return p
        if not p.is_file():
            raise CheckpointError(f"meta.read_checkpoint: no such file {p}")
        return p
    latest = Path(folder) / LATEST
    pointer = Path(folder) / LATEST_SHARDED
    if pointer.exists() and not (latest.exists() and latest.stat().st_mtime_ns > pointer.stat().st_mtime_ns):
        return latest_sharded(folder)
    return latest if latest.exists() else None


# ---------------------------------------------------------------------------------------------- integrity
# Decision: one SHA-256 over the checkpoint's *content* (every value, and every tensor's dtype, shape
# and bytes, in a canonical length-prefixed encoding), stored inside the file itself, so digest and data
# are written by the same atomic rename (a sidecar file could be out of step with its data after a kill)
# and the file stays a plain torch.save zip that torch.load reads. A per-tensor digest is kept next to it
# to name the damaged tensor. Damage that the zip/pickle layer notices already fails to load; this
# catches what it does not: torch does not check the zip CRCs, so a flipped byte in tensor data loaded
# silently. (Integrity against accidents, not authenticity: whoever can write the file can re-seal it.)
def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy()).hexdigest()


def _feed(h, obj: Any, where: str, tensors: dict[str, str]) -> None:
    if isinstance(obj, torch.Tensor):
        digest = _tensor_digest(obj)
        tensors[where] = digest
        h.update(f"T{obj.dtype}|{tuple(obj.shape)}|{digest}".encode())
    elif obj is None:
        h.update(b"N")
    # Exact types: a subclass (numpy.float64 is a float) would be pickled as its own class.
    elif type(obj) is bool:
        h.update(b"B1" if obj else b"B0")
    elif type(obj) is int:
        h.update(f"I{obj}|".encode())
    elif type(obj) is float:
        h.update(f"F{obj.hex()}|".encode())
    elif type(obj) is str:
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}|".encode() + data)
    elif type(obj) in (dict, OrderedDict):
        h.update(f"D{len(obj)}|".encode())
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"checkpoint: {where or '<root>'} has a key {key!r} of type "
                                      f"{type(key).__name__}; only str and int keys are stored")
            _feed(h, key, where, tensors)
            _feed(h, value, f"{where}/{key}" if where else str(key), tensors)
    elif type(obj) in (list, tuple, torch.Size):
        h.update(f"{'L' if type(obj) is list else 'U'}{len(obj)}|".encode())
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}/{i}", tensors)
    else:
        # Refused at save time so that every file we write loads with weights_only=True.
        raise CheckpointError(f"checkpoint: {where or '<root>'} holds a {type(obj).__module__}."
                              f"{type(obj).__qualname__}; only tensors and plain Python values are stored "
                              f"(so that loading never unpickles objects)")


def _digests(state: dict[str, Any]) -> tuple[str, dict[str, str]]:
    h, tensors = hashlib.sha256(), {}
    _feed(h, {k: v for k, v in state.items() if k != _INTEGRITY}, "", tensors)
    return h.hexdigest(), tensors


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of `state` with the format tag and its integrity digests, ready to write (one SHA-256
    pass over the bytes per save, at GB/s: small next to writing them)."""
    sealed = {**state, "format": FORMAT}
    content, tensors = _digests(sealed)
    sealed[_INTEGRITY] = {"algorithm": "sha256", "content": content, "tensors": tensors}
    return sealed


def verify(state: dict[str, Any], path: str | Path) -> None:
    """Raise CheckpointError unless `state` (as loaded) matches the digest it was saved with."""
    stored = state.get(_INTEGRITY)
    if not isinstance(stored, dict) or stored.get("algorithm") != "sha256":
        raise CheckpointError(f"checkpoint: {path} has no usable integrity digest; refusing to load it unverified")
    content, tensors = _digests(state)
    if content == stored.get("content"):
        return
    saved_tensors = stored.get("tensors") or {}
    damaged = [name for name in tensors if saved_tensors.get(name) != tensors[name]]
    what = (f"tensor(s) {', '.join(damaged[:5])}{' ...' if len(damaged) > 5 else ''}" if damaged
            else "its non-tensor values (step, settings, RNG counters)")
    raise CheckpointError(f"checkpoint: {path} is corrupted: checksum mismatch in {what} (the data on disk is "
                          f"not what was saved); refusing to load it. Resume from an earlier step-*.pt with "
                          f"meta.read_checkpoint=..., or move it away to start over.")


# ---------------------------------------------------------------------------------------------- writing
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
    sealed = seal(state)
    atomic_save(sealed, folder / LATEST)
    if periodic:
        atomic_save(sealed, folder / f"step-{step:07d}.pt")
        old = periodic_checkpoints(folder)
        for path in old[:-keep] if keep > 0 else []:
            path.unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp"):  # leftovers of a write killed mid-way
        stale.unlink(missing_ok=True)
    return folder / LATEST


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and plain values (loadable with weights_only=True)."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "internal": [int(x) for x in internal],
                        "gauss_next": None if gauss_next is None else float(gauss_next)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # The generators take CPU byte tensors, wherever map_location put the loaded checkpoint.
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------- resume
# Settings a resume may change: they decide how a run is watched, stored, fed or evaluated, never the
# numbers it computes (the data order and masks are functions of (seed, step, index), not of the loader;
# evaluation uses its own generators and the model has no dropout; the I-JEPA compatibility keys are
# accepted but unused). Everything else (seed, learning rates, model, data, masks, augmentation,
# precision, kernel backends, device) changes the result, bit for bit at least, so changing it on a
# resume is refused unless meta.resume_with_changes=true says it is meant.
RESUME_SAFE_KEYS = frozenset({
    "logging.folder", "logging.write_tag", "logging.log_every", "logging.checkpoint_every",
    "logging.keep_checkpoints", "logging.tensorboard", "logging.progress_bar",
    "eval.every", "eval.at_end", "eval.tasks", "eval.mrr_images", "eval.mrr_candidates", "eval.probe_epochs",
    "eval.predictor_epochs",
    "data.num_workers", "data.pin_mem",
    "meta.load_checkpoint", "meta.read_checkpoint", "meta.resume_with_changes", "meta.dist_timeout_s", "meta.dist_timeout_s",
    "data.color_jitter_strength", "data.use_color_distortion", "data.use_gaussian_blur",
    "data.use_horizontal_flip", "data.copy_data", "meta.copy_data",
    # Recomputing a block's activations redoes the same ops on the same inputs (tests/test_fsdp2.py).
    "meta.activation_checkpointing", "meta.activation_checkpointing_every",
})


def _flatten(config: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in (values or {}).items()}


def config_changes(saved: dict, now: dict, defaults: Optional[dict] = None) -> list[str]:
    """'key (checkpoint: A, now: B)' for each setting that differs and changes the result.

    Only the keys of the current config count: a key the checkpoint's config lacks (added to iwm since)
    is compared at its default, which keeps the earlier behaviour; a key iwm no longer has cannot be set."""
    old, new, default = _flatten(saved), _flatten(now), _flatten(defaults or {})
    # max_steps only says where to stop while the schedules span optimization.epochs; with epochs 0
    # the schedules span max_steps, so then it changes the result.
    safe = set(RESUME_SAFE_KEYS)
    if old.get("optimization.epochs", 0) > 0 and new.get("optimization.epochs", 0) > 0:
        safe.add("optimization.max_steps")
    missing = "<absent>"
    before = {key: old.get(key, default.get(key, missing)) for key in new}
    return [f"{key} (checkpoint: {before[key]!r}, now: {new[key]!r})"
            for key in sorted(new) if key not in safe and before[key] != new[key]]

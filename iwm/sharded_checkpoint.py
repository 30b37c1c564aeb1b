"""Sharded checkpoints (meta.parallel=fsdp2) with PyTorch's torch.distributed.checkpoint (DCP).

Layout, in the run folder:

    step-0000040.dcp/        one checkpoint: every rank's tensor shards, DCP's index, our trainer state
        __0_0.distcp ...     DCP data files (rank r writes __r_*.distcp)
        .metadata            DCP's index of the shards (a pickle, see `_SafeUnpickler`)
        trainer.pt           step, RNG, config, param groups and the SHA-256 of every file above,
                             sealed and weights-only (iwm.checkpoint); written last: the completion marker
    latest-sharded.json      {"checkpoint": "step-0000040.dcp", "step": 40}: what a resume loads

Atomicity: the ranks write into `.tmp-step-XXXXXXX.dcp/`; DCP writes `.metadata` only after every rank's
data is written; rank 0 then writes trainer.pt, renames the folder into place and only then rewrites the
pointer (temporary file + rename). A kill at any moment leaves the pointer naming the previous complete
checkpoint. Old folders are pruned to logging.keep_checkpoints; leftover `.tmp-*` folders are removed.

Resharding: DCP stores each tensor's global shape and the slices each rank held, so a checkpoint saved
by N processes loads into M processes (sharded or not), and into one process without a process group.

Weights-only: DCP reads `.metadata` with plain `pickle.load` and non-tensor entries with
`torch.load(weights_only=False)`, either of which runs code from a crafted file. So we never let DCP
read the metadata itself: the reader here checks it against the digest in trainer.pt (accidents: a torn
or damaged file) and unpickles it with an allow-list of DCP's own metadata classes (attacks: whoever
can write .metadata can also rewrite our digest, so the digest alone would not make it safe), and it
refuses non-tensor (bytes) entries: our checkpoints store only tensors in DCP; the plain values go to
trainer.pt. Tensor data is read by DCP with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, atomic_save, load_checkpoint, seal

LATEST_SHARDED = "latest-sharded.json"
TRAINER_STATE = "trainer.pt"
SHARDED_FORMAT = "iwm-sharded/1"
_METADATA = ".metadata"
_FOLDER = re.compile(r"^step-(\d+)(?:-(\d+))?\.dcp$")
_TMP_PREFIX = ".tmp-"
# Tests: IWM_FAULT_DCP_PAUSE=<path> makes every rank wait, after writing its shards and before the
# checkpoint is committed, until that file exists (the test kills the run meanwhile).
_PAUSE_ENV = "IWM_FAULT_DCP_PAUSE"


# ---------------------------------------------------------------------------------------------- helpers
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(folder: Path, name: str, step: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST_SHARDED}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"checkpoint": name, "step": int(step)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / LATEST_SHARDED)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def sharded_checkpoints(folder: str | Path) -> list[Path]:
    """The complete sharded checkpoints in `folder` (those with trainer.pt), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [((int(m.group(1)), int(m.group(2) or 0)), p) for p in folder.iterdir()
             if (m := _FOLDER.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_sharded(folder: str | Path) -> Optional[Path]:
    """The checkpoint folder `latest-sharded.json` names; None when there is no pointer."""
    pointer = Path(folder) / LATEST_SHARDED
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint: {pointer} cannot be read ({exc}); refusing to restart from scratch. "
                              f"Point meta.read_checkpoint at one of the step-*.dcp folders.") from exc
    if not isinstance(name, str) or not _FOLDER.match(name):
        raise CheckpointError(f"checkpoint: {pointer} names {name!r}, not a step-*.dcp folder of this run")
    path = Path(folder) / name
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"checkpoint: {pointer} names {path}, which is missing or incomplete; refusing to "
                              f"restart from scratch. Point meta.read_checkpoint at one of the step-*.dcp folders.")
    return path


# ---------------------------------------------------------------------------------------------- state dicts
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def _tensor_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, list]:
    """What goes into DCP (tensors only: model weights, AdamW moments and step counts, keyed by
    parameter name) and the optimizer's param groups (plain values, for trainer.pt)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    groups: list = []
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)
        groups = osd["param_groups"]
        state["optim"] = osd["state"]
    for where, value in _leaves(state):
        if not torch.is_tensor(value):
            raise CheckpointError(f"checkpoint: {where} is a {type(value).__name__}; the sharded checkpoint "
                                  f"stores only tensors in DCP (plain values go to {TRAINER_STATE})")
    return state, groups


def _leaves(obj: Any, where: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{where}.{k}" if where else str(k))
    else:
        yield where, obj


# ---------------------------------------------------------------------------------------------- saving
def save_sharded(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], trainer_state: dict,
                 folder: str | Path, step: int, *, keep: int = 3) -> Path:
    """Every rank calls this (a collective). Writes step-XXXXXXX.dcp/ and points latest-sharded.json at it
    once it is complete; returns its path. `trainer_state`: plain values and CPU tensors (rank 0's is kept)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    folder = Path(folder)
    rank, world = _rank_world()
    tmp = folder / f"{_TMP_PREFIX}step-{step:07d}.dcp"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save of this step killed earlier
        tmp.mkdir()
    _barrier()
    # Before the first update AdamW has no state; get_optimizer_state_dict would make one with a fake
    # step (its step count would then be off by one), so none is saved.
    with_optimizer = optimizer is not None and bool(optimizer.state)
    tensors, groups = _tensor_state(model, optimizer if with_optimizer else None)
    dcp.save(tensors, storage_writer=FileSystemWriter(str(tmp), sync_files=True))
    # Each rank hashes the files it wrote (in parallel, from its page cache); rank 0 records them all.
    mine = {p.name: _sha256(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    if _distributed():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    pause = os.environ.get(_PAUSE_ENV)
    if pause:
        Path(f"{pause}.rank{rank}").touch()
        while not Path(pause).exists():
            time.sleep(0.05)
    final = None
    if rank == 0:
        files = {name: digest for part in gathered for name, digest in part.items()}
        state = {**trainer_state, "step": int(step),
                 "sharded": {"format": SHARDED_FORMAT, "world_size": world, "optimizer": with_optimizer,
                             "param_groups": groups, "metadata_sha256": _sha256(tmp / _METADATA),
                             "files": files}}
        atomic_save(seal(state), tmp / TRAINER_STATE)  # last: marks the folder complete
        _fsync_dir(tmp)
        final = _free_name(folder, step)
        os.rename(tmp, final)
        _fsync_dir(folder)
        _write_pointer(folder, final.name, step)
        _prune(folder, keep, final)
    _barrier()  # no rank goes on (or exits on a stop request) before the checkpoint is committed
    if final is None:
        final = latest_sharded(folder) or folder
    return final


def _free_name(folder: Path, step: int) -> Path:
    """step-XXXXXXX.dcp, or step-XXXXXXX-N.dcp when a checkpoint of that step is already there (a run
    resumed from an earlier one): a folder is never replaced, so the pointer never names a missing one."""
    path, n = folder / f"step-{step:07d}.dcp", 0
    while path.exists():
        n += 1
        path = folder / f"step-{step:07d}-{n}.dcp"
    return path


def _prune(folder: Path, keep: int, current: Path) -> None:
    complete = sharded_checkpoints(folder)
    for old in complete[:-keep] if keep > 0 else []:  # keep <= 0: keep all (as for step-*.pt)
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(f"{_TMP_PREFIX}step-*.dcp"):  # saves killed mid-way
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` with only the classes such a file holds (DCP's metadata dataclasses
    and enum, torch.Size, dtypes, layouts, paths): anything else (os.system, builtins.eval, ...) is refused
    before it is looked up, so a crafted file runs nothing."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) or name == "Size":
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


def read_metadata(path: str | Path, expected_sha256: Optional[str] = None):
    """DCP's Metadata of checkpoint folder `path`, read without running code (see `_SafeUnpickler`)."""
    file = Path(path) / _METADATA
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint: {file} cannot be read ({exc})") from exc
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(f"checkpoint: {file} is corrupted: checksum mismatch (the data on disk is not what "
                              f"was saved); refusing to load it")
    try:
        metadata = _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise CheckpointError(f"checkpoint: {file} is not DCP metadata this reader accepts ({exc}); loading it "
                              f"would need unpickling other Python objects, which can run code, so it is "
                              f"refused") from exc
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint: {file} holds a {type(metadata).__name__}, not DCP Metadata")
    blobs = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if blobs:  # DCP loads those with torch.load(weights_only=False)
        raise CheckpointError(f"checkpoint: {file} lists non-tensor entries ({', '.join(blobs[:4])}); DCP would "
                              f"unpickle them, so the checkpoint is refused")
    return metadata


def _reader(path: Path, metadata):
    """A FileSystemReader that returns the metadata we read and checked instead of unpickling it."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return Reader(str(path))


def load_trainer_state(path: str | Path) -> dict:
    """trainer.pt of a sharded checkpoint, verified (weights-only, sealed), and the digests of the
    files it lists checked. Every rank may call it; it reads files only."""
    path = Path(path)
    marker = path / TRAINER_STATE
    if not marker.is_file():
        raise CheckpointError(f"checkpoint: {path} is not a complete sharded checkpoint (no {TRAINER_STATE}: "
                              f"its save did not finish)")
    state = load_checkpoint(marker, map_location="cpu")
    info = state.get("sharded")
    if not isinstance(info, dict) or info.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"checkpoint: {marker} is not an {SHARDED_FORMAT} trainer state")
    for name, digest in info["files"].items():
        file = path / name
        if "/" in name or not file.is_file():
            raise CheckpointError(f"checkpoint: {path} is missing its shard file {name}; refusing to load it")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint: {file} is corrupted: checksum mismatch (the data on disk is not "
                                  f"what was saved); refusing to load it")
    return state


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 *, trainer_state: Optional[dict] = None) -> dict:
    """Load a sharded checkpoint into `model` (and `optimizer`), whatever their sharding now (FSDP2 over
    any number of ranks, or plain in one process); every rank calls it. Returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = trainer_state if trainer_state is not None else load_trainer_state(path)
    info = state["sharded"]
    metadata = read_metadata(path, info["metadata_sha256"])
    with_optimizer = optimizer is not None and info.get("optimizer", False)
    tensors, _ = _tensor_state(model, optimizer if with_optimizer else None)
    try:
        dcp.load(tensors, storage_reader=_reader(path, metadata))
        set_model_state_dict(model, tensors["model"])
        if with_optimizer:
            set_optimizer_state_dict(model, optimizer, {"state": tensors["optim"],
                                                        "param_groups": info["param_groups"]})
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # a missing key, a shape mismatch (DCP's is a BaseException)
        raise CheckpointError(f"checkpoint: {path} does not fit this model ({exc.__class__.__name__}: "
                              f"{str(exc).strip()[:600]})") from exc
    return state


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s full weights on CPU in rank 0 (an empty dict on the others); a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True))


def full_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of a sharded checkpoint, in this process (no process group,
    no model needed): {"encoder.<name>": tensor, "target_encoder.<name>": ..., "predictor.<name>": ...}.
    For `python -m iwm.eval` and the safetensors export."""
    import torch.distributed.checkpoint as dcp

    path = resolve(path)
    info = load_trainer_state(path)["sharded"]
    metadata = read_metadata(path, info["metadata_sha256"])
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    targets = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
               for key, md in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not targets:
        raise CheckpointError(f"checkpoint: {path} holds no model weights")
    # DCP flattens {"model": {...}} to "model.<name>" keys; a flat dict of those loads the same entries.
    dcp.load(targets, storage_reader=_reader(path, metadata), no_dist=True)
    return {key[len("model."):]: value for key, value in targets.items()}


def resolve(path: str | Path) -> Path:
    """A sharded checkpoint folder from what a user passes: the folder itself, its run folder (then the
    one latest-sharded.json names) or that pointer file."""
    path = Path(path)
    if path.name == LATEST_SHARDED and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / TRAINER_STATE).exists() and (path / LATEST_SHARDED).exists():
        return latest_sharded(path)
    return path


def load_as_full_checkpoint(path: str | Path) -> dict:
    """A sharded checkpoint (see `resolve`) as the dict `iwm.checkpoint.load_checkpoint` returns for
    latest.pt: encoder, target_encoder, predictor state dicts plus the trainer state (no optimizer)."""
    path = resolve(path)
    state = dict(load_trainer_state(path))
    weights = full_model_state(path)
    for part in ("encoder", "target_encoder", "predictor"):
        prefix = f"{part}."
        state[part] = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return state


def load_any_checkpoint(path: str | Path) -> dict:
    """latest.pt / step-*.pt (iwm.checkpoint.load_checkpoint) or a sharded checkpoint (a step-*.dcp
    folder, its run folder or latest-sharded.json), as one dict with the full model state dicts."""
    p = Path(path)
    if p.is_dir() or p.name == LATEST_SHARDED:
        return load_as_full_checkpoint(p)
    return load_checkpoint(p, map_location="cpu")

"""Process-group set-up for `torchrun` (DDP: NCCL on GPUs, gloo on CPU) and rank-aware helpers."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A collective with the other ranks failed: a peer died, hung, or was stopped."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise.

    `timeout_s` bounds every collective (and the rendezvous): without it a hung or stopped peer holds the
    others for the backend's default (gloo: 30 minutes) before anything is reported."""
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s: must be a positive number of seconds, got {timeout_s!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, float(timeout_s))


def free_port() -> str:
    """A TCP port nothing on this host listens on now, picked by the kernel, for a MASTER_PORT on one host
    (a random guess can land in the ephemeral range that outgoing connections, gloo's among them, use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _collective_failed(exc: Exception, what: str, info: DistInfo) -> DistributedError:
    return DistributedError(
        f"distributed: rank {info.rank} of {info.world_size}: {what} failed ({exc}); another rank died, hung or "
        f"was stopped (collectives wait at most meta.dist_timeout_s={info.timeout_s:g}s)")


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean over ranks of a float64 vector, in one collective (the trainer's window rows and stop
    flags travel together)."""
    if not info.enabled:
        return values
    try:
        dist.all_reduce(values)
    except RuntimeError as exc:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
        raise _collective_failed(exc, "the step's all-reduce", info) from exc
    return values / info.world_size


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (plain picklable data), in rank order; `[obj]` in one process. For rare host
    bookkeeping only (the trainer's unreadable-file indices): it pickles and waits on every rank."""
    if not info.enabled:
        return [obj]
    every = [None] * info.world_size
    try:
        dist.all_gather_object(every, obj)
    except RuntimeError as exc:
        raise _collective_failed(exc, "gathering the ranks' unreadable-file counts", info) from exc
    return every


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

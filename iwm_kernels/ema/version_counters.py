"""Make raw-pointer writes visible to autograd, as an in-place torch op would be.

A kernel that writes through data pointers does not touch the tensors' version counters, so a tensor
saved for a pending backward and then EMA-updated would give a silently wrong gradient instead of
autograd's "modified by an inplace operation" error. Every backend's targets are bumped after the
update (a second bump after a torch op's own is harmless: only "changed or not" matters).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _accepts_sequences() -> bool:
    # torch.autograd.graph.increment_version takes a list of tensors on recent torch, one tensor on older.
    try:
        torch.autograd.graph.increment_version([])
        return True
    except (TypeError, RuntimeError):
        return False


_BATCHED = _accepts_sequences()


def bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    if _BATCHED:
        try:
            torch.autograd.graph.increment_version(list(tensors))
            return
        except RuntimeError:
            pass  # e.g. an inference-mode tensor on a torch that refuses it: bump the others one by one
    for t in tensors:
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)

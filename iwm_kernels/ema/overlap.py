"""Memory-overlap check for the EMA: by the bytes each tensor really touches, not by storage identity.

Storage identity is wrong both ways: two disjoint halves of one buffer share a storage but never touch
the same byte, while torch.from_numpy of two overlapping numpy views gives two storages over the same
bytes. So every non-empty tensor is turned into its byte interval [data_ptr, data_ptr + extent) and the
intervals are swept in address order: O(n log n) for n tensors.
"""
from __future__ import annotations

from typing import Sequence

import torch


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that t can read or write (strides are never negative)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def check_no_overlap(targets: Sequence[torch.Tensor], onlines: Sequence[torch.Tensor]) -> None:
    """Raise ValueError when a target shares a byte with another target or with any online tensor.

    Onlines may overlap each other: they are only read."""
    spans = [(*byte_span(t), True, i) for i, t in enumerate(targets) if t.numel()]
    spans += [(*byte_span(o), False, i) for i, o in enumerate(onlines) if o.numel()]
    spans.sort()
    furthest = None         # (end, is_target, index) of the span reaching furthest so far
    furthest_target = None  # the same, among targets only
    for start, end, is_target, i in spans:
        if is_target and furthest is not None and furthest[0] > start:
            _raise(start, end, i, furthest, spans)
        if not is_target and furthest_target is not None and furthest_target[0] > start:
            raise ValueError(f"target[{furthest_target[2]}]: overlaps online[{i}] in memory "
                             "(target and online alias)")
        if furthest is None or end > furthest[0]:
            furthest = (end, is_target, i)
        if is_target and (furthest_target is None or end > furthest_target[0]):
            furthest_target = (end, True, i)


def _raise(start: int, end: int, i: int, other: tuple, spans: list) -> None:
    _, other_is_target, j = other
    if not other_is_target:
        raise ValueError(f"target[{i}]: overlaps online[{j}] in memory (target and online alias)")
    first, second = sorted((i, j))
    other_span = next((s, e) for s, e, is_t, k in spans if is_t and k == j)
    if other_span == (start, end):
        raise ValueError(f"target[{second}]: the same memory as target[{first}] (listed twice)")
    raise ValueError(f"target[{second}]: overlaps target[{first}] in memory (overlapping views would be "
                     "updated twice)")

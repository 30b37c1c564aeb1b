"""Whether something can run here (and why not), and one-time warnings: shared by the backend choice
(_backend) and the native build (_native), which both need them and otherwise import nothing of each
other at import time."""
from __future__ import annotations

import warnings
from typing import NamedTuple


class Availability(NamedTuple):
    available: bool
    detail: str                   # one line: what it is, or why it cannot run
    reasons: tuple[str, ...] = ()  # when not available: every reason, one per entry


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """One-line warning, at most once per process for each key."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

"""Stop requests: SIGTERM / SIGINT ask a run to stop at its next safe point (a step boundary in training,
a task boundary in evaluation) instead of dying mid-write. Also keeps the DataLoader workers out of it."""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# One stop request often arrives twice within milliseconds: a signal to the process group reaches the
# process and also its launcher, which forwards it (torchrun, srun). A second signal inside this window
# is the same request; only a later one means "stop now".
DUPLICATE_WINDOW_S = 1.0


class StopFlag:
    """The first SIGTERM / SIGINT sets `signal`; the loop polls it and stops at its next safe point.
    A second one (after DUPLICATE_WINDOW_S) raises KeyboardInterrupt: stop now, without saving."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._first_at = 0.0
        self._previous = {}

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self._first_at = signum, time.monotonic()
            return
        if time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
            return
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`. A signal to the whole process group (Slurm, Kubernetes, Ctrl-C) also
    reaches the workers, and PyTorch's worker SIGTERM handler then kills the worker; the parent's SIGCHLD
    handler raises "DataLoader worker ... is killed by signal" at whatever line the main process is on
    (inside backward(), say), so the run dies before it can save. Stopping is the main process's job:
    it finishes the step, saves, and shuts the workers down through the DataLoader's own protocol (and a
    worker whose parent is gone exits by itself), so the workers ignore the stop signals.

    Catching that RuntimeError instead would not be safe: it can surface between optimizer.step() and the
    EMA update, leaving a state no checkpoint should hold."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Started under `blocked_stop_signals`: a signal that arrived before this point is pending; with
    # SIG_IGN in place, unblocking discards it.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def blocked_stop_signals():
    """Block the stop signals while DataLoader workers start: a worker inherits the block (fork keeps the
    mask, and so does exec), so a signal in the short window before `ignore_stop_signals_in_worker`
    waits instead of killing it. The main process gets its own pending signal when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to block
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

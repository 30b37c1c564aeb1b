"""Run-folder metrics: a CSV row per step (I-JEPA-like columns), metrics.jsonl, optional TensorBoard,
progress lines, and PNG plots at the end. Only rank 0 writes."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

CSV_COLUMNS = ("step", "epoch", "loss", "lr", "wd", "momentum", "img_per_s", "data_wait_s", "step_time_s",
               "target_std", "pred_std", "context_tokens", "target_tokens", "peak_mem_mb", "skipped_images")


def _complete_lines(path: Path) -> list[str]:
    """The file's newline-terminated lines: a line a kill cut short has no newline and is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    return [line for line in lines if line.endswith("\n")]


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines log, skipping a torn or corrupt line instead of failing on it."""
    rows = []
    for line in _complete_lines(Path(path)):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _step_of(row: dict) -> Optional[int]:
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _atomic_write_text(path: Path, text: str) -> None:
    """Write beside, fsync, rename over: a kill leaves the old log or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not openable as a file on this platform: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class MetricsWriter:
    """The logs of a run folder: <tag>.csv and metrics.jsonl (a row per step), evals.jsonl (a row per
    evaluation), optional TensorBoard.

    Kill-safety contract: call `sync()` before each checkpoint is written. Every row up to the checkpoint
    is then on disk before the checkpoint is, and a resume from a checkpoint at step S (`resume_step=S`)
    cuts the logs back to what an uninterrupted run has at S: step rows < S, evaluations <= S (the
    evaluation at S runs after the checkpoint at S). Rows a kill cut short are dropped."""

    def __init__(self, folder: str | Path, *, tag: str = "iwm", enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        self.folder, self.enabled = Path(folder), enabled
        self.tb = None
        self.eval_steps: set[int] = set()
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / f"{tag}.csv"
        self.jsonl_path = self.folder / "metrics.jsonl"
        self.evals_path = self.folder / "evals.jsonl"
        self._truncate_after(resume_step)
        new_csv = not self.csv_path.exists()
        self.csv_file = open(self.csv_path, "a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self.csv.writeheader()
        self.jsonl = open(self.jsonl_path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.folder / "tensorboard"), purge_step=resume_step or None)
            except Exception:  # tensorboard not installed: CSV and JSONL still have everything
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        if self.jsonl_path.exists():
            keep = [r for r in read_jsonl(self.jsonl_path) if _step_of(r) is not None and _step_of(r) < step]
            _atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in keep))
        if self.evals_path.exists():
            keep = [r for r in read_jsonl(self.evals_path) if _step_of(r) is not None and _step_of(r) <= step]
            _atomic_write_text(self.evals_path, "".join(json.dumps(r) + "\n" for r in keep))
            self.eval_steps = {_step_of(r) for r in keep}
        if self.csv_path.exists():
            out = io.StringIO()
            w = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(self._csv_rows_before(step))
            _atomic_write_text(self.csv_path, out.getvalue())

    def _csv_rows_before(self, step: int) -> list[dict]:
        lines = _complete_lines(self.csv_path)
        if not lines:
            return []
        header = next(csv.reader(lines[:1]))
        rows = []
        for fields in csv.reader(lines[1:]):
            if len(fields) != len(header):  # torn or corrupt
                continue
            row = dict(zip(header, fields))
            try:
                row_step = int(row.get("step", ""))
            except ValueError:
                continue
            if row_step < step:
                rows.append(row)
        return rows

    def log_step(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def log_eval(self, step: int, results: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.evals_path, "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
            f.flush()
            os.fsync(f.fileno())  # evaluations are rare and expensive to redo
        self.eval_steps.add(step)
        if self.tb is not None:
            for k, v in results.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"eval/{k}", v, step)

    def flush(self) -> None:
        if self.enabled:
            self.csv_file.flush()
            self.jsonl.flush()
            if self.tb is not None:
                self.tb.flush()

    def sync(self) -> None:
        """Flush and fsync the step logs: call before a checkpoint is written, so that no checkpoint is
        ever on disk ahead of the rows it covers (a resume then finds them all)."""
        if self.enabled:
            self.flush()
            os.fsync(self.csv_file.fileno())
            os.fsync(self.jsonl.fileno())

    def close(self) -> None:
        if self.enabled:
            self.sync()
            self.csv_file.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


class Progress:
    """A one-line progress bar on a TTY (rewritten in place); nothing otherwise."""

    def __init__(self, total: int, mode: str = "auto", stream=sys.stderr):
        self.total, self.stream = total, stream
        self.enabled = mode == "on" or (mode == "auto" and stream.isatty())
        self.start = time.time()

    def update(self, step: int, text: str = "") -> None:
        if not self.enabled or self.total <= 0:
            return
        frac = min(1.0, step / self.total)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        self.stream.write(f"\r[{bar}] {step}/{self.total} {text}"[:160].ljust(100))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def plot_run(folder: str | Path) -> list[Path]:
    """loss.png, throughput.png and (if any) evals.png from the run folder's logs."""
    folder = Path(folder)
    jsonl = folder / "metrics.jsonl"
    if not jsonl.exists():
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = [r for r in read_jsonl(jsonl) if "step" in r]
    if not rows:
        return []
    out = []
    steps = [r["step"] for r in rows]
    for name, keys, ylabel in (("loss", ("loss",), "loss"), ("throughput", ("img_per_s",), "images / s"),
                               ("collapse", ("target_std", "pred_std"), "feature std")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(steps, [float("nan") if y is None else y for y in ys], label=key, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(keys) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    evals = folder / "evals.jsonl"
    if evals.exists():
        erows = [r for r in read_jsonl(evals) if "step" in r]
        keys = sorted({k for r in erows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
        if erows and keys:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for key in keys:
                ax.plot([r["step"] for r in erows], [r.get(key, float("nan")) for r in erows], "o-", label=key)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = folder / "evals.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            out.append(path)
    return out


def peak_memory_mb(device) -> Optional[float]:
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB
    except Exception:
        return None

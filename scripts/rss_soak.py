"""RSS soak test: run N training steps of a config in this process and sample memory every K steps.

    python scripts/rss_soak.py --config configs/tiny.yaml --steps 3000 --every 25 --out /tmp/soak \
        data.builtin_samples=512 data.batch_size=8

Writes OUT/rss.csv (one row per sample) and OUT/rss.png. Columns, all in MB unless named otherwise:
  rss, hwm            this process's current (VmRSS) and peak (VmHWM) resident set
  workers_rss         the summed VmRSS of its child processes (the DataLoader workers)
  heap_in_use         glibc's bytes handed out by malloc (mallinfo2 uordblks + hblkhd): what is live
  heap_free           bytes glibc holds in its arenas but has not handed out (fordblks): what a
                      leak-free process can still "grow" by, through fragmentation or untrimmed arenas
  pool_cached         free blocks kept by the iwm_kernels CPU output pool
  py_objects          objects tracked by the Python garbage collector (a growing list shows here)
A leak shows as a rising heap_in_use or py_objects; retained allocator memory as a rising heap_free
with a flat heap_in_use. glibc settings (MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_) and LD_PRELOAD
(jemalloc) are read when the process starts, so set them on the command line to compare.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import sys
import time
from pathlib import Path

_FIELDS = ("step", "time_s", "rss", "hwm", "workers_rss", "heap_in_use", "heap_free", "pool_cached", "py_objects")


def proc_status_mb(pid: str = "self") -> dict[str, float]:
    """VmRSS and VmHWM of a process in MB (missing keys when the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def children_rss_mb() -> float:
    """Summed VmRSS of this process's direct children (DataLoader workers), from /proc."""
    me, total = os.getpid(), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        if ppid == me:
            total += proc_status_mb(entry).get("VmRSS", 0.0)
    return total


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_mb() -> tuple[float, float]:
    """(in use, free but kept) of glibc malloc in MB; NaN without glibc >= 2.33 (e.g. under jemalloc,
    whose heap glibc does not see)."""
    if _MALLINFO2 is None:
        return float("nan"), float("nan")
    m = _MALLINFO2()
    return (m.uordblks + m.hblkhd) / 2**20, m.fordblks / 2**20


def pool_cached_mb() -> float:
    try:
        from iwm_kernels.gather.native import output_pool_stats

        return output_pool_stats()["cached_bytes"] / 2**20
    except Exception:  # native extension not built
        return float("nan")


def sample(step: int, t0: float) -> dict:
    status = proc_status_mb()
    in_use, free = heap_mb()
    return {"step": step, "time_s": round(time.time() - t0, 2), "rss": status.get("VmRSS"),
            "hwm": status.get("VmHWM"), "workers_rss": round(children_rss_mb(), 1), "heap_in_use": round(in_use, 1),
            "heap_free": round(free, 1), "pool_cached": round(pool_cached_mb(), 1), "py_objects": len(gc.get_objects())}


def run_soak(config: str, steps: int, every: int, out: Path, overrides: list[str], log=print) -> list[dict]:
    """Train `steps` steps in this process, sampling memory after step 1 and every `every` steps."""
    from iwm import train as train_mod
    from iwm.config import load_config

    out.mkdir(parents=True, exist_ok=True)
    base = [f"optimization.max_steps={steps}", "eval.at_end=false", f"logging.folder={out / 'run'}",
            "logging.tensorboard=false", "logging.progress_bar=off", "logging.checkpoint_every=0",
            "meta.load_checkpoint=false"]
    cfg = load_config(config, base + list(overrides))
    rows: list[dict] = []
    csv_path = out / "rss.csv"
    csv_file = open(csv_path, "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=_FIELDS)
    writer.writeheader()
    t0 = time.time()

    # The training loop has no callback; the metrics writer sees every step, so it samples.
    class SamplingWriter(train_mod.MetricsWriter):
        def log_step(self, row):
            super().log_step(row)
            done = row["step"] + 1
            if done == 1 or done % every == 0 or done == steps:
                s = sample(done, t0)
                rows.append(s)
                writer.writerow(s)
                csv_file.flush()
                log(f"rss: step {done} rss {s['rss']:.0f}MB hwm {s['hwm']:.0f}MB workers {s['workers_rss']:.0f}MB "
                    f"heap in-use {s['heap_in_use']:.0f}MB free {s['heap_free']:.0f}MB objects {s['py_objects']}",
                    flush=True)

    original = train_mod.MetricsWriter
    train_mod.MetricsWriter = SamplingWriter
    try:
        train_mod.Trainer(cfg, log=lambda *a, **k: None).train()
    finally:
        train_mod.MetricsWriter = original
        csv_file.close()
    return rows


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) if v not in ("", "None") else float("nan") for k, v in r.items()}
                for r in csv.DictReader(f)]


def plot(series: dict[str, list[dict]], png: Path, title: str = "") -> None:
    """RSS (solid) and peak RSS (dashed) against step for each labelled run; workers on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for i, (label, rows) in enumerate(series.items()):
        color = f"C{i}"
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["rss"] for r in rows], color=color, lw=1.2, label=f"{label}: RSS")
        ax.plot(steps, [r["hwm"] for r in rows], color=color, lw=1, ls="--", label=f"{label}: peak RSS")
        ax2.plot(steps, [r["heap_in_use"] for r in rows], color=color, lw=1.2, label=f"{label}: malloc in use")
        ax2.plot(steps, [r["workers_rss"] for r in rows], color=color, lw=1, ls=":", label=f"{label}: workers RSS")
    ax.set_xlabel("step")
    ax.set_ylabel("MB")
    ax.set_title(title or "main process")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.set_xlabel("step")
    ax2.set_ylabel("MB")
    ax2.set_title("live malloc bytes; DataLoader workers")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=25, help="sample every this many steps")
    p.add_argument("--out", type=Path, default=Path("/tmp/iwm-rss-soak"))
    p.add_argument("--plot-only", nargs="*", metavar="LABEL=CSV",
                   help="no run: plot these CSVs together into --png")
    p.add_argument("--png", type=Path, help="plot path (default OUT/rss.png)")
    p.add_argument("--title", default="")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    if args.plot_only is not None:
        series = {}
        for item in args.plot_only:
            label, _, path = item.rpartition("=")  # labels may hold "=", paths rarely do
            series[label] = read_csv(Path(path))
        plot(series, args.png or args.out / "rss.png", args.title)
        return 0
    if args.steps <= 0 or args.every <= 0:
        p.error("--steps and --every must be positive")
    rows = run_soak(args.config, args.steps, args.every, args.out, args.overrides)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
                   if k in os.environ)
    plot({env or "default": rows}, args.png or args.out / "rss.png", args.title)
    print(f"wrote {args.out / 'rss.csv'} and {args.png or args.out / 'rss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One command, one report: every op suite and the training step, against every baseline.

    python -m benchmarks.report [--device cpu|cuda] [--quick] [--out DIR] [--suites ema,gather,...]

Writes DIR/report.md (tables), DIR/report.json (every figure with its configuration, the device and
library versions, the measured ceilings) and DIR/<suite>.png (time per implementation and case).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .common import Ceilings, Row, device_name, environment, measure_ceilings

# Suites in report order; a suite module exposes run(device, quick, progress) -> list[Row].
SUITES = ["ema", "gather", "attention", "augment", "step"]


def _fmt(value, digits=3):
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def speedups(rows: list[Row]) -> dict[int, float]:
    """Row index -> speed relative to its baseline row (same suite and case)."""
    by_case = {}
    for r in rows:
        if r.ms:
            by_case[(r.suite, r.case, r.impl)] = r.ms
    out = {}
    for i, r in enumerate(rows):
        base = by_case.get((r.suite, r.case, r.baseline)) if r.baseline else None
        if base and r.ms:
            out[i] = base / r.ms
    return out


def markdown(rows: list[Row], env: dict, ceilings: Ceilings, elapsed_s: float, command: str) -> str:
    lines = [f"# iwm benchmark report — {env['device']}", "",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- command: `{command}`",
             f"- torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, iwm {env['iwm']}",
             f"- ceilings measured in this run: copy {ceilings.copy_gbps:.1f} GB/s, "
             f"{ceilings.matmul_dtype} matmul {ceilings.matmul_tflops:.2f} TFLOP/s",
             f"- wall time {elapsed_s:.0f} s", ""]
    ratio = speedups(rows)
    for suite in dict.fromkeys(r.suite for r in rows):
        lines += [f"## {suite}", "",
                  "| case | implementation | ms | GB/s | TFLOP/s | % of ceiling | speedup | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for i, r in enumerate(rows):
            if r.suite != suite:
                continue
            frac = (r.gbps / ceilings.copy_gbps if r.gbps else
                    r.tflops / ceilings.matmul_tflops if r.tflops else None)
            speed = f"{ratio[i]:.2f}× vs {r.baseline}" if i in ratio else ""
            extra = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}" for k, v in r.extra.items())
            note = "; ".join(x for x in (extra, r.note) if x)
            lines.append(f"| {r.case} | {r.impl} | {_fmt(r.ms)} | {_fmt(r.gbps)} | {_fmt(r.tflops)} | "
                         f"{_fmt(frac * 100 if frac else None)} | {speed} | {note} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for suite in dict.fromkeys(r.suite for r in rows):
        srows = [r for r in rows if r.suite == suite and r.ms]
        if not srows:
            continue
        cases = list(dict.fromkeys(r.case for r in srows))
        impls = list(dict.fromkeys(r.impl for r in srows))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) + 3), 4.5))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for c, case in enumerate(cases):
                match = [r.ms for r in srows if r.case == case and r.impl == impl]
                if match:
                    xs.append(c + j * width)
                    ys.append(match[0])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
        ax.set_xticklabels([c[:40] for c in cases], rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("ms (lower is better)")
        ax.set_title(f"{suite}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing budgets")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated subset of " + ",".join(SUITES))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def progress(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    progress(f"device: {device_name(device)}; measuring ceilings")
    ceilings = measure_ceilings(device, args.quick)
    progress(f"copy {ceilings.copy_gbps:.1f} GB/s, matmul {ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_dtype})")
    rows: list[Row] = []
    skipped = {}
    for name in [s.strip() for s in args.suites.split(",") if s.strip()]:
        if name not in SUITES:
            parser.error(f"--suites: unknown suite {name!r}")
        try:
            module = importlib.import_module(f"benchmarks.suites.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"benchmarks.suites.{name}":
                skipped[name] = "not implemented yet"
                progress(f"suite {name}: not implemented yet")
                continue
            raise
        try:
            rows += module.run(device, args.quick, progress)
        except Exception as exc:  # one broken suite must not lose the others' figures
            skipped[name] = f"failed: {exc.__class__.__name__}: {exc}"
            progress(f"suite {name} FAILED: {exc!r}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = environment(device)
    elapsed = time.time() - started
    command = "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(rows, env, ceilings, elapsed, command)
    if skipped:
        md += "\n## suites not run\n\n" + "\n".join(f"- {k}: {v}" for k, v in skipped.items()) + "\n"
    (args.out / "report.md").write_text(md)
    ratio = speedups(rows)
    payload = {"environment": env, "ceilings": ceilings.__dict__, "command": command, "elapsed_s": elapsed,
               "skipped_suites": skipped,
               "rows": [dict(r.to_dict(), speedup=ratio.get(i)) for i, r in enumerate(rows)]}
    (args.out / "report.json").write_text(json.dumps(payload, indent=1, default=str))
    plots = plot(rows, args.out)
    progress(f"wrote {args.out / 'report.md'}, report.json and {len(plots)} plot(s)")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

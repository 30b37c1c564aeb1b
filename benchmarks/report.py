"""One command, one report: every op suite and the training step, against every baseline.

    python -m benchmarks.report [--device cpu|cuda] [--quick] [--out DIR] [--suites ema,gather,...]
                                [--time-budget SECONDS]

Writes, under DIR:
  report.md    a headline table (one line per op and per step configuration: our best against the
               main baseline), then per suite every case and implementation: ms, GB/s or TFLOP/s, the
               fraction of the ceiling measured in this run, the speedup against the named baseline;
               the step's time breakdown; what did not run and why (optional baselines that do not
               import or work here, skipped variants).
  report.json  every figure with its configuration, the ceilings, the device and library versions.
  <suite>.png  time per implementation and case; step-breakdown.png, the step split per phase.
The files are rewritten after each suite, so a run that is stopped keeps what it finished. The
headline table is printed at the end.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from .common import TAKING_TURNS, Ceilings, Row, device_name, environment, measure_ceilings, set_deadline

# Suites in report order; a suite module exposes run(device, quick, progress) -> list[Row].
SUITES = ["ema", "gather", "attention", "linear", "augment", "step", "data"]
# Share of a --time-budget each suite gets (of what is left when it starts, against the suites after it).
WEIGHTS = {"ema": 1.0, "gather": 1.0, "attention": 1.5, "linear": 0.5, "augment": 1.0, "step": 4.0, "data": 1.0}
AUGMENT = "views"  # the step breakdown's phase for the two views (iwm.step's phase names) (shown as a share of the step)


def _fmt(value, digits=3):
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def is_ours(impl: str) -> bool:
    return impl.startswith("ours")


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


def fraction_of_ceiling(r: Row, ceilings: Ceilings) -> Optional[float]:
    if r.gbps:
        return r.gbps / ceilings.copy_gbps
    if r.tflops:
        return r.tflops / ceilings.matmul_tflops
    return None


def headline(rows: list[Row], ceilings: Ceilings) -> list[dict]:
    """One entry per headline case (rows marked `headline`): our fastest implementation that does the
    baseline's work against the case's main baseline, against the fastest baseline at equal semantics,
    and against every other timed implementation. Our rows that change the work (`same_work=False`:
    less work by design, or more) are never the headline's "ours"; they are listed with what they change."""
    out = []
    cases = list(dict.fromkeys((r.suite, r.case) for r in rows if r.headline))
    for suite, case in cases:
        crow = [r for r in rows if r.suite == suite and r.case == case]
        ours = sorted((r for r in crow if is_ours(r.impl) and r.ms and r.same_work), key=lambda r: r.ms)
        named = [r.baseline for r in crow if r.baseline]
        base_name = named[0] if named else None
        base = next((r for r in crow if r.impl == base_name and r.ms), None)
        equal = sorted((r for r in crow if not is_ours(r.impl) and r.ms and r.same_work and r.baseline),
                       key=lambda r: r.ms)
        entry = {"suite": suite, "case": case, "ours": None, "ours_ms": None, "baseline": base_name,
                 "baseline_ms": base.ms if base else None, "speedup": None, "ceiling_fraction": None,
                 "best_baseline": equal[0].impl if equal else None,
                 "best_baseline_ms": equal[0].ms if equal else None, "speedup_vs_best": None,
                 "others": {}, "different_work": {}, "held_equal": "", "note": ""}
        if ours:
            best = ours[0]
            entry.update(ours=best.impl, ours_ms=best.ms, ceiling_fraction=fraction_of_ceiling(best, ceilings),
                         held_equal=best.held_equal)
            if base:
                entry["speedup"] = base.ms / best.ms
            if equal:
                entry["speedup_vs_best"] = equal[0].ms / best.ms
            for r in crow:
                if r.ms and not is_ours(r.impl) and r.impl != base_name and r.same_work:
                    entry["others"][r.impl] = r.ms / best.ms
                elif r.ms and is_ours(r.impl) and not r.same_work and base:
                    entry["different_work"][r.impl] = {"speedup": base.ms / r.ms,   # its own, over the baseline
                                                       "differs": r.differs or "less work by design",
                                                       "speedup_taking_turns": r.extra.get(TAKING_TURNS)}
            if "img/s" in best.extra:
                entry["img/s"] = best.extra["img/s"]
            if best.extra.get(TAKING_TURNS):
                entry["speedup_taking_turns"] = best.extra[TAKING_TURNS]
        else:
            why = [r.note for r in crow if is_ours(r.impl) and r.same_work and r.note]
            entry["note"] = "ours did not run" + (f": {why[0]}" if why else "")
        if base is None and base_name:
            why = [r.note for r in crow if r.impl == base_name and r.note]
            missing = "baseline did not run" + (f": {why[0]}" if why else "")
            entry["note"] = "; ".join(x for x in (entry["note"], missing) if x)
        out.append(entry)
    return out


def headline_markdown(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    lines = ["| op | case | ours (best) | ms | main baseline | ms | speedup | vs best baseline (equal semantics) "
             "| % of ceiling | vs other baselines | held equal |",
             "|---|---|---|---:|---|---:|---:|---|---:|---|---|"]
    for e in entries:
        turns = [f"{e['speedup_taking_turns']:.2f}× vs {e['baseline']} taking turns step by step"] \
            if e.get("speedup_taking_turns") else []
        others = "; ".join(turns + [f"{v:.2f}× vs {k}" for k, v in e["others"].items()]
                           + [f"{k} ({d['differs']}): {d['speedup']:.2f}× the baseline" + (
                               f" ({d['speedup_taking_turns']:.2f}× taking turns)" if d.get("speedup_taking_turns") else "")
                              for k, d in e.get("different_work", {}).items()])
        if e["note"]:
            others = "; ".join(x for x in (others, e["note"]) if x)
        speed = f"**{e['speedup']:.2f}×**" if e["speedup"] else "—"
        best = (f"{e['speedup_vs_best']:.2f}× vs {e['best_baseline']}" if e.get("speedup_vs_best") else "—")
        frac = _fmt(e["ceiling_fraction"] * 100) if e["ceiling_fraction"] else "—"
        lines.append(f"| {e['suite']} | {e['case']} | {e['ours'] or '—'} | {_fmt(e['ours_ms'])} | "
                     f"{e['baseline'] or '—'} | {_fmt(e['baseline_ms'])} | {speed} | {best} | {frac} | {others} | "
                     f"{e.get('held_equal') or '—'} |")
    return lines


def _extra_text(r: Row) -> str:
    parts = []
    for k, v in r.extra.items():
        if isinstance(v, dict):
            continue  # tables of their own (breakdown)
        parts.append(f"{k} {_fmt(v) if isinstance(v, float) else v}")
    return ", ".join(parts)


def breakdown_markdown(rows: list[Row]) -> list[str]:
    """Per case, one line per implementation: ms and share of the step for each phase."""
    lines = []
    with_split = [r for r in rows if isinstance(r.extra.get("breakdown_ms"), dict)]
    for case in dict.fromkeys(r.case for r in with_split):
        crow = [r for r in with_split if r.case == case]
        phases = list(dict.fromkeys(p for r in crow for p in r.extra["breakdown_ms"]))
        lines += [f"### {crow[0].suite} breakdown — {case}", "",
                  "ms per phase (share of the step); mean over the timed steps", "",
                  "| implementation | " + " | ".join(phases) + " | total |",
                  "|---|" + "---:|" * (len(phases) + 1)]
        for r in crow:
            split = r.extra["breakdown_ms"]
            total = sum(split.values()) or 1.0
            cells = [f"{_fmt(split[p])} ({100 * split[p] / total:.0f}%)" if p in split else "" for p in phases]
            lines.append(f"| {r.impl} | " + " | ".join(cells) + f" | {_fmt(total)} |")
        aug = [(r.impl, 100 * r.extra["breakdown_ms"][AUGMENT] / (sum(r.extra["breakdown_ms"].values()) or 1.0))
               for r in crow if AUGMENT in r.extra["breakdown_ms"]]
        if aug:  # where the two views' cost went (the fused augmentation's end-to-end claim)
            lines += ["", f"{AUGMENT}: " + ", ".join(f"{share:.1f}% of the step in {impl}" for impl, share in aug)]
        lines.append("")
    return lines


def not_run_markdown(rows: list[Row], skipped: dict) -> list[str]:
    """What did not run: optional baselines that do not import or work here, skipped variants, failures,
    and correctness warnings."""
    problems = [r for r in rows if r.note.startswith("MISMATCH")]
    missing: dict[str, dict[str, list[str]]] = {}   # reason -> implementation -> cases
    for r in rows:
        if r.ms is None and r.note and not r.extra and not r.note.startswith("MISMATCH"):
            missing.setdefault(r.note, {}).setdefault(r.impl, []).append(f"{r.suite}: {r.case}")
    lines = []
    if problems:
        lines += ["## Correctness warnings", ""]
        lines += [f"- {r.suite} | {r.case} | {r.impl}: {r.note}" for r in problems]
        lines.append("")
    if missing:
        lines += ["## Baselines and variants not available", ""]
        for why, impls in missing.items():
            cases = [c for cs in impls.values() for c in cs]
            where = cases[0] if len(cases) == 1 else f"{len(cases)} cases, e.g. {cases[0]}"
            names = ", ".join(f"**{impl}**" for impl in impls)
            lines.append(f"- {names} — {why} ({where})")
        lines.append("")
    if skipped:
        lines += ["## Suites not run", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    return lines


def markdown(rows: list[Row], env: dict, ceilings: Ceilings, elapsed_s: float, command: str,
             skipped: Optional[dict] = None) -> str:
    lines = [f"# iwm benchmark report — {env['device']}", "",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- command: `{command}`",
             f"- torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, iwm {env['iwm']}"
             + (f" (git {env['git_commit']})" if env.get("git_commit") else ""),
             f"- ceilings measured in this run: copy {ceilings.copy_gbps:.1f} GB/s, "
             f"{ceilings.matmul_dtype} matmul {ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_engine})",
             f"- wall time {elapsed_s:.0f} s", ""]
    top = headline_markdown(headline(rows, ceilings))
    if top:
        lines += ["## Headline", "",
                  "Our fastest implementation of each op (representative case) and of the training step, "
                  "against the main baseline; % of ceiling: of the copy bandwidth (memory-bound ops) or the "
                  "matmul rate (attention; the step's model FLOPs utilisation). \"held equal\" says what the "
                  "comparison keeps the same; our rows that change the work (another mask form or model "
                  "option) are listed with what they change, never as \"ours (best)\".", ""] + top + [""]
    ratio = speedups(rows)
    for suite in dict.fromkeys(r.suite for r in rows):
        lines += [f"## {suite}", "",
                  "| case | implementation | ms | GB/s | TFLOP/s | % of ceiling | speedup | note |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for i, r in enumerate(rows):
            if r.suite != suite:
                continue
            frac = fraction_of_ceiling(r, ceilings)
            speed = f"{ratio[i]:.2f}× vs {r.baseline}" if i in ratio else ""
            changes = f"changes: {r.differs}" if r.differs else ""
            note = "; ".join(x for x in (changes, _extra_text(r), r.note) if x)
            lines.append(f"| {r.case} | {r.impl} | {_fmt(r.ms)} | {_fmt(r.gbps)} | {_fmt(r.tflops)} | "
                         f"{_fmt(frac * 100 if frac else None)} | {speed} | {note} |")
        lines.append("")
        lines += breakdown_markdown([r for r in rows if r.suite == suite])
    lines += not_run_markdown(rows, skipped or {})
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot(rows: list[Row], out: Path) -> list[Path]:
    plt = _pyplot()
    if plt is None:
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
        times = [r.ms for r in srows]
        if max(times) / min(times) > 50:
            ax.set_yscale("log")
        ax.set_ylabel("ms (lower is better)")
        ax.set_title(f"{suite}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    path = plot_breakdown(rows, out / "step-breakdown.png", plt)
    return paths + ([path] if path else [])


def plot_breakdown(rows: list[Row], path: Path, plt=None) -> Optional[Path]:
    """Stacked bars: one per implementation, one panel per case, a colour per phase."""
    plt = plt or _pyplot()
    split_rows = [r for r in rows if isinstance(r.extra.get("breakdown_ms"), dict)]
    if plt is None or not split_rows:
        return None
    cases = list(dict.fromkeys(r.case for r in split_rows))
    phases = list(dict.fromkeys(p for r in split_rows for p in r.extra["breakdown_ms"]))
    colours = plt.get_cmap("tab10" if len(phases) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        crow = [r for r in split_rows if r.case == case]
        bottoms = [0.0] * len(crow)
        for k, phase in enumerate(phases):
            vals = [r.extra["breakdown_ms"].get(phase, 0.0) for r in crow]
            ax.bar(range(len(crow)), vals, 0.7, bottom=bottoms, label=phase, color=colours(k))
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.set_xticks(range(len(crow)))
        ax.set_xticklabels([r.impl for r in crow], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("ms per step")
        ax.set_title(case, fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("training step: time per phase")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out: Path, rows: list[Row], env: dict, ceilings: Ceilings, elapsed: float, command: str,
          skipped: dict, plots: bool = True) -> str:
    md = markdown(rows, env, ceilings, elapsed, command, skipped)
    ratio = speedups(rows)
    payload = {"environment": env, "ceilings": ceilings.__dict__, "command": command, "elapsed_s": elapsed,
               "skipped_suites": skipped, "headline": headline(rows, ceilings),
               "rows": [dict(r.to_dict(), speedup=ratio.get(i), ceiling_fraction=fraction_of_ceiling(r, ceilings))
                        for i, r in enumerate(rows)]}
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / "report.md").write_text(md)
    if plots:
        plot(rows, out)
    return md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing budgets")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"))
    parser.add_argument("--suites", default=",".join(SUITES),
                        help="comma-separated subset of " + ",".join(SUITES) + ", run in this order")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="share this many seconds between the suites: each skips its optional, expensive "
                             "parts (torch.compile, extra configurations) when its share runs out")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    for name in names:
        if name not in SUITES:
            parser.error(f"--suites: unknown suite {name!r}")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    command = "python -m benchmarks.report " + " ".join(argv if argv is not None else sys.argv[1:])

    def progress(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    progress(f"device: {device_name(device)}; measuring ceilings")
    ceilings = measure_ceilings(device, args.quick)
    progress(f"copy {ceilings.copy_gbps:.1f} GB/s, matmul {ceilings.matmul_tflops:.2f} TFLOP/s ({ceilings.matmul_dtype}, {ceilings.matmul_engine})")
    env = environment(device)
    env.update(quick=args.quick, time_budget_s=args.time_budget)
    rows: list[Row] = []
    skipped = {}
    for n, name in enumerate(names):
        share = None
        if args.time_budget is not None:
            left = args.time_budget - (time.time() - started)
            weights = sum(WEIGHTS[s] for s in names[n:])
            share = left * WEIGHTS[name] / weights
            if left < 10:
                skipped[name] = f"skipped: the --time-budget of {args.time_budget:.0f} s is spent"
                progress(f"[{n + 1}/{len(names)}] suite {name}: {skipped[name]}")
                continue
        set_deadline(share)
        progress(f"[{n + 1}/{len(names)}] suite {name}" + (f" (time share {share:.0f} s)" if share else ""))
        t0 = time.time()
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
        finally:
            set_deadline(None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        progress(f"suite {name} done in {time.time() - t0:.0f} s")
        order = {s: i for i, s in enumerate(SUITES)}
        rows.sort(key=lambda r: order.get(r.suite, len(SUITES)))  # stable: keeps each suite's own order
        # Written after every suite: a run stopped by a timeout keeps what it finished.
        write(args.out, rows, env, ceilings, time.time() - started, command, skipped, plots=False)
    md = write(args.out, rows, env, ceilings, time.time() - started, command, skipped)
    progress(f"wrote {args.out / 'report.md'}, report.json and the plots")
    entries = headline(rows, ceilings)
    print("\n" + "\n".join(headline_markdown(entries) or ["(no headline cases)"]))
    problems = [r for r in rows if r.note.startswith("MISMATCH")]
    if problems:
        print(f"\n{len(problems)} correctness warning(s): see report.md")
    print(f"\nfull report: {args.out / 'report.md'} ({len(md.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

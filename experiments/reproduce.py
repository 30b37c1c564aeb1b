"""Small-scale reproduction of IWM's qualitative findings on the built-in photographs (2 CPU cores).

    python experiments/reproduce.py [--out runs/repro] [--doc docs/reproduction.md] [--steps N] [--seed S]
    python experiments/reproduce.py --ablation [--seeds 0 1 2] [--steps N]

Default mode: trains the `tiny` preset six times — conditioning none / feature / sequence, each with a
shallow and a deep predictor, the paper's (repeated-context) predictor layout — with the same data,
masks and seed, then evaluates the world-model MRR (K=256) and the linear probe of each. Expected from
the paper: no conditioning -> MRR near chance; feature and sequence conditioning -> far above chance;
the deeper predictor at least as equivariant (higher MRR).

--ablation: the predictor layout. shared_context in {false, true} x conditioning in {feature, sequence},
plus conditioning none (repeated layout) as the floor, at the tiny preset's predictor depth, once per
seed; reports mean ± std over the seeds of the MRR and the linear-probe top-1, the median step time of
each cell, and whether the shared-vs-repeated difference is within seed noise (Welch's t test).

Each mode rewrites only its own section of --doc (the other is kept) and a plot next to it. Settings
that finished under --out are reused and an interrupted one resumes, so the script can be run again
after a stop.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(cond, depth) for cond in ("none", "feature", "sequence") for depth in (2, 6)]
# (conditioning, shared_context): the layout ablation, with the unconditioned predictor as the floor.
ABLATION_CELLS = [("none", False), ("feature", False), ("feature", True), ("sequence", False), ("sequence", True)]
ABLATION_DEPTH = 4          # the tiny preset's predictor depth (the layouts differ from depth 2 on)
ABLATION_METRICS = (("mrr", "MRR"), ("linear_top1", "linear top-1"))


def layout_name(shared_context: bool) -> str:
    return "shared" if shared_context else "repeated"


def median_step_time(folder: Path) -> float:
    """Median `step_time_s` over the rows of a run's metrics.jsonl (nan when there are none)."""
    times = []
    path = folder / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a stop
            if isinstance(row, dict) and isinstance(row.get("step_time_s"), (int, float)):
                times.append(float(row["step_time_s"]))
    return statistics.median(times) if times else math.nan


def run_one(cond: str, depth: int, out: Path, steps: int, seed: int, fresh: bool,
            shared_context: bool = False) -> dict:
    # Everything that changes the result names the folder, so a run is only ever reused or resumed
    # under the settings that made it (folders without a layout in the name predate the layout
    # choice and are never reused).
    layout = layout_name(shared_context)
    folder = out / (f"{cond}-depth{depth}-{layout}-seed{seed}" + (f"-steps{steps}" if steps else ""))
    summary = folder / "reproduce.json"
    if summary.exists() and not fresh:  # finished earlier: reuse; an interrupted run resumes from latest.pt
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"meta.conditioning={cond}", f"meta.pred_depth={depth}",
           f"meta.shared_context={'true' if shared_context else 'false'}", f"meta.seed={seed}",
           f"logging.folder={folder}", "logging.progress_bar=off", "eval.tasks=[mrr, linear]"]
    if fresh:
        cmd.append("meta.load_checkpoint=false")  # start over instead of resuming the finished run
    if steps:
        cmd.append(f"optimization.max_steps={steps}")
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    evals = sorted(folder.glob("eval-step*.json"), key=lambda p: int(p.stem.split("step")[1]))
    result = json.loads(evals[-1].read_text())
    result.update(conditioning=cond, pred_depth=depth, shared_context=shared_context, seed=seed,
                  wall_s=time.time() - t0, step_time_median_s=median_step_time(folder),
                  command=" ".join(cmd[1:]).replace(f"{ROOT}/", ""))
    summary.write_text(json.dumps(result, indent=1))
    return result


def findings(results: list[dict]) -> list[str]:
    """The paper's qualitative claims, each stated as held or not on `results`."""
    by = {(r["conditioning"], r["pred_depth"]): r for r in results}
    chance = results[0]["mrr_chance"]
    out = []
    none = [r["mrr"] for r in results if r["conditioning"] == "none"]
    if none:
        ok = all(abs(m - chance) <= 0.1 * chance for m in none)
        out.append(f"no conditioning gives a predictor that ignores the action (MRR at chance, within 10 %): "
                   f"{'holds' if ok else 'does not hold'} ({', '.join(f'{m:.3f}' for m in none)} vs {chance:.3f})")
    for cond in ("feature", "sequence"):
        runs = sorted((d, r["mrr"]) for (c, d), r in by.items() if c == cond)
        if not runs:
            continue
        above = all(m > 1.5 * chance for _, m in runs)
        out.append(f"{cond} conditioning learns the transformation (MRR above 1.5x chance): "
                   f"{'holds' if above else 'does not hold'} ({', '.join(f'depth {d}: {m:.3f}' for d, m in runs)})")
        if len(runs) > 1:
            deeper = runs[-1][1] >= runs[0][1]
            out.append(f"{cond}: the deeper predictor is at least as equivariant: "
                       f"{'holds' if deeper else 'does not hold'} ({runs[0][1]:.3f} -> {runs[-1][1]:.3f})")
    return out


TITLE = "# Small-scale reproduction of IWM's findings"


def update_section(doc: Path, name: str, body: str) -> None:
    """Write `body` as the section `name` of doc (between its markers), keeping every other section."""
    begin, end = f"<!-- section: {name} -->", f"<!-- end section: {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else TITLE + "\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text if text.endswith("\n") else text + "\n")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_doc(results: list[dict], doc: Path, seed: int, steps: int, total_s: float) -> None:
    layouts = sorted({layout_name(r.get("shared_context", False)) for r in results})
    lines = ["## Conditioning and predictor depth (six runs)", "",
             "`tiny` preset (64 px, patch 8, 6x192 encoder), built-in photographs, 2 CPU cores; one seed "
             f"({seed}); {'full demo schedule' if not steps else f'{steps} steps'} per run; predictor layout: "
             f"{', '.join(layouts)}; {total_s / 60:.0f} min of training "
             "and evaluation recorded (a run resumed after a stop counts only its last part).",
             "Command: `python experiments/reproduce.py" + (f" --steps {steps}" if steps else "") + f" --seed {seed}`", "",
             "| conditioning | predictor depth | MRR (K=256) | chance | MRR top-1 | MRR top-5 | linear top-1 | "
             "linear top-5 | random-init encoder top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['conditioning']} | {r['pred_depth']} | {r['mrr']:.3f} | {r['mrr_chance']:.3f} | "
                     f"{r['mrr_top1']:.3f} | {r['mrr_top5']:.3f} | {r['linear_top1']:.3f} | {r['linear_top5']:.3f} | "
                     f"{r['linear_random_init_top1']:.3f} |")
    lines += ["", "The paper's findings, checked on these numbers:", ""] + [f"- {c}" for c in findings(results)]
    plot = doc.with_suffix(".png")
    lines += ["", f"![MRR and linear probe per setting]({plot.name})", "", "Per-run commands:", ""]
    lines += [f"- `python {r['command']}`" for r in results]
    update_section(doc, "findings", "\n".join(lines))
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = [f"{r['conditioning']}\nd={r['pred_depth']}" for r in results]
    axes[0].bar(labels, [r["mrr"] for r in results], color="tab:blue")
    axes[0].axhline(results[0]["mrr_chance"], color="k", ls="--", lw=1, label="chance")
    axes[0].set_ylabel("world-model MRR (K=256)")
    axes[0].legend()
    axes[1].bar(labels, [r["linear_top1"] for r in results], color="tab:green", label="pretrained")
    axes[1].plot(labels, [r["linear_random_init_top1"] for r in results], "k_", ms=20, label="random init")
    axes[1].set_ylabel("linear probe top-1")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


# ---- the predictor-layout ablation ------------------------------------------------------------------
def mean_std(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def t_critical(df: float, level: float = 0.975) -> float:
    """Student's t quantile (two-sided 95 % by default)."""
    try:
        from scipy.stats import t
    except ImportError:
        t = None
    if t is not None:
        return float(t.ppf(level, df))
    # Without scipy: the 97.5 % quantile at the next lower integer df (conservative).
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    return table[min(max(int(df), 1), len(table)) - 1] if df < 11 else 2.201 if df < 20 else 2.086 if df < 30 else 1.96


def welch(a: list, b: list) -> "dict | None":
    """Welch's t test of mean(b) - mean(a); None when either side has fewer than two values, or no
    spread at all (then the test is undefined)."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0:
        return None
    t = (mb - ma) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0))
    return {"diff": mb - ma, "t": t, "df": df, "t_crit": t_critical(df), "noise": abs(t) <= t_critical(df)}


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (conditioning, shared_context) cell, in ABLATION_CELLS order (others after):
    the seeds, mean ± std of each metric, and the median of the runs' median step times."""
    cells: dict = {}
    for r in results:
        cells.setdefault((r["conditioning"], bool(r.get("shared_context", False))), []).append(r)
    order = [c for c in ABLATION_CELLS if c in cells] + sorted(c for c in cells if c not in ABLATION_CELLS)
    rows = []
    for cond, shared in order:
        runs = cells[(cond, shared)]
        row = {"conditioning": cond, "shared_context": shared, "seeds": sorted(r.get("seed", 0) for r in runs),
               "mrr_chance": runs[0].get("mrr_chance", math.nan)}
        for key, _ in ABLATION_METRICS:
            row[key] = [r[key] for r in runs]
            row[key + "_mean"], row[key + "_std"] = mean_std(row[key])
        times = [r.get("step_time_median_s", math.nan) for r in runs]
        times = [t for t in times if not math.isnan(t)]
        row["step_time_s"] = statistics.median(times) if times else math.nan
        rows.append(row)
    return rows


def layout_verdicts(rows: list[dict]) -> list[str]:
    """Per conditioning and metric: is shared minus repeated within seed noise?"""
    by = {(r["conditioning"], r["shared_context"]): r for r in rows}
    out = []
    for cond in sorted({c for c, _ in by}):
        rep, sh = by.get((cond, False)), by.get((cond, True))
        if rep is None or sh is None:
            continue
        for key, label in ABLATION_METRICS:
            test = welch(rep[key], sh[key])
            head = (f"{cond}, {label}: shared {sh[key + '_mean']:.3f} ± {sh[key + '_std']:.3f} vs repeated "
                    f"{rep[key + '_mean']:.3f} ± {rep[key + '_std']:.3f}")
            if test is None:
                out.append(f"{head}: cannot tell (needs at least two seeds per layout with some spread)")
                continue
            verdict = ("within seed noise (|t| below the critical value)" if test["noise"] else
                       f"beyond seed noise: shared is {'higher' if test['diff'] > 0 else 'lower'}")
            out.append(f"{head} (difference {test['diff']:+.3f}, Welch t = {test['t']:.2f}, df {test['df']:.1f}, "
                       f"95 % critical |t| {test['t_crit']:.2f}): {verdict}")
        if rep["step_time_s"] > 0 and sh["step_time_s"] > 0:
            out.append(f"{cond}, step time: shared {sh['step_time_s'] * 1e3:.0f} ms vs repeated "
                       f"{rep['step_time_s'] * 1e3:.0f} ms (median): the shared layout runs "
                       f"{rep['step_time_s'] / sh['step_time_s']:.2f}x as fast")
    return out


def write_ablation_doc(results: list[dict], doc: Path, seeds: list, steps: int, depth: int) -> None:
    rows = aggregate(results)
    seed_text = " ".join(map(str, seeds))
    lines = ["## Predictor layout ablation: shared context vs repeated (the paper's)", "",
             f"`tiny` preset, predictor depth {depth}, seeds {seed_text}; "
             f"{'full demo schedule' if not steps else f'{steps} steps'} per run. Repeated = the paper's predictor "
             "(context repeated per target block, full attention); shared = the context computed once per sample, "
             "never attending to mask tokens (another model from depth 2 on). Mean ± sample std over the seeds; "
             "step time = the median over runs of each run's median `step_time_s` (metrics.jsonl, data wait included).",
             "Command: `python experiments/reproduce.py --ablation" + (f" --steps {steps}" if steps else "")
             + f" --seeds {seed_text}`", "",
             "| conditioning | predictor layout | seeds | MRR (K=256) | linear top-1 | median step time (ms) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['conditioning']} | {layout_name(r['shared_context'])} | {len(r['seeds'])} | "
                     f"{r['mrr_mean']:.3f} ± {r['mrr_std']:.3f} | "
                     f"{r['linear_top1_mean']:.3f} ± {r['linear_top1_std']:.3f} | "
                     f"{r['step_time_s'] * 1e3:.0f} |")
    verdicts = layout_verdicts(rows)
    lines += ["", "Shared minus repeated, judged against the spread over seeds (Welch's t test, two-sided 95 %):", ""]
    lines += [f"- {v}" for v in verdicts] or ["- no conditioning has both layouts in these results"]
    plot = doc.with_name(doc.stem + "-ablation.png")
    lines += ["", f"![MRR and linear probe per layout, mean ± std over seeds]({plot.name})"]
    update_section(doc, "ablation", "\n".join(lines))
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    labels = [f"{r['conditioning']}\n{layout_name(r['shared_context'])}" for r in rows]
    colours = ["tab:orange" if r["shared_context"] else "tab:blue" for r in rows]
    for ax, (key, label) in zip(axes, ABLATION_METRICS):
        ax.bar(labels, [r[key + "_mean"] for r in rows], yerr=[0 if math.isnan(r[key + "_std"]) else r[key + "_std"]
                                                               for r in rows], color=colours, capsize=4)
        ax.set_ylabel(label)
    axes[0].axhline(rows[0]["mrr_chance"], color="k", ls="--", lw=1, label="chance")
    axes[0].legend()
    axes[2].bar(labels, [r["step_time_s"] * 1e3 for r in rows], color=colours)
    axes[2].set_ylabel("median step time (ms)")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


def run_ablation(args) -> list[dict]:
    results = []
    for cond, shared in ABLATION_CELLS:
        for seed in args.seeds:
            print(f"== ablation: conditioning={cond} shared_context={shared} seed={seed}", flush=True)
            results.append(run_one(cond, ABLATION_DEPTH, args.out, args.steps, seed, args.fresh, shared_context=shared))
            (args.out / "ablation.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "repro")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reproduction.md")
    parser.add_argument("--steps", type=int, default=0, help="cap each run (0: the tiny config's schedule)")
    parser.add_argument("--seed", type=int, default=0, help="the six-run mode's seed")
    parser.add_argument("--ablation", action="store_true", help="run the predictor-layout ablation instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the ablation's seeds")
    parser.add_argument("--fresh", action="store_true", help="retrain settings that already finished under --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ablation:
        results = run_ablation(args)
        write_ablation_doc(results, args.doc, args.seeds, args.steps, ABLATION_DEPTH)
        print(args.doc.read_text())
        return 0
    results = []
    for cond, depth in SETTINGS:
        print(f"== conditioning={cond} pred_depth={depth}", flush=True)
        results.append(run_one(cond, depth, args.out, args.steps, args.seed, args.fresh))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(results, args.doc, args.seed, args.steps, sum(r["wall_s"] for r in results))
    print(args.doc.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

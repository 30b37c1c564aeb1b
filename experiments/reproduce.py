"""Small-scale reproduction of IWM's qualitative findings on the built-in photographs (2 CPU cores).

    python experiments/reproduce.py [--out runs/repro] [--doc docs/reproduction.md] [--steps N] [--seed S]
    python experiments/reproduce.py --ablation [--seeds 0 1 2] [--steps N]
    python experiments/reproduce.py --long [--long-epochs 42] [--eval-every 384] [--seed S]
    python experiments/reproduce.py --long --report-only [--run-folder PATH]

Default mode: trains the `tiny` preset six times — conditioning none / feature / sequence, each with a
shallow and a deep predictor, the paper's (repeated-context) predictor layout — with the same data,
masks and seed, then evaluates the world-model MRR (K=256) and the linear probe of each. Expected from
the paper: no conditioning -> MRR near chance; feature and sequence conditioning -> far above chance;
the deeper predictor at least as equivariant (higher MRR).

--ablation: the predictor layout. shared_context in {false, true} x conditioning in {feature, sequence},
plus conditioning none (repeated layout) as the floor, at the tiny preset's predictor depth, once per
seed; reports mean ± std over the seeds of the MRR and the linear-probe top-1, the median step time of
each cell, and whether the shared-vs-repeated difference is within seed noise (Welch's t test).

--long: MRR against training steps. One feature-conditioned run of the `tiny` preset, the paper's
layout, with a longer schedule (42 epochs = 2688 steps, 3x the demo) and an evaluation every 384
steps; reports MRR, its top-1/top-5 and the linear-probe top-1 per evaluation, and whether MRR is still
climbing at the end and where it levels off (by the rule stated in the text). --report-only writes the
section from a run folder's eval-step*.json files without training (--run-folder: one trained
elsewhere, for example with `python -m iwm.train` directly).

Each mode rewrites only its own section of --doc (the others are kept) and a plot next to it. Settings
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
# The long run: MRR against training steps, feature conditioning, the paper's layout.
LONG_CONDITIONING = "feature"
LONG_EPOCHS = 42            # 2688 steps on the tiny config: 3x the demo's 14 epochs
LONG_EVAL_EVERY = 384
LEVEL_TOL = 0.05            # MRR has levelled off when the last two evaluations differ by at most 5 %


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


def eval_files(folder: Path) -> list[Path]:
    """A run folder's eval-step<N>.json files (one per evaluation during or after training), by step."""
    return sorted(folder.glob("eval-step*.json"), key=lambda p: int(p.stem.split("step")[1]))


def eval_points(folder: Path) -> list[dict]:
    """The results of each evaluation of a run, in step order, each with its `step` (from the name)."""
    return [{**json.loads(path.read_text()), "step": int(path.stem.split("step")[1])} for path in eval_files(folder)]


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
    result = json.loads(eval_files(folder)[-1].read_text())
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


# ---- the report's table and plot, shared by every mode ---------------------------------------------
def markdown_table(columns: list, rows: list) -> list[str]:
    """Markdown lines of a table: `columns` are (header, alignment: "---" or "---:", cell(row) -> str)."""
    lines = ["| " + " | ".join(head for head, _, _ in columns) + " |",
             "|" + "|".join(align for _, align, _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell(row) for _, _, cell in columns) + " |" for row in rows]


def bar_panels(plot: Path, labels: list, panels: list[dict]) -> None:
    """One bar chart per panel, side by side, saved to `plot` (nothing without matplotlib). A panel:
    values, ylabel, color, and optionally label, yerr (error bars), marks + marks_label (a tick per
    bar), chance (a dashed line); a panel with a labelled artist gets a legend."""
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, panel in zip(axes, panels):
        extra = {"yerr": panel["yerr"], "capsize": 4} if "yerr" in panel else {}
        if "label" in panel:
            extra["label"] = panel["label"]
        ax.bar(labels, panel["values"], color=panel["color"], **extra)
        if "chance" in panel:
            ax.axhline(panel["chance"], color="k", ls="--", lw=1, label="chance")
        if "marks" in panel:
            ax.plot(labels, panel["marks"], "k_", ms=20, label=panel["marks_label"])
        ax.set_ylabel(panel["ylabel"])
        if any(key in panel for key in ("label", "chance", "marks")):
            ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


def _f3(key: str):
    return lambda row: f"{row[key]:.3f}"


FINDINGS_COLUMNS = [("conditioning", "---", lambda r: r["conditioning"]),
                    ("predictor depth", "---:", lambda r: str(r["pred_depth"])),
                    ("MRR (K=256)", "---:", _f3("mrr")), ("chance", "---:", _f3("mrr_chance")),
                    ("MRR top-1", "---:", _f3("mrr_top1")), ("MRR top-5", "---:", _f3("mrr_top5")),
                    ("linear top-1", "---:", _f3("linear_top1")), ("linear top-5", "---:", _f3("linear_top5")),
                    ("random-init encoder top-1", "---:", _f3("linear_random_init_top1"))]


def write_doc(results: list[dict], doc: Path, seed: int, steps: int, total_s: float) -> None:
    layouts = sorted({layout_name(r.get("shared_context", False)) for r in results})
    lines = ["## Conditioning and predictor depth (six runs)", "",
             "`tiny` preset (64 px, patch 8, 6x192 encoder), built-in photographs, 2 CPU cores; one seed "
             f"({seed}); {'full demo schedule' if not steps else f'{steps} steps'} per run; predictor layout: "
             f"{', '.join(layouts)}; {total_s / 60:.0f} min of training "
             "and evaluation recorded (a run resumed after a stop counts only its last part).",
             "Command: `python experiments/reproduce.py" + (f" --steps {steps}" if steps else "") + f" --seed {seed}`", ""]
    lines += markdown_table(FINDINGS_COLUMNS, results)
    lines += ["", "The paper's findings, checked on these numbers:", ""] + [f"- {c}" for c in findings(results)]
    plot = doc.with_suffix(".png")
    lines += ["", f"![MRR and linear probe per setting]({plot.name})", "", "Per-run commands:", ""]
    lines += [f"- `python {r['command']}`" for r in results]
    update_section(doc, "findings", "\n".join(lines))
    bar_panels(plot, [f"{r['conditioning']}\nd={r['pred_depth']}" for r in results], [
        {"values": [r["mrr"] for r in results], "color": "tab:blue", "chance": results[0]["mrr_chance"],
         "ylabel": "world-model MRR (K=256)"},
        {"values": [r["linear_top1"] for r in results], "color": "tab:green", "label": "pretrained",
         "marks": [r["linear_random_init_top1"] for r in results], "marks_label": "random init",
         "ylabel": "linear probe top-1"}])


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


def _mean_pm_std(key: str):
    return lambda row: f"{row[key + '_mean']:.3f} ± {row[key + '_std']:.3f}"


ABLATION_COLUMNS = [("conditioning", "---", lambda r: r["conditioning"]),
                    ("predictor layout", "---", lambda r: layout_name(r["shared_context"])),
                    ("seeds", "---:", lambda r: str(len(r["seeds"]))),
                    ("MRR (K=256)", "---:", _mean_pm_std("mrr")), ("linear top-1", "---:", _mean_pm_std("linear_top1")),
                    ("median step time (ms)", "---:", lambda r: f"{r['step_time_s'] * 1e3:.0f}")]


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
             + f" --seeds {seed_text}`", ""]
    lines += markdown_table(ABLATION_COLUMNS, rows)
    verdicts = layout_verdicts(rows)
    lines += ["", "Shared minus repeated, judged against the spread over seeds (Welch's t test, two-sided 95 %):", ""]
    lines += [f"- {v}" for v in verdicts] or ["- no conditioning has both layouts in these results"]
    plot = doc.with_name(doc.stem + "-ablation.png")
    lines += ["", f"![MRR and linear probe per layout, mean ± std over seeds]({plot.name})"]
    update_section(doc, "ablation", "\n".join(lines))
    colours = ["tab:orange" if r["shared_context"] else "tab:blue" for r in rows]
    panels = [{"values": [r[key + "_mean"] for r in rows], "color": colours, "ylabel": label,
               "yerr": [0 if math.isnan(r[key + "_std"]) else r[key + "_std"] for r in rows]}
              for key, label in ABLATION_METRICS]
    panels[0]["chance"] = rows[0]["mrr_chance"]
    panels.append({"values": [r["step_time_s"] * 1e3 for r in rows], "color": colours,
                   "ylabel": "median step time (ms)"})
    bar_panels(plot, [f"{r['conditioning']}\n{layout_name(r['shared_context'])}" for r in rows], panels)


def run_ablation(args) -> list[dict]:
    results = []
    for cond, shared in ABLATION_CELLS:
        for seed in args.seeds:
            print(f"== ablation: conditioning={cond} shared_context={shared} seed={seed}", flush=True)
            results.append(run_one(cond, ABLATION_DEPTH, args.out, args.steps, seed, args.fresh, shared_context=shared))
            (args.out / "ablation.json").write_text(json.dumps(results, indent=1))
    return results


# ---- MRR against training steps: one long run ----------------------------------------------------
def long_folder(out: Path, epochs: int, every: int, seed: int) -> Path:
    """The long run's folder: every setting that changes its curve is in the name."""
    return out / f"{LONG_CONDITIONING}-repeated-seed{seed}-epochs{epochs}-eval{every}"


def long_command(folder: Path, epochs: int, every: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
            f"meta.conditioning={LONG_CONDITIONING}", "meta.shared_context=false", f"meta.seed={seed}",
            f"optimization.epochs={epochs}", f"eval.every={every}", f"logging.folder={folder}",
            "logging.progress_bar=off", "eval.tasks=[mrr, linear]"]


def run_long(out: Path, epochs: int, every: int, seed: int, fresh: bool) -> Path:
    """Train the long run unless it finished under `out` (reused; an interrupted one resumes)."""
    folder = long_folder(out, epochs, every, seed)
    summary = folder / "reproduce.json"
    if summary.exists() and not fresh:
        return folder
    cmd = long_command(folder, epochs, every, seed) + (["meta.load_checkpoint=false"] if fresh else [])
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    summary.write_text(json.dumps({"command": " ".join(cmd[1:]).replace(f"{ROOT}/", ""), "wall_s": time.time() - t0,
                                   "eval_steps": [p["step"] for p in eval_points(folder)]}, indent=1))
    return folder


def run_settings(folder: Path, epochs: int, every: int, seed: int) -> dict:
    """What the run in `folder` was trained with: its config.yaml (the trainer's full dump) where there
    is one, else the --long settings; `planned_steps` is None when the folder does not say."""
    settings = {"conditioning": LONG_CONDITIONING, "shared_context": False, "preset": "tiny", "epochs": epochs,
                "every": every, "seed": seed, "planned_steps": None}
    path = folder / "config.yaml"
    if not path.exists():
        return settings
    import yaml  # the trainer's own dependency

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        meta, opt, data = cfg.get("meta", {}), cfg.get("optimization", {}), cfg.get("data", {})
        settings.update(conditioning=meta.get("conditioning", LONG_CONDITIONING),
                        shared_context=bool(meta.get("shared_context", False)), preset=meta.get("preset", "tiny"),
                        epochs=opt.get("epochs", epochs), every=cfg.get("eval", {}).get("every", every),
                        seed=meta.get("seed", seed))
        if opt.get("max_steps", 0) > 0:
            settings["planned_steps"] = opt["max_steps"]
        elif data.get("dataset") == "builtin" and data.get("builtin_samples") and data.get("batch_size"):
            # one process: steps per epoch = samples // batch
            settings["planned_steps"] = settings["epochs"] * (data["builtin_samples"] // data["batch_size"])
    except (yaml.YAMLError, AttributeError, TypeError) as err:
        raise ValueError(f"--run-folder: cannot read {path}: {err}") from None
    return settings


def relative_change(a: float, b: float) -> float:
    """b - a as a fraction of the larger magnitude (symmetric: "within tol of each other" either way)."""
    scale = max(abs(a), abs(b))
    return (b - a) / scale if scale else 0.0


def levelling(steps: list, values: list, tol: float = LEVEL_TOL) -> dict:
    """Is the curve still climbing at its end? `state`: climbing / levelled / falling, by the change
    between the last two evaluations against `tol`; `level_step`: the first evaluation from which every
    later one is within `tol` of the last value (None while climbing)."""
    if len(values) < 2:
        return {"state": "too short", "change": math.nan, "level_step": None}
    change = relative_change(values[-2], values[-1])
    state = "climbing" if change > tol else "falling" if change < -tol else "levelled"
    level_step = None
    if state != "climbing":
        first = len(values) - 1
        while first > 0 and abs(relative_change(values[first - 1], values[-1])) <= tol:
            first -= 1
        level_step = steps[first]
    return {"state": state, "change": change, "level_step": level_step}


def long_verdict(points: list[dict], tol: float = LEVEL_TOL) -> str:
    steps, mrr = [p["step"] for p in points], [p["mrr"] for p in points]
    lev = levelling(steps, mrr, tol)
    if lev["state"] == "too short":
        return "cannot tell: fewer than two evaluations"
    tail = (f"from step {steps[-2]} to step {steps[-1]} MRR went {mrr[-2]:.3f} -> {mrr[-1]:.3f} "
            f"({lev['change'] * 100:+.1f} %)")
    if lev["state"] == "climbing":
        return (f"MRR is still climbing at the end: {tail}, more than {tol * 100:.0f} %; "
                f"it has not levelled off by step {steps[-1]}")
    if lev["state"] == "falling":
        return f"MRR is not climbing at the end, it falls: {tail}, more than {tol * 100:.0f} %; no level stretch yet"
    return (f"MRR has levelled off: {tail}, within {tol * 100:.0f} %; it levels off at step {lev['level_step']}, "
            f"from which every evaluation is within {tol * 100:.0f} % of the last ({mrr[-1]:.3f})")


def _f3_or_dash(key: str):
    return lambda row: f"{row[key]:.3f}" if isinstance(row.get(key), (int, float)) else "–"


LONG_COLUMNS = [("step", "---:", lambda r: str(r["step"])), ("MRR (K=256)", "---:", _f3_or_dash("mrr")),
                ("MRR top-1", "---:", _f3_or_dash("mrr_top1")), ("MRR top-5", "---:", _f3_or_dash("mrr_top5")),
                ("linear top-1", "---:", _f3_or_dash("linear_top1"))]


def demo_epochs() -> "int | None":
    """The demo's length (configs/tiny.yaml), to say how much longer the long run is."""
    import yaml

    path = ROOT / "configs" / "tiny.yaml"
    return (yaml.safe_load(path.read_text()).get("optimization") or {}).get("epochs") if path.exists() else None


def write_long_doc(folder: Path, doc: Path, epochs: int, every: int, seed: int) -> None:
    """The `long` section of doc from the eval-step*.json files in folder, and its plot."""
    points = [p for p in eval_points(folder) if isinstance(p.get("mrr"), (int, float))]
    if not points:
        raise ValueError(f"--run-folder: no eval-step*.json with an MRR in {folder}")
    st = run_settings(folder, epochs, every, seed)
    planned = st["planned_steps"]
    length = f"{st['epochs']} epochs" + (f" ({planned} steps)" if planned else "")
    demo = demo_epochs()
    if demo and st["preset"] == "tiny":
        length += f", {st['epochs'] / demo:.1f}x the demo's {demo}"
    flags = "".join(f" {flag} {value}" for flag, value, default in
                    (("--long-epochs", st["epochs"], LONG_EPOCHS), ("--eval-every", st["every"], LONG_EVAL_EVERY),
                     ("--seed", st["seed"], 0)) if value != default)
    train = " ".join(long_command(long_folder(Path("runs/repro"), st["epochs"], st["every"], st["seed"]),
                                  st["epochs"], st["every"], st["seed"])[1:]).replace(f"{ROOT}/", "")
    plot = doc.with_name(doc.stem + "-long.png")
    lines = ["## MRR against training steps (one long run)", "",
             f"`{st['preset']}` preset, conditioning {st['conditioning']}, predictor layout "
             f"{layout_name(st['shared_context'])}, seed {st['seed']}; {length}, evaluated every {st['every']} steps "
             f"and at the end (MRR over K=256 candidates, chance {points[0].get('mrr_chance', math.nan):.3f}; "
             "linear probe top-1). Run folder: `" + folder.name + "`.",
             f"Command: `python experiments/reproduce.py --long{flags}` (it trains `python {train}`; "
             "`--long --report-only --run-folder PATH` writes this section from a finished folder).", ""]
    if st["conditioning"] != LONG_CONDITIONING or st["shared_context"]:
        lines += ["Note: this folder was not trained with --long's settings "
                  "(feature conditioning, repeated layout).", ""]
    if planned and points[-1]["step"] < planned:
        lines += [f"Partial: the run has not finished (last evaluation at step {points[-1]['step']} of {planned}).",
                  ""]
    lines += markdown_table(LONG_COLUMNS, points)
    tol = f"{LEVEL_TOL * 100:.0f} %"
    lines += ["", f"Rule: MRR has levelled off when the last two evaluations differ by at most {tol} (of the "
              "larger), and it is still climbing when the last is more than that above; it levels off at the "
              f"first evaluation from which every later one stays within {tol} of the last.", "",
              f"- {long_verdict(points)}", "",
              f"![MRR and linear probe against training steps]({plot.name})"]
    update_section(doc, "long", "\n".join(lines))
    plt = _pyplot()
    if plt is None:
        return
    steps = [p["step"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(steps, [p["mrr"] for p in points], "o-", color="tab:blue")
    if isinstance(points[0].get("mrr_chance"), (int, float)):
        axes[0].axhline(points[0]["mrr_chance"], color="k", ls="--", lw=1, label="chance")
        axes[0].legend()
    axes[0].set_ylabel("world-model MRR (K=256)")
    probe = [p for p in points if isinstance(p.get("linear_top1"), (int, float))]
    axes[1].plot([p["step"] for p in probe], [p["linear_top1"] for p in probe], "o-", color="tab:green")
    axes[1].set_ylabel("linear probe top-1")
    for ax in axes:
        ax.set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(plot, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "repro")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reproduction.md")
    parser.add_argument("--steps", type=int, default=0, help="cap each run (0: the tiny config's schedule)")
    parser.add_argument("--seed", type=int, default=0, help="the six-run mode's seed")
    parser.add_argument("--ablation", action="store_true", help="run the predictor-layout ablation instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the ablation's seeds")
    parser.add_argument("--fresh", action="store_true", help="retrain settings that already finished under --out")
    parser.add_argument("--long", action="store_true", help="one long feature-conditioned run: MRR against steps")
    parser.add_argument("--long-epochs", type=int, default=LONG_EPOCHS, help="the long run's epochs")
    parser.add_argument("--eval-every", type=int, default=LONG_EVAL_EVERY,
                        help="the long run's steps between evaluations")
    parser.add_argument("--report-only", action="store_true", help="--long: write the section, train nothing")
    parser.add_argument("--run-folder", type=Path, help="--long --report-only: the run folder to report "
                        "(default: the --long folder under --out)")
    args = parser.parse_args(argv)
    if args.long and args.ablation:
        parser.error("--long: not together with --ablation")
    for flag, value in (("--long-epochs", args.long_epochs), ("--eval-every", args.eval_every)):
        if value < 1:
            parser.error(f"{flag}: must be at least 1, got {value}")
    if not args.long and (args.report_only or args.run_folder is not None):
        parser.error("--report-only / --run-folder: only with --long")
    if args.run_folder is not None and not args.report_only:
        parser.error("--run-folder: only with --report-only (--long trains into its own folder under --out)")
    if args.long and args.steps:
        parser.error("--steps: not used by --long (set its length with --long-epochs)")
    if args.long:
        if args.report_only:
            folder = args.run_folder or long_folder(args.out, args.long_epochs, args.eval_every, args.seed)
            if not folder.is_dir():
                parser.error(f"--run-folder: {folder} is not a folder")
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            folder = run_long(args.out, args.long_epochs, args.eval_every, args.seed, args.fresh)
        try:
            write_long_doc(folder, args.doc, args.long_epochs, args.eval_every, args.seed)
        except ValueError as err:
            parser.error(str(err))
        print(args.doc.read_text())
        return 0
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

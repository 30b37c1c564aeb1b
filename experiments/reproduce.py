"""Small-scale reproduction of IWM's qualitative findings on the built-in photographs (2 CPU cores).

    python experiments/reproduce.py [--out runs/repro] [--doc docs/reproduction.md] [--steps N] [--seed S]

Trains the `tiny` preset six times — conditioning none / feature / sequence, each with a shallow and a
deep predictor — with the same data, masks and seed, then evaluates the world-model MRR (K=256) and the
linear probe of each. Settings that finished under --out are reused and an interrupted one resumes,
so the script can be run again after a stop. Writes the table to --doc and a bar chart next to it. Expected from the paper:
no conditioning -> MRR near chance; feature and sequence conditioning -> far above chance; the deeper
predictor at least as equivariant (higher MRR).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(cond, depth) for cond in ("none", "feature", "sequence") for depth in (2, 6)]


def run_one(cond: str, depth: int, out: Path, steps: int, seed: int, fresh: bool) -> dict:
    # Everything that changes the result names the folder, so a run is only ever reused or resumed
    # under the settings that made it.
    folder = out / (f"{cond}-depth{depth}-seed{seed}" + (f"-steps{steps}" if steps else ""))
    summary = folder / "reproduce.json"
    if summary.exists() and not fresh:  # finished earlier: reuse; an interrupted run resumes from latest.pt
        return json.loads(summary.read_text())
    cmd = [sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"meta.conditioning={cond}", f"meta.pred_depth={depth}", f"meta.seed={seed}",
           f"logging.folder={folder}", "logging.progress_bar=off", "eval.tasks=[mrr, linear]"]
    if fresh:
        cmd.append("meta.load_checkpoint=false")  # start over instead of resuming the finished run
    if steps:
        cmd.append(f"optimization.max_steps={steps}")
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    evals = sorted(folder.glob("eval-step*.json"), key=lambda p: int(p.stem.split("step")[1]))
    result = json.loads(evals[-1].read_text())
    result.update(conditioning=cond, pred_depth=depth, wall_s=time.time() - t0, command=" ".join(cmd[1:]).replace(f"{ROOT}/", ""))
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


def write_doc(results: list[dict], doc: Path, seed: int, steps: int, total_s: float) -> None:
    lines = ["# Small-scale reproduction of IWM's findings", "",
             "`tiny` preset (64 px, patch 8, 6x192 encoder), built-in photographs, 2 CPU cores; one seed "
             f"({seed}); {'full demo schedule' if not steps else f'{steps} steps'} per run; {total_s / 60:.0f} min of training "
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
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n\n![MRR and linear probe per setting](reproduction.png)\n\n"
                   "Per-run commands:\n\n" + "\n".join(f"- `python {r['command']}`" for r in results) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
        fig.savefig(doc.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "repro")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reproduction.md")
    parser.add_argument("--steps", type=int, default=0, help="cap each run (0: the tiny config's schedule)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="retrain settings that already finished under --out")
    args = parser.parse_args(argv)
    t0 = time.time()
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

"""The `tiny` CPU step of this checkout against the step as it was at commit 4004c97 (before the step
moved into iwm/step.py and lost its host reads), in one run, on the same masks and the paper's
repeated predictor layout.

    git worktree add /tmp/iwm-4004c97 4004c97
    (cd /tmp/iwm-4004c97 && PYTHONPATH=. python -m iwm_kernels.build)
    python experiments/step_vs_4004c97.py --old /tmp/iwm-4004c97

This checkout's loader makes the batches; their images and mask tensors are handed to the old code too
(its MaskBatch has the same four tensors). Each side runs in its own process, alternating, `--pairs`
times; a process times `--steps` steps after 3 warm-up steps. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM = 3


def worker(mode: str, root: str, dump: str, steps: int) -> None:
    sys.path.insert(0, root)
    import torch

    from iwm.config import load_config
    from iwm.train import Trainer

    over = [f"logging.folder={tempfile.mkdtemp(prefix=f'iwm-{mode}-')}", "data.num_workers=0", "eval.at_end=false",
            "logging.tensorboard=false", "meta.shared_context=false", f"optimization.max_steps={WARM + steps + 2}"]
    cfg = load_config(os.path.join(root, "configs", "tiny.yaml"), over)
    trainer = Trainer(cfg, log=lambda *a, **k: None)
    times = []
    if mode == "new":
        batches = []
        for batch in trainer.loader():
            batches.append(batch)
            if len(batches) == WARM + steps:
                break
        if not os.path.exists(dump):
            torch.save([{"images": b.images, "batch_size": b.masks.batch_size, "num_targets": b.masks.num_targets,
                         "grid": tuple(b.masks.grid), "target_block": tuple(b.masks.target_block),
                         **{k: getattr(b.masks, k) for k in ("context_index", "context_cu", "target_index", "target_cu")}}
                        for b in batches], dump)
        for i, b in enumerate(batches):
            t0 = time.perf_counter()
            trainer.step_fn(b.images, b.masks, i, 0.996, geometry=b.geometry)  # CPU: done when it returns
            times.append(time.perf_counter() - t0)
    else:
        from iwm.masks import MaskBatch

        model = trainer.model
        for i, d in enumerate(torch.load(dump)):
            masks = MaskBatch(d["context_index"], d["context_cu"], d["target_index"], d["target_cu"],
                              d["batch_size"], d["num_targets"], d["grid"], d["target_block"])
            t0 = time.perf_counter()
            # the loop body of 4004c97's Trainer.train, without logging and fault injection
            images, masks = d["images"].to(trainer.device), masks.to(trainer.device)
            source, target, action = trainer.views(images, i)
            loss, stats = trainer.step_module(source, target, masks, action if model.conditioning != "none" else None)
            _ = float(loss.detach()), float(stats["target_std"]), float(stats["pred_std"])
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimization.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in trainer.optimizer.param_groups for p in g["params"]],
                                               cfg.optimization.grad_clip)
            trainer.optimizer.step()
            model.update_target(0.996)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"mode": mode, "median_ms": 1e3 * statistics.median(times[WARM:])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="a checkout of commit 4004c97 (its native extension built)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "ROOT", "DUMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.steps)
    dump = os.path.join(tempfile.mkdtemp(prefix="iwm-step-vs-"), "batches.pt")
    got = {"old": [], "new": []}
    for _ in range(args.pairs + 1):  # the first pair writes the batches and warms the caches: not counted
        for mode, root in (("new", ROOT), ("old", args.old)):
            out = subprocess.run([sys.executable, __file__, "--old", args.old, "--steps", str(args.steps),
                                  "--worker", mode, root, dump], capture_output=True, text=True, check=True)
            got[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["median_ms"])
    old, new = statistics.median(got["old"][1:]), statistics.median(got["new"][1:])
    print(f"tiny step, median of {args.pairs} processes: 4004c97 {old:.1f} ms, this checkout {new:.1f} ms: "
          f"{old / new:.2f}x (per process: old {[round(v) for v in got['old'][1:]]}, new {[round(v) for v in got['new'][1:]]})")


if __name__ == "__main__":
    main()

"""Evaluate a checkpoint: `python -m iwm.eval --checkpoint RUN/latest.pt --task mrr|linear|predictor`.

Results go to the checkpoint's folder (or --out) as eval-step<N>.json plus a PNG for MRR."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    from ..checkpoint import CheckpointError
    from .. import sharded_checkpoint
    from ..config import ConfigError, check_data_paths, check_eval_tasks, config_from_dict
    from ..models import IWM, ModelPreset
    from . import TASKS
    from .runner import run_evaluations
    from ..stopping import StopFlag

    parser = argparse.ArgumentParser(prog="python -m iwm.eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="an iwm training checkpoint (latest.pt, step-*.pt, "
                        "or a sharded step-*.dcp folder)")
    parser.add_argument("--task", action="append", choices=TASKS,
                        help="repeatable; default: the checkpoint config's eval.tasks")
    parser.add_argument("--out", type=Path, help="folder for the results (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.mrr_candidates=64")
    args = parser.parse_args(argv)
    try:
        # latest.pt / step-*.pt, or a sharded step-*.dcp folder. Looked up on the module at call time:
        # the one seam a test replaces to check the config without a real checkpoint.
        state = sharded_checkpoint.load_any_checkpoint(args.checkpoint)
        # The overrides are validated with the saved config, as training validates its own: a bad
        # value is refused here, not met halfway through an evaluation.
        cfg = config_from_dict(state["config"], args.overrides)
        tasks = list(args.task) if args.task else list(cfg.eval.tasks)
        check_eval_tasks(cfg, tasks)
        check_data_paths(cfg, tasks)
        model = IWM.from_preset(ModelPreset(**state["preset"]), loss=cfg.meta.loss)
        model.encoder.load_state_dict(state["encoder"])
        model.target_encoder.load_state_dict(state["target_encoder"])
        model.predictor.load_state_dict(state["predictor"])
    except KeyError as exc:
        print(f"error: checkpoint: {args.checkpoint} has no {exc} entry", file=sys.stderr)
        return 2
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model.to(device)
    ckpt = Path(args.checkpoint)
    out = args.out or (ckpt.parent if ckpt.is_file() or (ckpt / "trainer.pt").exists() else ckpt)
    step = int(state["step"])
    # SIGTERM / Ctrl-C stop after the running task (each finished task is already in eval-step<N>.json);
    # a second signal stops at once. Either way: a message and an exit status, not a traceback.
    stop = StopFlag()
    stop.install()
    try:
        results = run_evaluations(model, cfg, device, out, step=step, tasks=tasks, stop=lambda: stop.name)
    except KeyboardInterrupt:
        print(f"error: evaluation stopped at once by a second signal; finished tasks are in "
              f"{Path(out) / f'eval-step{step}.json'}", file=sys.stderr)
        return 130
    finally:
        stop.restore()
    print(json.dumps(results, indent=1))
    if "interrupted_by" in results:
        print(f"error: evaluation stopped by {results['interrupted_by']}; finished tasks are in "
              f"{Path(out) / f'eval-step{step}.json'}; run the remaining --task(s) to complete it", file=sys.stderr)
        return 128 + stop.signal  # the shell's convention for "ended by this signal" (130, 143)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

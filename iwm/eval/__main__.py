"""Evaluate a checkpoint: `python -m iwm.eval --checkpoint RUN/latest.pt --task mrr|linear|predictor`.

Results go to the checkpoint's folder (or --out) as eval-step<N>.json plus a PNG for MRR."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..config import ConfigError, config_from_dict, parse_override, _apply
    from ..models import IWM, ModelPreset
    from .runner import run_evaluations

    parser = argparse.ArgumentParser(prog="python -m iwm.eval", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="an iwm training checkpoint (latest.pt, step-*.pt)")
    parser.add_argument("--task", action="append", choices=["mrr", "linear", "predictor"],
                        help="repeatable; default: the checkpoint config's eval.tasks")
    parser.add_argument("--out", type=Path, help="folder for the results (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. eval.mrr_candidates=64")
    args = parser.parse_args(argv)
    try:
        state = load_checkpoint(args.checkpoint, map_location="cpu")
        cfg = config_from_dict(state["config"])
        for text in args.overrides:
            _apply(cfg, *parse_override(text))
    except (CheckpointError, ConfigError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model = IWM.from_preset(ModelPreset(**state["preset"]), loss=cfg.meta.loss)
    model.encoder.load_state_dict(state["encoder"])
    model.target_encoder.load_state_dict(state["target_encoder"])
    model.predictor.load_state_dict(state["predictor"])
    model.to(device)
    out = args.out or Path(args.checkpoint).parent
    results = run_evaluations(model, cfg, device, out, step=int(state["step"]), tasks=args.task)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

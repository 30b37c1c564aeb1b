"""Evaluation during and at the end of a 2-process FSDP2 run: every rank takes part in gathering the full
weights (a sharded forward needs every rank), rank 0 evaluates an unsharded copy of the same weights
and the run ends with its eval json. The 2-process part runs this file as a script on each rank."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import start_two_ranks
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]

_FAST = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=4", "data.builtin_samples=16",
         "data.num_workers=0", "logging.log_every=1", "logging.tensorboard=false", "meta.use_bfloat16=false",
         "mask.min_keep=2", "optimization.warmup=1", "logging.progress_bar=off", "meta.parallel=fsdp2",
         "eval.tasks=[mrr]", "eval.mrr_images=8", "eval.mrr_candidates=4", "eval.every=2", "eval.at_end=true",
         "meta.dist_timeout_s=30", "optimization.max_steps=4"]


def worker(folder: Path) -> None:
    """One rank: a training run with evaluations (mid-run and at the end), then rank 0's evaluation copy
    against the sharded model: its weights against each parameter's full tensor (DTensor.full_tensor, a
    different gather), and its encoders' outputs against the sharded encoders' on the same random images."""
    from iwm.config import load_config
    from iwm.train import Trainer

    t = Trainer(load_config(ROOT / "configs" / "tiny.yaml", [*_FAST, f"logging.folder={folder}"]),
                log=lambda *a, **k: print(*a, flush=True))
    summary = t.train()
    copy = t._eval_model()  # every rank: a collective
    full = {k: v.full_tensor() for k, v in t.model.state_dict().items()}
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outs = {part: getattr(t.model, part)(images) for part in ("encoder", "target_encoder")}
        if t.dist.is_main:
            assert copy is not None and not any(isinstance(v, DTensor) for v in copy.state_dict().values())
            weights = copy.state_dict()
            assert weights.keys() == full.keys(), sorted(set(weights) ^ set(full))
            for k, v in full.items():
                assert torch.equal(weights[k], v), k
            for part, ref in outs.items():
                torch.testing.assert_close(getattr(copy, part)(images), ref, atol=1e-5, rtol=1e-5)
            (folder / "checked.json").write_text(json.dumps({"final_step": summary["final_step"],
                                                             "eval": summary.get("eval", {})}))
        else:
            assert copy is None


@pytest.mark.slow
def test_two_process_fsdp2_run_evaluates_mid_run_and_at_the_end(tmp_path, monkeypatch):
    # The bug: rank 0 evaluated the sharded model alone; its forward's all-gathers met rank 1's training
    # collectives (a mismatch or a hang until meta.dist_timeout_s).
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "reference")  # here and in the subprocesses
    procs = start_two_ranks([sys.executable, __file__, "worker", str(tmp_path)], ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    mid = json.loads((tmp_path / "eval-step2.json").read_text())
    end = json.loads((tmp_path / "eval-step4.json").read_text())
    assert mid["step"] == 2 and end["step"] == 4 and end["mrr_images"] == 8 and end["mrr_candidates"] == 4
    assert [json.loads(line)["step"] for line in (tmp_path / "evals.jsonl").read_text().splitlines()] == [2, 4]
    checked = json.loads((tmp_path / "checked.json").read_text())
    assert checked["final_step"] == 4 and checked["eval"]["mrr"] == end["mrr"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[2]))

"""The training system end to end (subprocesses, as users run it): exact resume after SIGKILL, SIGTERM,
NaN stop, config errors, two-process gloo DDP against one process, run-folder contents."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: the tiny preset at 32 px (16 patches), few layers, no evaluation.
FAST = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=8", "data.builtin_samples=64",
        "data.num_workers=0", "eval.at_end=false", "logging.log_every=1", "logging.tensorboard=false",
        "meta.use_bfloat16=false", "mask.min_keep=2", "optimization.warmup=1"]


def train_cmd(folder, *overrides, python=(sys.executable, "-m", "iwm.train")):
    return [*python, "--config", str(ROOT / "configs" / "tiny.yaml"), f"logging.folder={folder}", *FAST,
            *overrides]


def run(cmd, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(folder):
    rows = [json.loads(l) for l in (Path(folder) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows}


def params(folder):
    state = torch.load(Path(folder) / "latest.pt", map_location="cpu", weights_only=False)
    return state["step"], {f"{part}.{k}": v for part in ("encoder", "target_encoder", "predictor")
                           for k, v in state[part].items()}


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    steps = 8
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = run(train_cmd(straight, f"optimization.max_steps={steps}", "logging.checkpoint_every=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    kill_after = random.randint(2, steps - 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(killed, f"optimization.max_steps={steps}", "logging.checkpoint_every=1"),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = run(train_cmd(killed, f"optimization.max_steps={steps}", "logging.checkpoint_every=1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout or "resumed from" in res.stderr or killed.joinpath("latest.pt").exists()
    step_a, pa = params(straight)
    step_b, pb = params(killed)
    assert step_a == step_b == steps
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert losses(straight) == losses(killed)


@pytest.mark.slow
def test_sigterm_saves_latest_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(train_cmd(tmp_path, "optimization.max_steps=200"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    step, _ = params(tmp_path)
    assert 3 <= step < 200
    res = run(train_cmd(tmp_path, f"optimization.max_steps={step + 2}"))
    assert res.returncode == 0 and f"resumed from" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    assert params(tmp_path)[0] == step + 2


@pytest.mark.slow
def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    res = run(train_cmd(tmp_path, "optimization.max_steps=10", "logging.checkpoint_every=2"),
              env={"IWM_FAULT_NAN_STEP": "5"})
    assert res.returncode == 1
    assert "non-finite loss" in res.stderr and "step 5" in res.stderr, res.stderr[-2000:]
    step, _ = params(tmp_path)
    assert step == 4  # the last good checkpoint, intact


def test_config_errors_before_any_work(tmp_path):
    res = run([sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
               "data.crop_size=60", f"logging.folder={tmp_path}"])
    assert res.returncode == 2 and "data.crop_size: 60 is not divisible by mask.patch_size 8" in res.stderr
    assert not (tmp_path / "latest.pt").exists()
    res = run([sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"), "meta.bogus=1"])
    assert res.returncode == 2 and "meta.bogus: unknown key" in res.stderr


@pytest.mark.slow
def test_run_folder_contents(tmp_path):
    res = run(train_cmd(tmp_path, "optimization.max_steps=3", "logging.checkpoint_every=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("config.yaml", "latest.pt", "step-0000002.pt", "metrics.jsonl", "iwm.csv", "loss.png"):
        assert (tmp_path / name).exists(), name
    assert "Train: step 1/3" in res.stdout and "img/s" in res.stdout and "ETA" in res.stdout
    state = torch.load(tmp_path / "latest.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["encoder"])
    assert {"optimizer", "rng", "sampler", "mask_sampler", "config", "schedules"} <= set(state)


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = run(train_cmd(single, "optimization.max_steps=3", "data.batch_size=8"))
    assert res.returncode == 0, res.stderr[-3000:]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(random.randint(20000, 40000)), "-m", "iwm.train")
    res = run(train_cmd(ddp, "optimization.max_steps=3", "data.batch_size=4", python=torchrun), timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    _, pa = params(single)
    _, pb = params(ddp)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-4, rtol=1e-3, msg=lambda m: f"{k}: {m}")
    la, lb = losses(single), losses(ddp)
    assert la.keys() == lb.keys()
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-4 * max(1.0, abs(la[s]))


def test_ddp_nan_on_one_rank_stops_every_rank(tmp_path):
    """The ranks decide together: a NaN on rank 1 alone must stop both, not leave rank 0 waiting in a
    collective (the timeout would catch that hang)."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(random.randint(20000, 40000)), "-m", "iwm.train")
    res = run(train_cmd(tmp_path, "optimization.max_steps=6", "data.batch_size=4", "logging.checkpoint_every=2",
                        python=torchrun), env={"IWM_FAULT_NAN_STEP": "3", "IWM_FAULT_NAN_RANK": "1"}, timeout=240)
    assert res.returncode != 0
    assert res.stderr.count("non-finite loss") >= 2 and "step 3" in res.stderr, res.stderr[-3000:]
    step, _ = params(tmp_path)
    assert step == 2  # the last good checkpoint, intact


@pytest.mark.slow
def test_tiny_learns_on_cpu(tmp_path):
    """300 steps of `tiny` on the built-in photographs: the loss falls clearly, the targets do not collapse."""
    from iwm.config import load_config
    from iwm.train import Trainer

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"logging.folder={tmp_path}", "data.batch_size=16", "data.builtin_samples=512",
                       "data.num_workers=0", "optimization.epochs=10", "optimization.max_steps=300",
                       "eval.at_end=false", "logging.tensorboard=false", "logging.log_every=100",
                       "logging.checkpoint_every=0"])
    summary = Trainer(cfg, log=lambda *a, **k: None).train()
    assert summary["final_step"] == 300
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-30:]) / 30
    assert last < 0.6 * first, (first, last)
    assert min(r["target_std"] for r in rows[-30:]) > 0.2  # no collapse of the target features

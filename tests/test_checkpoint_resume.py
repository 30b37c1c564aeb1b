"""The training system's checkpoints: crafted files refused by every entry point, no non-finite state
saved, truthful stop messages, resume refused when the settings that shape the result changed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iwm.checkpoint import CheckpointError, load_checkpoint
from iwm.config import load_config
from iwm.train import Trainer, TrainingStopped

from tests.test_checkpoint import crafted_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=8", "data.builtin_samples=64",
        "data.num_workers=0", "eval.at_end=false", "logging.log_every=1", "logging.tensorboard=false",
        "meta.use_bfloat16=false", "mask.min_keep=2", "optimization.warmup=1", "logging.progress_bar=off"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """Checkpoints do not depend on the kernels: the reference ones need no native build or Triton
    interpreter, in this process and in the subprocesses (which inherit the environment)."""
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "reference")


def trainer(folder, *overrides, log=lambda *a, **k: None):
    return Trainer(load_config(TINY, [*FAST, f"logging.folder={folder}", *overrides]), log=log)


def run(args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_args(folder, *overrides):
    return ["-m", "iwm.train", "--config", TINY, f"logging.folder={folder}", *FAST, *overrides]


# ------------------------------------------------------------------ crafted files, every entry point
@pytest.mark.slow
def test_crafted_latest_is_refused_by_train_resume_and_eval(tmp_path):
    marker = tmp_path / "pwned"
    latest = crafted_checkpoint(tmp_path / "latest.pt", marker)
    res = run(train_args(tmp_path, "optimization.max_steps=1"))
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"{latest} exists but cannot be read: it is not a weights-only file" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "config.yaml").exists()  # refused before the run folder was touched
    res = run(["-m", "iwm.eval", "--checkpoint", str(latest), "--task", "mrr"])
    assert res.returncode == 2 and "unpickling" in res.stderr and str(latest) in res.stderr, res.stderr[-2000:]
    assert not marker.exists()


# ------------------------------------------------------------------ non-finite state is never saved
def _poison(tensor, seed, value):
    flat = tensor.view(-1)
    flat[torch.randint(flat.numel(), (), generator=torch.Generator().manual_seed(seed))] = value


def test_non_finite_parameters_are_never_saved(tmp_path, seed):
    t = trainer(tmp_path, "optimization.max_steps=1")
    t.save(periodic=False)
    before = (tmp_path / "latest.pt").read_bytes()
    names = [n for n, _ in t.model.predictor.named_parameters()]
    name = names[seed % len(names)]
    with torch.no_grad():
        _poison(dict(t.model.predictor.named_parameters())[name], seed, float("inf"))
    t.step = 5
    with pytest.raises(TrainingStopped, match=rf"non-finite values in predictor\.{name} after step 4") as info:
        t.save(periodic=True)
    assert f"{tmp_path / 'latest.pt'} (step 0), is left as it was" in str(info.value)
    assert (tmp_path / "latest.pt").read_bytes() == before
    assert not (tmp_path / "step-0000005.pt").exists()


def test_non_finite_optimizer_state_is_never_saved(tmp_path, seed):
    t = trainer(tmp_path, "optimization.max_steps=1")
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    t.optimizer.step()
    t.step = 1
    t.save(periodic=False)
    before = (tmp_path / "latest.pt").read_bytes()
    index = seed % len(params)
    _poison(t.optimizer.state[params[index]]["exp_avg_sq"], seed, float("nan"))
    t.step = 2
    with pytest.raises(TrainingStopped, match=rf"non-finite values in optimizer\.state\.{index}\.exp_avg_sq"):
        t.save(periodic=False)
    assert (tmp_path / "latest.pt").read_bytes() == before


@pytest.mark.slow
def test_overflowing_update_is_not_saved_as_a_checkpoint(tmp_path):
    """lr 1e39: the first loss is finite, the update it drives makes the weights Inf. That state used to
    become latest.pt (and the NaN of the next step then called it 'the last good checkpoint')."""
    t = trainer(tmp_path, "optimization.max_steps=3", "logging.checkpoint_every=1", "optimization.lr=1e39",
                "optimization.start_lr=1e39")
    with pytest.raises(TrainingStopped, match="non-finite values in .* after step 0") as info:
        t.train()
    assert "no checkpoint has been written" in str(info.value)
    assert not (tmp_path / "latest.pt").exists()


# ------------------------------------------------------------------ the NaN stop says what is on disk
@pytest.mark.slow
def test_nan_stop_without_a_checkpoint_does_not_claim_one(tmp_path, monkeypatch):
    monkeypatch.setenv("IWM_FAULT_NAN_STEP", "0")
    t = trainer(tmp_path, "optimization.max_steps=2")
    with pytest.raises(TrainingStopped) as info:
        t.train()
    message = str(info.value)
    assert message.startswith("non-finite loss (nan) at step 0: stopping")
    assert "no checkpoint has been written" in message and "step -1" not in message, message
    assert not (tmp_path / "latest.pt").exists()


@pytest.mark.slow
def test_nan_stop_names_the_checkpoint_it_leaves(tmp_path, monkeypatch):
    monkeypatch.setenv("IWM_FAULT_NAN_STEP", "3")
    t = trainer(tmp_path, "optimization.max_steps=5", "logging.checkpoint_every=2")
    with pytest.raises(TrainingStopped, match="at step 3") as info:
        t.train()
    assert f"{tmp_path / 'latest.pt'} (step 2)" in str(info.value)
    assert "replays the same steps" in str(info.value)
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 2


# ------------------------------------------------------------------ resume after a config change
@pytest.mark.slow
def test_resume_with_changed_lr_is_refused_unless_asked(tmp_path):
    trainer(tmp_path, "optimization.max_steps=2").train()
    config_before = (tmp_path / "config.yaml").read_bytes()
    latest_before = (tmp_path / "latest.pt").read_bytes()
    res = run(train_args(tmp_path, "optimization.max_steps=3", "optimization.lr=2e-3"))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "settings that change the result: optimization.lr (checkpoint: 0.001, now: 0.002)" in res.stderr
    assert "meta.resume_with_changes=true" in res.stderr
    assert (tmp_path / "config.yaml").read_bytes() == config_before
    assert (tmp_path / "latest.pt").read_bytes() == latest_before
    res = run(train_args(tmp_path, "optimization.max_steps=3", "optimization.lr=2e-3",
                         "meta.resume_with_changes=true"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "optimization.lr" in res.stdout
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 3


@pytest.mark.slow
def test_resume_allows_changes_that_do_not_change_the_result(tmp_path):
    trainer(tmp_path, "optimization.max_steps=1").train()
    t = trainer(tmp_path, "optimization.max_steps=4", "logging.log_every=7", "logging.checkpoint_every=3",
                "logging.keep_checkpoints=1", "eval.mrr_candidates=16", "data.pin_mem=false")
    assert t.resumed_from == tmp_path / "latest.pt" and t.step == 1
    with pytest.raises(CheckpointError, match=r"meta\.seed \(checkpoint: 0, now: 5\)"):
        trainer(tmp_path, "optimization.max_steps=4", "meta.seed=5")

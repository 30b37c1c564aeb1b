"""Sharded checkpoints (iwm.sharded_checkpoint, DCP): a 2-process FSDP2 checkpoint loads in one process
bit for bit and continues as the uninterrupted one-process run (and a 1-process one loads into 2 FSDP2
ranks); SIGKILL during a save leaves the previous checkpoint loadable; a crafted `.metadata` is refused
without running anything; eval and the safetensors export read sharded checkpoints. The 2-process part
runs this file as a script on each rank (gloo, CPU)."""
from __future__ import annotations

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_trained_close, random_batches, small_iwm, start_two_ranks

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, SAVE_AT, MOMENTUM, LR = 4, 4, 2, 0.9, 5e-3


def _optimizer(model):
    from iwm.builders import build_optimizer

    return build_optimizer(model, LR, 0.04)


def _step_fn(model, optimizer, seed, rank, world):
    from iwm import augment as aug
    from iwm.step import TrainStep

    return TrainStep(model, optimizer, device=torch.device("cpu"), aug_cfg=aug.AugmentConfig(out_size=32), seed=seed,
                     global_batch=GLOBAL_BATCH, rank=rank, batch_size=GLOBAL_BATCH // world, grad_clip=1.0,
                     distributed=world > 1, parallel="fsdp2")


def _train(step_fn, batches, steps, rank, world) -> list:
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        images, masks = batches[step]
        lo = rank * per_rank
        losses.append(step_fn(images[lo:lo + per_rank], masks.slice(lo, lo + per_rank), step, MOMENTUM).row[0])
    return losses


def _full_state(model, optimizer) -> dict:
    """Full (gathered) model and optimizer state, keyed by parameter name; a collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    return {"model": {k: v.detach().clone() for k, v in get_model_state_dict(model, options=opts).items()},
            "optim": {f"{name}.{k}": v.detach().clone()
                      for name, st in get_optimizer_state_dict(model, optimizer, options=opts)["state"].items()
                      for k, v in st.items()}}


def worker(out: Path, seed: int) -> None:
    """One rank of the 2-process run (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
    1 -> 2: shard a fresh model (as the trainer does), load out/one (saved by one process at SAVE_AT)
    into the shards, train to STEPS, dump the full state. 2 -> 1: train SAVE_AT steps under FSDP2 from scratch, save
    into out/two, dump the full state. Then a save at STEPS that pauses before its commit (the test kills)."""
    import torch.distributed as dist

    from iwm.sharded_checkpoint import load_sharded, save_sharded

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    batches = random_batches(small_iwm(seed), seed, GLOBAL_BATCH, STEPS)

    model = small_iwm(seed + 1)  # other weights: the checkpoint must replace them
    optimizer = _optimizer(model)
    step_fn = _step_fn(model, optimizer, seed, rank, world)  # sharded first, as the trainer does: each rank
    load_sharded(out / "one" / "step-0000002.dcp", model, optimizer)  # reads only its slices
    _train(step_fn, batches, range(SAVE_AT, STEPS), rank, world)
    full = _full_state(model, optimizer)
    if rank == 0:
        torch.save(full, out / "one_to_two.pt")

    model = small_iwm(seed)
    optimizer = _optimizer(model)
    step_fn = _step_fn(model, optimizer, seed, rank, world)
    losses = torch.stack(_train(step_fn, batches, range(SAVE_AT), rank, world))
    dist.all_reduce(losses)  # each rank's loss is its half's mean; the global one is their mean
    losses /= world
    save_sharded(model, optimizer, {"note": "two"}, out / "two", SAVE_AT)
    full = _full_state(model, optimizer)
    if rank == 0:
        torch.save({**full, "losses": losses}, out / "two_at_save.pt")
        (out / "saved").touch()

    _train(step_fn, batches, range(SAVE_AT, STEPS), rank, world)
    os.environ["IWM_FAULT_DCP_PAUSE"] = str(out / "never")  # the test kills both ranks while they wait
    save_sharded(model, optimizer, {"note": "killed"}, out / "two", STEPS)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (steps 0..STEPS, with a sharded save at SAVE_AT), then the 2-process
    worker, killed with SIGKILL during its last save."""
    from iwm.sharded_checkpoint import save_sharded

    out = tmp_path_factory.mktemp("sharded")
    seed = random.randrange(2**31)
    batches = random_batches(small_iwm(seed), seed, GLOBAL_BATCH, STEPS)
    model = small_iwm(seed)
    optimizer = _optimizer(model)
    step_fn = _step_fn(model, optimizer, seed, 0, 1)
    losses = _train(step_fn, batches, range(SAVE_AT), 0, 1)
    save_sharded(model, optimizer, {"note": "one"}, out / "one", SAVE_AT)
    at_save = _full_state(model, optimizer)
    losses += _train(step_fn, batches, range(SAVE_AT, STEPS), 0, 1)
    reference = {**_full_state(model, optimizer), "losses": torch.stack(losses), "at_save": at_save}

    procs = start_two_ranks([sys.executable, __file__, "worker", str(out), str(seed)], ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = [out / f"never.rank{r}" for r in (0, 1)]
    deadline = time.time() + 180
    try:
        while not all(m.exists() for m in markers):
            assert time.time() < deadline, "the workers did not reach the paused save"
            if any(p.poll() is not None for p in procs):
                errs = [p.communicate()[1] for p in procs]
                pytest.fail(f"seed {seed}: a worker exited:\n" + "\n".join(e[-3000:] for e in errs))
            time.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.communicate()
    return {"out": out, "seed": seed, "reference": reference, "batches": batches,
            "one_to_two": torch.load(out / "one_to_two.pt", weights_only=True),
            "two_at_save": torch.load(out / "two_at_save.pt", weights_only=True)}


def _assert_close(a: dict, b: dict, exact: bool):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert_trained_close(a[k], b[k], k, lr=LR, steps=STEPS)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_as_the_uninterrupted_run(runs):
    from iwm.sharded_checkpoint import latest_sharded, load_sharded

    out, seed, ref = runs["out"], runs["seed"], runs["reference"]
    path = latest_sharded(out / "two")
    assert path == out / "two" / "step-0000002.dcp"
    model = small_iwm(seed + 7)
    optimizer = _optimizer(model)
    state = load_sharded(path, model, optimizer)
    assert state["step"] == SAVE_AT and state["note"] == "two" and state["sharded"]["world_size"] == 2
    saved, loaded = runs["two_at_save"], _full_state(model, optimizer)
    _assert_close(loaded["model"], saved["model"], exact=True)  # the round trip: exact
    _assert_close(loaded["optim"], saved["optim"], exact=True)
    # The first SAVE_AT steps ran under FSDP2 on 2 ranks: equal to one process within fp32 tolerance.
    torch.testing.assert_close(saved["losses"], ref["losses"][:SAVE_AT], atol=2e-5, rtol=1e-4)
    step_fn = _step_fn(model, optimizer, seed, 0, 1)
    losses = _train(step_fn, runs["batches"], range(SAVE_AT, STEPS), 0, 1)
    torch.testing.assert_close(torch.stack(losses), ref["losses"][SAVE_AT:], atol=2e-5, rtol=1e-4)
    final = _full_state(model, optimizer)
    _assert_close(final["model"], ref["model"], exact=False)
    _assert_close(final["optim"], ref["optim"], exact=False)
    # The steps after the resume did move the weights (equal states would also be "close").
    assert any(not torch.allclose(ref["model"][k], ref["at_save"]["model"][k]) for k in ref["model"])


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_fsdp2_processes(runs):
    ref, got = runs["reference"], runs["one_to_two"]
    _assert_close(got["model"], ref["model"], exact=False)
    _assert_close(got["optim"], ref["optim"], exact=False)


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(runs):
    from iwm.checkpoint import find_resume_checkpoint
    from iwm.sharded_checkpoint import latest_sharded, load_sharded

    run = runs["out"] / "two"
    leftover = run / ".tmp-step-0000004.dcp"
    assert leftover.is_dir() and (leftover / ".metadata").is_file()  # killed after the shards, before the commit
    assert not (run / "step-0000004.dcp").exists()
    assert latest_sharded(run) == run / "step-0000002.dcp"
    assert find_resume_checkpoint(run) == run / "step-0000002.dcp"
    model = small_iwm(3)
    optimizer = _optimizer(model)
    assert load_sharded(latest_sharded(run), model, optimizer)["step"] == SAVE_AT
    _assert_close(_full_state(model, optimizer)["model"], runs["two_at_save"]["model"], exact=True)


def _one_process_checkpoint(folder, seed=0, step=3):
    from iwm.checkpoint import rng_state
    from iwm.sharded_checkpoint import save_sharded

    model = small_iwm(seed)
    return model, save_sharded(model, None, {"rng": rng_state(), "config": {}}, folder, step)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp
    from iwm.checkpoint import CheckpointError, atomic_save, load_checkpoint, seal
    from iwm.sharded_checkpoint import TRAINER_STATE, load_sharded, read_metadata

    model, path = _one_process_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    # The attacker also rewrites the digest we keep, so only the restricted unpickler stands in the way.
    state = load_checkpoint(path / TRAINER_STATE)
    state.pop("integrity")
    import hashlib
    state["sharded"]["metadata_sha256"] = hashlib.sha256((path / ".metadata").read_bytes()).hexdigest()
    atomic_save(seal(state), path / TRAINER_STATE)
    with pytest.raises(CheckpointError, match="posix.system is not allowed|os.system is not allowed"):
        load_sharded(path, model)
    with pytest.raises(CheckpointError, match="can run code"):
        read_metadata(path)
    assert not marker.exists()
    # What the guard prevents: DCP's own reader unpickles the file and runs it.
    with pytest.raises(BaseException):  # it then fails on what the pickle returned
        dcp.load({"model": {}}, checkpoint_id=str(path))
    assert marker.exists()


def test_damaged_shard_or_metadata_is_refused(tmp_path):
    from iwm.checkpoint import CheckpointError
    from iwm.sharded_checkpoint import load_sharded

    model, path = _one_process_checkpoint(tmp_path)
    shard = next(path.glob("__0_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupted"):
        load_sharded(path, model)


def test_resume_picks_the_newer_of_latest_pt_and_the_sharded_pointer(tmp_path):
    from iwm.checkpoint import CheckpointError, find_resume_checkpoint
    from iwm.sharded_checkpoint import LATEST_SHARDED

    _, path = _one_process_checkpoint(tmp_path)
    latest = tmp_path / "latest.pt"
    latest.write_bytes(b"")  # only its age matters here
    pointer = tmp_path / LATEST_SHARDED
    os.utime(latest, ns=(1, 10**18))
    os.utime(pointer, ns=(1, 2 * 10**18))
    assert find_resume_checkpoint(tmp_path) == path
    os.utime(latest, ns=(1, 3 * 10**18))  # meta.parallel switched back to ddp since
    assert find_resume_checkpoint(tmp_path) == latest
    assert find_resume_checkpoint(tmp_path, str(path)) == path
    with pytest.raises(CheckpointError, match="not a complete sharded checkpoint"):
        find_resume_checkpoint(tmp_path, str(tmp_path / ".."))


@pytest.mark.slow
def test_trainer_eval_and_export_read_a_sharded_checkpoint(tmp_path, monkeypatch):
    """meta.parallel=fsdp2 in one process: the trainer writes sharded checkpoints (pruned to
    logging.keep_checkpoints) and exports the target encoder at the end; `python -m iwm.eval` and
    `python -m iwm.export` read them (a step-*.dcp folder or the run folder)."""
    from safetensors.torch import load_file

    from iwm.config import load_config
    from iwm.eval.__main__ import main as eval_main
    from iwm.export import main as export_main
    from iwm.sharded_checkpoint import full_model_state, latest_sharded
    from iwm.train import Trainer

    monkeypatch.setenv("IWM_KERNELS_BACKEND", "reference")
    fast = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=4", "data.builtin_samples=16",
            "data.num_workers=0", "eval.at_end=false", "logging.log_every=1", "logging.tensorboard=false",
            "meta.use_bfloat16=false", "mask.min_keep=2", "optimization.warmup=1", "logging.progress_bar=off",
            "meta.parallel=fsdp2", "logging.checkpoint_every=1", "logging.keep_checkpoints=1",
            f"logging.folder={tmp_path}"]
    t = Trainer(load_config(ROOT / "configs" / "tiny.yaml", [*fast, "optimization.max_steps=2"]),
                log=lambda *a, **k: None)
    t.train()
    assert not (tmp_path / "latest.pt").exists()
    path = latest_sharded(tmp_path)
    assert path == tmp_path / "step-0000002.dcp"
    assert [p.name for p in tmp_path.glob("step-*.dcp")] == ["step-0000002.dcp"]  # keep_checkpoints=1
    weights = full_model_state(path)
    for k, v in t.model.state_dict().items():
        assert torch.equal(weights[k], v), k
    # The trainer's own export at the end, and the export command, from the sharded checkpoint.
    exported = load_file(str(tmp_path / "target_encoder.safetensors"))
    assert exported.keys() == t.model.target_encoder.state_dict().keys()
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "again.safetensors")]) == 0
    again = load_file(str(tmp_path / "again.safetensors"))
    for k, v in t.model.target_encoder.state_dict().items():
        assert torch.equal(exported[k], v) and torch.equal(again[k], v), k
    assert eval_main(["--checkpoint", str(path), "--task", "mrr", "eval.mrr_images=8", "eval.mrr_candidates=4"]) == 0
    assert (tmp_path / "eval-step2.json").exists()


@pytest.mark.slow
def test_sigterm_to_every_fsdp2_rank_saves_a_sharded_checkpoint_that_resumes_in_one_process(tmp_path, monkeypatch):
    """Slurm preemption signals every process: the ranks agree to stop, each writes its shards of one
    checkpoint, both exit 0, and the checkpoint resumes in one process and in two."""
    from iwm.checkpoint import CheckpointError
    from iwm.config import load_config
    from iwm.sharded_checkpoint import latest_sharded, load_trainer_state
    from iwm.train import Trainer

    # Two ranks started as srun starts one task per GPU (RANK / WORLD_SIZE set; torchrun would forward the
    # signal the same way, but its own exit status after a signal is always an error).
    monkeypatch.setenv("IWM_KERNELS_BACKEND", "reference")  # here and in the subprocesses
    cmd = [sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"), *_FAST,
           f"logging.folder={tmp_path}", "optimization.max_steps=200"]
    procs = start_two_ranks(cmd, ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen, deadline = [], time.time() + 240
        for line in procs[0].stdout:
            seen.append(line)
            if "Train: step 2/200" in line or time.time() > deadline:
                break
        for p in procs:  # every process, as Slurm does
            p.send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    out = "".join(seen) + outs[0]
    assert [p.returncode for p in procs] == [0, 0], out[-3000:] + outs[1][-3000:]
    assert "Traceback" not in out + outs[1], out[-3000:] + outs[1][-3000:]
    saved = re.search(r"received SIGTERM: saved (\S+) at step (\d+)", out)
    assert saved, out[-3000:]
    path, step = Path(saved.group(1)), int(saved.group(2))
    assert latest_sharded(tmp_path) == path and 2 <= step < 200
    writers = {p.name.split("_")[2] for p in path.glob("__*_*.distcp")}  # DCP names them __<rank>_<i>.distcp
    assert writers == {"0", "1"}, sorted(os.listdir(path))
    state = load_trainer_state(path)
    assert state["step"] == step and state["sharded"]["world_size"] == 2
    assert set(state["sharded"]["files"]) == {p.name for p in path.glob("*.distcp")}
    # The same global batch in one process: data.batch_size 4 x 2 ranks -> 8 x 1, accepted as the same run.
    logged = []
    t = Trainer(load_config(ROOT / "configs" / "tiny.yaml", [*_FAST, f"logging.folder={tmp_path}",
                                                              f"optimization.max_steps={step + 1}", "data.batch_size=8"]),
                log=lambda *a, **k: logged.append(" ".join(map(str, a))))
    assert t.resumed_from == path and t.step == step
    assert not any("warning" in line for line in logged), logged
    # One process at data.batch_size 4: global batch 4, not the run's 8 (other data order, other schedule
    # per epoch): refused before anything is written, unless asked for.
    with pytest.raises(CheckpointError, match=r"global batch = data.batch_size x processes \(checkpoint: 8, now: "
                       r"4 x 1 = 4\)"):
        Trainer(load_config(ROOT / "configs" / "tiny.yaml", [*_FAST, f"logging.folder={tmp_path}"]),
                log=lambda *a, **k: None)
    t = Trainer(load_config(ROOT / "configs" / "tiny.yaml", [*_FAST, f"logging.folder={tmp_path}",
                                                              "meta.resume_with_changes=true"]),
                log=lambda *a, **k: logged.append(" ".join(map(str, a))))
    assert t.resumed_from == path and any("global batch" in line and "warning" in line for line in logged)
    # Two ranks again: the tensors go straight into each rank's shards, and the run goes on.
    procs = start_two_ranks([*cmd[:-1], f"optimization.max_steps={step + 1}"], ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert f"resumed from {path} at step {step} (each rank reads its own shards)" in outs[0], outs[0][-3000:]
    assert load_trainer_state(latest_sharded(tmp_path))["step"] == step + 1


_FAST = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=4", "data.builtin_samples=32",
         "data.num_workers=0", "eval.at_end=false", "logging.log_every=1", "logging.tensorboard=false",
         "meta.use_bfloat16=false", "mask.min_keep=2", "optimization.warmup=1", "logging.progress_bar=off",
         "meta.parallel=fsdp2"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(Path(sys.argv[2]), int(sys.argv[3]))

"""iwm.step and the training loop around it: no host reads between the trainer's reads (counted over a
real Trainer run), a non-finite step skipped on the device, the profiler trace, the ETA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import HostReadCounter, backends_on, count_python_readers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=8", "data.builtin_samples=64",
        "eval.at_end=false", "logging.tensorboard=false", "logging.progress_bar=off", "meta.use_bfloat16=false",
        "mask.min_keep=2", "optimization.warmup=1", "meta.load_checkpoint=false"]
QUIET = lambda *a, **k: None  # noqa: E731


@pytest.fixture
def python_readers(monkeypatch):
    return count_python_readers(monkeypatch.setattr)


def _trainer(tmp_path, *overrides):
    from iwm.config import load_config
    from iwm.train import Trainer

    return Trainer(load_config(TINY, [*FAST, f"logging.folder={tmp_path}", *overrides]), log=QUIET)


def _count_reads_between(trainer, first: int, last: int, readers: list) -> HostReadCounter:
    """Counts reads in this process from the call of step `first` to the call of step `last`: the
    steps first..last-1 and the loop code between them (none of them a read step)."""
    counter = HostReadCounter()
    step_fn = trainer.step_fn

    def counted(images, masks, step, momentum, **kw):
        if step == first:
            readers.append(counter)
            counter.__enter__()
        if step == last:
            counter.__exit__(None, None, None)
            readers.pop()
        return step_fn(images, masks, step, momentum, **kw)
    trainer.step_fn = counted
    return counter


def _non_reading_window_reads(tmp_path, python_readers, *overrides):
    trainer = _trainer(tmp_path, "optimization.max_steps=6", "logging.log_every=100",
                       "logging.checkpoint_every=0", "data.num_workers=1", *overrides)
    assert trainer.steps_per_epoch > 6  # no epoch-end read inside the window
    counter = _count_reads_between(trainer, 1, 5, python_readers)  # reads after steps 0 and 5 only
    trainer.train()
    return counter


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
def test_training_loop_reads_nothing_between_reads(tmp_path, python_readers):
    """Steps 1-4 of a real run (log_every=100, loading in a worker process): the loop, the step (views,
    forward, backward, clip, AdamW with its skip flag, EMA, the log row) reads no device value.
    The failure message names each read and where it came from."""
    counter = _non_reading_window_reads(tmp_path, python_readers)
    assert not counter.reads, f"host reads between the trainer's reads:\n{counter.report()}"


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
@pytest.mark.parametrize("conditioning", ["sequence", "none"])
def test_training_loop_reads_nothing_in_other_model_layouts(tmp_path, python_readers, conditioning):
    counter = _non_reading_window_reads(tmp_path, python_readers, f"meta.conditioning={conditioning}",
                                        "meta.shared_context=true", "logging.checkpoint_every=0")
    assert not counter.reads, f"host reads between the trainer's reads:\n{counter.report()}"


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_step_is_skipped_on_the_device(tmp_path, seed, fused):
    """The bad step's update never reaches the weights, without a host read in the step: the fused
    AdamW gets the device flag (parameters, moments and step counts unchanged); without the fused
    kernel the update is undone with torch.where; the EMA target stays bitwise as it was."""
    trainer = _trainer(tmp_path, "optimization.max_steps=3", "data.num_workers=0", f"meta.seed={seed}")
    trainer.step_fn.fused = fused
    loader = iter(trainer.loader())
    step_fn = trainer.step_fn
    first = next(loader)
    step_fn(first.images_on(trainer.device), first.masks, 0, 0.996)  # moments exist from here on
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {(id(p), k): v.clone() for p, st in trainer.optimizer.state.items() for k, v in st.items()}
    batch = next(loader)
    result = step_fn(batch.images_on(trainer.device), batch.masks, 1, 0.996, poison_loss=True)
    assert result.row[-1] == 1.0 and not torch.isfinite(result.row[0])
    after = trainer.model.state_dict()
    for k in before:  # the target encoder too: the EMA's momentum is 1 on a skipped step, on the CPU as well
        assert torch.equal(before[k], after[k]), k
    for p, st in trainer.optimizer.state.items():
        for k, v in st.items():
            assert torch.equal(moments[(id(p), k)], v), k
    result = step_fn(batch.images_on(trainer.device), batch.masks, 1, 0.996)  # and a good one does move
    assert result.row[-1] == 0.0
    assert not torch.equal(before["encoder.patch_embed.proj.weight"],
                           trainer.model.state_dict()["encoder.patch_embed.proj.weight"])


def _ema_pair(seed):
    """An IWM pair small enough to read: its target and online encoders, trained apart."""
    from tests.helpers import small_iwm

    model = small_iwm(seed)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("skipped", [True, False])
def test_step_ema_skips_exactly_on_the_cpu_and_reads_nothing(skipped, python_readers, seed):
    """TrainStep.ema on the CPU: a skipped step (found_inf = 1) leaves the target bitwise as it was (the
    old CPU path passed the float momentum, so the target still moved), a good step is the float EMA,
    and neither reads a value back to the host."""
    from iwm.step import TrainStep

    model = _ema_pair(seed)
    before = [p.detach().clone() for p in model.target_encoder.parameters()]
    online = [p.detach() for p in model.encoder.parameters()]
    counter = HostReadCounter()
    python_readers.append(counter)
    with counter:
        TrainStep.ema(type("S", (), {"model": model})(), 0.9, torch.tensor(float(skipped)))
    python_readers.pop()
    assert not counter.reads, counter.report()
    for t, b, o in zip(model.target_encoder.parameters(), before, online):
        if skipped:
            assert torch.equal(t.detach(), b)
        else:
            torch.testing.assert_close(t.detach(), b * 0.9 + o * (1 - 0.9), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_unchecked_cpu_momentum_follows_the_device_rule(backend, seed):
    """ema_update_(check_values=False) with a CPU momentum tensor: an invalid value (never read on the
    host) leaves every target unchanged and sets the CPU's flag, on every backend; a valid one updates."""
    import iwm_kernels
    from iwm_kernels.ema import raise_if_momentum_was_invalid

    gen = torch.Generator().manual_seed(seed)
    t, o = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    want = t.clone()
    for bad in (float("nan"), 1.5, -0.25):
        iwm_kernels.ema_update_([t], [o], torch.tensor(bad, dtype=torch.float64), backend=backend,
                                check_values=False)
        assert torch.equal(t, want), bad
        with pytest.raises(ValueError, match="momentum"):
            raise_if_momentum_was_invalid("cpu")
    iwm_kernels.ema_update_([t], [o], torch.tensor(0.75, dtype=torch.float64), backend=backend, check_values=False)
    torch.testing.assert_close(t, want * 0.75 + o * 0.25)
    raise_if_momentum_was_invalid("cpu")  # a valid value leaves the flag clear


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
def test_non_finite_step_between_reads_stops_at_the_read_naming_it(tmp_path):
    """NaN at step 2, reads at steps 0 and 3 (log_every=4, checkpoint_every=4): the run stops at the
    read after step 3 naming step 2, rows before step 2 logged, no checkpoint written after it."""
    from iwm.train import TrainingStopped

    trainer = _trainer(tmp_path, "optimization.max_steps=8", "logging.log_every=4", "logging.checkpoint_every=4",
                       "data.num_workers=0")
    trainer._fault_nan_step = 2
    with pytest.raises(TrainingStopped, match=r"non-finite loss \(nan\) at step 2: stopping"):
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert not (tmp_path / "latest.pt").exists()


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
def test_rows_are_written_for_every_step_at_the_reads(tmp_path):
    trainer = _trainer(tmp_path, "optimization.max_steps=5", "logging.log_every=3", "data.num_workers=0")
    summary = trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5))
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in rows)
    assert summary["final_loss"] == rows[-1]["loss"]


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
def test_profile_steps_write_a_chrome_trace_with_every_phase(tmp_path):
    trainer = _trainer(tmp_path, "optimization.max_steps=3", "logging.profile_steps=1:2", "data.num_workers=0")
    trainer.train()
    trace = json.loads((tmp_path / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    from benchmarks.suites.step import PHASES  # the report's step breakdown: the same names

    for phase in PHASES + ("target", "context_encoder", "predictor"):
        assert f"iwm/{phase}" in names, phase
    steps = [e for e in trace["traceEvents"] if e.get("name") == "iwm/forward"]
    assert len(steps) == 1  # step 1 only


@pytest.mark.parametrize("text", ["3", "2:2", "5:1", "a:b", "-1:2", "1:2:3"])
def test_profile_steps_is_validated(text):
    from iwm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="logging.profile_steps"):
        load_config(TINY, [f"logging.profile_steps={text}"])


def test_eta_leaves_out_the_first_step():
    """A 30 s first step (compile, warm-up) and 0.1 s steps after it: the ETA of the remaining 1000
    steps is 100 s, not ~15000 s (the old rate of the window including the first step)."""
    from iwm.train import Window

    w = Window()
    w.add(8, 30.0, 0.0, timed=False)
    assert w.eta_s(1000) is None  # nothing to extrapolate from yet
    w.reset()
    for _ in range(9):
        w.add(8, 0.1, 0.0)
    assert w.eta_s(1000) == pytest.approx(100.0)
    assert w.eta_s(0) == 0.0
    w2 = Window()
    w2.add(8, 30.0, 0.0, timed=False)
    w2.add(8, 0.1, 0.0)
    assert w2.eta_s(1000) == pytest.approx(100.0)


DDP_RANK = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.test_step import _count_reads_between, _trainer, count_python_readers
readers = count_python_readers()
trainer = _trainer(Path(sys.argv[2]), "optimization.max_steps=6", "logging.log_every=100",
                   "logging.checkpoint_every=0", "data.num_workers=1", "data.batch_size=4")
counter = _count_reads_between(trainer, 1, 5, readers)
trainer.train()
print("READS " + json.dumps({"rank": trainer.dist.rank, "reads": counter.report()}))
"""


@pytest.mark.slow
def test_ddp_training_loop_reads_nothing_between_reads(tmp_path):
    """The same count on each of two gloo DDP processes: the window's all-reduce is at the reads only."""
    import os
    import subprocess
    import sys

    from iwm.distributed import free_port

    script = tmp_path / "rank.py"
    script.write_text(DDP_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           free_port(), str(script), str(ROOT), str(tmp_path / "run")]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [json.loads(line[6:]) for line in res.stdout.splitlines() if line.startswith("READS ")]
    assert sorted(r["rank"] for r in reports) == [0, 1], res.stdout[-2000:]
    for r in reports:
        assert r["reads"] == "", f"rank {r['rank']}:\n{r['reads']}"


@pytest.mark.slow  # a real Trainer run (several seconds on 2 shared cores)
def test_meta_kernel_backend_applies_inside_the_run_only(tmp_path, monkeypatch):
    """meta.kernel_backend used to be written into os.environ, changing every later call in the process
    (and the next Trainer's, whatever its config said)."""
    import os

    from iwm_kernels._backend import requested_backend

    monkeypatch.delenv("IWM_KERNELS_BACKEND", raising=False)
    trainer = _trainer(tmp_path, "optimization.max_steps=1", "data.num_workers=0", "meta.kernel_backend=reference")
    seen = []
    step_fn = trainer.step_fn
    trainer.step_fn = lambda *a, **k: (seen.append(requested_backend(None)), step_fn(*a, **k))[1]
    trainer.train()
    assert seen == ["reference"]
    assert "IWM_KERNELS_BACKEND" not in os.environ
    assert requested_backend(None) is None

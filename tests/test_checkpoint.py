"""Checkpoints: atomic writes, unwrapped keys, clear errors on unreadable files, kill mid-write."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from iwm.checkpoint import (CheckpointError, find_resume_checkpoint, load_checkpoint, periodic_checkpoints,
                            save_checkpoint, unwrap_state_dict)


def test_unwrap_prefixes():
    state = {"module.blocks.0.w": 1, "_orig_mod.module.norm.b": 2, "plain": 3}
    assert unwrap_state_dict(state) == {"blocks.0.w": 1, "norm.b": 2, "plain": 3}


def test_latest_and_periodic_rotation(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path, step, periodic=True, keep=2)
    assert [p.name for p in periodic_checkpoints(tmp_path)] == ["step-0000004.pt", "step-0000005.pt"]
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 5
    assert not list(tmp_path.glob(".*.tmp"))


def test_unreadable_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(find_resume_checkpoint(tmp_path))
    with pytest.raises(CheckpointError, match="read_checkpoint: no such file"):
        find_resume_checkpoint(tmp_path, explicit=str(tmp_path / "nope.pt"))


def test_kill_during_write_leaves_previous_loadable(tmp_path):
    """SIGKILL a process while it rewrites latest.pt with a large state: the old file stays whole."""
    save_checkpoint({"step": 1, "blob": torch.zeros(10)}, tmp_path, 1, periodic=False)
    script = textwrap.dedent(f"""
        import torch, sys
        from iwm.checkpoint import save_checkpoint
        big = torch.randn(40_000_000)  # 160 MB: the write takes a while
        print("ready", flush=True)
        for step in range(2, 100):
            save_checkpoint({{"step": step, "blob": big}}, {str(tmp_path)!r}, step, periodic=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(tmp_path / "latest.pt")
    assert state["step"] >= 1
    assert state["blob"].numel() in (10, 40_000_000)

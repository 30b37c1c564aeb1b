"""Checkpoints: weights-only content, integrity digests, atomic writes, RNG round trips, clear errors."""
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from iwm.checkpoint import (FORMAT, RESUME_SAFE_KEYS, CheckpointError, config_changes, find_resume_checkpoint,
                            load_checkpoint, periodic_checkpoints, rng_state, save_checkpoint, seal,
                            set_rng_state)
from iwm.config import Config
from iwm.models import build_encoder, build_predictor, load_ijepa_checkpoint


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): proof that loading ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_checkpoint(path, marker, legacy=False):
    evil = {"step": 1, "encoder": {"w": torch.zeros(2)}, "predictor": {}, "target_encoder": {},
            "payload": _WritesMarker(marker)}
    if legacy:  # a bare pickle instead of torch's zip
        with open(path, "wb") as f:
            pickle.dump(evil, f, protocol=2)
    else:
        torch.save(evil, path)
    assert not marker.exists()
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "latest.pt", marker, legacy=legacy)
    with pytest.raises(CheckpointError, match="not a weights-only file") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "unpickling" in str(info.value)
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        load_ijepa_checkpoint(path)
    assert not marker.exists()
    # The file really does run code when unpickled: the refusal is what kept the marker away.
    with open(path, "rb") as f:
        torch.load(f, weights_only=False) if not legacy else pickle.load(f)
    assert marker.exists()


def test_ijepa_file_loads_weights_only(tmp_path, seed):
    """What I-JEPA's train.py writes (module. prefixes, AdamW and GradScaler state, float loss) needs no
    unpickling, so the safe loader still reads genuine files from disk."""
    enc = build_encoder("vit_small", img_size=32, patch_size=16, depth=1)
    pred = build_predictor(enc.num_patches, enc.patch_embed.grid, 384, depth=1, predictor_embed_dim=96,
                           num_heads=6, conditioning="none", shared_context=False)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(pred.parameters()), lr=1e-3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    prefixed = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}
    torch.save({"encoder": prefixed(enc), "predictor": prefixed(pred), "target_encoder": prefixed(enc),
                "opt": opt.state_dict(), "scaler": torch.amp.GradScaler("cpu").state_dict(), "epoch": 3,
                "loss": 0.25, "batch_size": 8, "world_size": 1, "lr": 1e-3}, tmp_path / "jepa-ep3.pth.tar")
    enc2, pred2, _ = load_ijepa_checkpoint(tmp_path / "jepa-ep3.pth.tar")
    for mine, theirs in ((enc2, enc), (pred2, pred)):
        loaded, saved = mine.state_dict(), theirs.state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_old_format_checkpoints_are_refused(tmp_path):
    # What iwm wrote before: NumPy's RNG state as a pickled ndarray tuple, no integrity digest.
    old = tmp_path / "old.pt"
    torch.save({"step": 3, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                   "python": random.getstate()}}, old)
    with pytest.raises(CheckpointError, match="not a weights-only file.*older iwm"):
        load_checkpoint(old)
    plain = tmp_path / "plain.pt"
    torch.save({"step": 3}, plain)  # weights-only but unsealed
    with pytest.raises(CheckpointError, match="no integrity digest"):
        load_checkpoint(plain)


def test_save_refuses_values_that_would_need_unpickling(tmp_path):
    for bad, where in (({"step": 1, "loss": np.float64(0.5)}, "loss"),
                       ({"step": 1, "sched": {"obj": _WritesMarker(tmp_path / "m")}}, "sched/obj"),
                       ({"step": 1, "keys": {(1, 2): 0}}, "keys")):
        with pytest.raises(CheckpointError, match=f"{where}.*only"):
            save_checkpoint(bad, tmp_path, 1, periodic=False)
    assert not (tmp_path / "latest.pt").exists() and not (tmp_path / "m").exists()


def test_content_round_trips_weights_only(tmp_path, seed):
    state = {"step": 7, "encoder": {"w": torch.randn(3, 5), "b": torch.randn(5).to(torch.bfloat16)},
             "nested": {"ints": [1, 2, 3], "pair": (0.25, None), 4: "int key", "flag": True},
             "empty": torch.empty(0, 3), "scalar": torch.tensor(float(seed))}
    save_checkpoint(state, tmp_path, 7, periodic=False)
    raw = torch.load(tmp_path / "latest.pt", weights_only=True)  # plain torch can read it safely too
    assert raw["format"] == FORMAT and raw["integrity"]["algorithm"] == "sha256"
    loaded = load_checkpoint(tmp_path / "latest.pt")
    assert loaded["nested"] == state["nested"] and loaded["step"] == 7
    for key in ("w", "b"):
        assert torch.equal(loaded["encoder"][key], state["encoder"][key])
    assert loaded["empty"].shape == (0, 3) and torch.equal(loaded["scalar"], state["scalar"])


def test_rng_state_round_trips_through_a_checkpoint(tmp_path, seed):
    """Exact resume needs every global generator back as it was; the saved form must load weights-only."""
    np.random.seed(seed)
    random.seed(seed + 1)
    np.random.randn(3)  # leave NumPy with a cached Gaussian (has_gauss=1)
    random.gauss(0, 1)
    save_checkpoint({"step": 1, "rng": rng_state()}, tmp_path, 1, periodic=False)
    expected = (torch.rand(4), np.random.randn(5), [random.random() for _ in range(3)], random.gauss(0, 1))
    torch.manual_seed(seed + 99)
    np.random.seed(seed + 99)
    random.seed(seed + 99)
    set_rng_state(load_checkpoint(tmp_path / "latest.pt")["rng"])
    got = (torch.rand(4), np.random.randn(5), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def _adam_state(seed):
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"step": 1, "encoder": model.state_dict(), "optimizer": opt.state_dict()}


def test_flipped_byte_in_optimizer_state_is_detected(tmp_path, seed):
    state = _adam_state(seed)
    path = save_checkpoint(state, tmp_path, 1, periodic=False)
    target = state["optimizer"]["state"][0]["exp_avg_sq"]
    data = bytearray(path.read_bytes())
    where = bytes(data).find(target.numpy().tobytes())
    assert where > 0  # the tensor's bytes, stored as is in the zip
    rng = random.Random(seed)
    data[where + rng.randrange(target.numel() * 4)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    unchecked = torch.load(path, weights_only=True)  # torch itself does not notice
    assert not torch.equal(unchecked["optimizer"]["state"][0]["exp_avg_sq"], target)
    with pytest.raises(CheckpointError, match="corrupted: checksum mismatch in tensor.*optimizer/state/0/exp_avg_sq"):
        load_checkpoint(path)


def test_changed_plain_value_is_detected(tmp_path, seed):
    sealed = seal(_adam_state(seed))
    sealed["optimizer"]["param_groups"][0]["lr"] = 0.5  # a value outside any tensor
    torch.save(sealed, tmp_path / "latest.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch in its non-tensor values"):
        load_checkpoint(tmp_path / "latest.pt")


def test_latest_and_periodic_rotation(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, tmp_path, step, periodic=True, keep=2)
    assert [p.name for p in periodic_checkpoints(tmp_path)] == ["step-0000004.pt", "step-0000005.pt"]
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 5
    assert torch.equal(load_checkpoint(tmp_path / "step-0000004.pt")["w"], torch.full((3,), 4.0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_unreadable_checkpoint_is_an_error(tmp_path):
    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(find_resume_checkpoint(tmp_path))
    with pytest.raises(CheckpointError, match="read_checkpoint: no such file"):
        find_resume_checkpoint(tmp_path, explicit=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def _flat(cfg_dict):
    return {f"{s}.{k}": v for s, values in cfg_dict.items() for k, v in values.items()}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value + [value[-1] if value else 1]
    return "x"  # None


def test_config_changes_names_every_result_changing_key():
    base = Config().to_dict()
    flat = _flat(base)
    assert RESUME_SAFE_KEYS <= set(flat)  # no stale names in the allow-list
    for key, value in flat.items():
        section, name = key.split(".")
        now = {s: dict(v) for s, v in base.items()}
        now[section][name] = _changed(value)
        listed = config_changes(base, now)
        if key in RESUME_SAFE_KEYS or key == "optimization.max_steps":
            assert listed == [], key
        else:
            assert len(listed) == 1 and listed[0].startswith(f"{key} (checkpoint: "), (key, listed)
    # With optimization.epochs = 0 the schedules span max_steps, so changing it changes the result.
    no_epochs = {s: dict(v) for s, v in base.items()}
    no_epochs["optimization"].update(epochs=0, max_steps=100)
    longer = {s: dict(v) for s, v in no_epochs.items()}
    longer["optimization"]["max_steps"] = 200
    assert [c.split(" ")[0] for c in config_changes(no_epochs, longer)] == ["optimization.max_steps"]
    # A key the checkpoint's config predates counts at its default (the behaviour it was trained with).
    older = {s: {k: v for k, v in values.items() if k != "seed"} for s, values in base.items()}
    assert config_changes(older, base, defaults=base) == []
    reseeded = {s: dict(v) for s, v in base.items()}
    reseeded["meta"]["seed"] = base["meta"]["seed"] + 1
    assert [c.split(" ")[0] for c in config_changes(older, reseeded, defaults=base)] == ["meta.seed"]


@pytest.mark.slow
def test_kill_during_write_leaves_previous_loadable(tmp_path):
    """SIGKILL a process while its temporary file exists (mid-write): latest.pt stays one whole version."""
    save_checkpoint({"step": 1, "blob": torch.full((10,), 1.0)}, tmp_path, 1, periodic=False)
    script = textwrap.dedent(f"""
        import torch
        from iwm.checkpoint import save_checkpoint
        print("ready", flush=True)
        for step in range(2, 1000):
            save_checkpoint({{"step": step, "blob": torch.full((20_000_000,), float(step))}}, {str(tmp_path)!r},
                            step, periodic=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".latest.pt.*.tmp")):
            time.sleep(0.005)
        assert list(tmp_path.glob(".latest.pt.*.tmp")), "no write was caught in progress"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(tmp_path / "latest.pt")  # verifies the digest: no torn or mixed file
    step = state["step"]
    assert torch.equal(state["blob"], torch.full(state["blob"].shape, float(step)))
    assert state["blob"].numel() == (10 if step == 1 else 20_000_000)
    save_checkpoint({"step": 0}, tmp_path, 0, periodic=False)
    assert not list(tmp_path.glob(".*.tmp"))  # the next save clears the killed write's leftovers

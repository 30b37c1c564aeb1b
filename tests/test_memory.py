"""Memory over a long run: the caches that live across steps stay bounded and do not keep old tensors
alive, and a short training run's live heap and Python object count stop growing after warm-up
(docs/memory.md has the several-thousand-step soak this test is the fast version of)."""
import csv
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from iwm_kernels.attention import layout
from iwm_kernels.ema import plan as ema_plan
import iwm_kernels.ema as ema

ROOT = Path(__file__).resolve().parents[1]


def _random_cu_seqlens(gen: torch.Generator, num_seqs: int) -> torch.Tensor:
    lengths = torch.randint(1, 40, (num_seqs,), generator=gen)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


def test_layout_cache_is_bounded_and_releases_old_offsets(seed):
    # Every training step brings new cu_seqlens tensors (the masks vary); the cache is keyed on their
    # identity and holds them, so without its bound it would keep every step's offsets alive.
    gen = torch.Generator().manual_seed(seed)
    layout._cache.clear()
    refs = []
    for _ in range(200):
        cu = _random_cu_seqlens(gen, int(torch.randint(1, 9, (1,), generator=gen)))
        total = int(cu[-1])
        layout.prepare(cu, None, total, total)
        refs.append(weakref.ref(cu))
        del cu
    gc.collect()
    assert len(layout._cache) <= layout._MAX_ENTRIES
    alive = sum(r() is not None for r in refs)
    assert alive <= layout._MAX_ENTRIES, f"{alive} of 200 offset tensors kept alive by the layout cache"


def test_ema_caches_are_bounded(seed):
    # Keyed on the data pointers of every parameter: a fresh set of tensors (a rebuilt model, a
    # benchmark sweep) is a new key each time.
    gen = torch.Generator().manual_seed(seed)
    ema._validated.clear()
    ema_plan._cache.clear()
    keep = []  # alive, so no two sets share pointers and every call is a new key
    for _ in range(60):
        sizes = torch.randint(1, 300, (3,), generator=gen).tolist()
        targets = [torch.randn(n, generator=gen) for n in sizes]
        onlines = [torch.randn(n, generator=gen) for n in sizes]
        keep.append((targets, onlines))
        ema.ema_update_(targets, onlines, 0.9, backend="reference")
        ema_plan.get_plans(targets, onlines)
    assert len(ema._validated) <= 16
    assert len(ema_plan._cache) <= ema_plan._MAX_CACHED


def _read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_training_heap_stops_growing_after_warmup(tmp_path):
    """A tiny run in a fresh process (scripts/rss_soak.py): from step 20 to step 60 the bytes malloc
    has handed out and the Python object count stay flat. One step's activations are a few MB, so a
    step that kept its autograd graph, or a list that kept a tensor per step, fails this at once."""
    out = tmp_path / "soak"
    cmd = [sys.executable, str(ROOT / "scripts" / "rss_soak.py"), "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--steps", "60", "--every", "20", "--out", str(out),
           "data.crop_size=32", "data.batch_size=8", "data.builtin_samples=256", "data.num_workers=0",
           "meta.use_bfloat16=false", "mask.min_keep=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {int(r["step"]): r for r in _read_rows(out / "rss.csv")}
    assert set(rows) == {1, 20, 40, 60}
    warm, end = rows[20], rows[60]
    if warm["heap_in_use"] == warm["heap_in_use"]:  # NaN without glibc's mallinfo2
        grown = end["heap_in_use"] - warm["heap_in_use"]
        assert grown < 5, f"malloc'ed bytes grew by {grown:.1f} MB over 40 steps after warm-up"
    grown_objects = end["py_objects"] - warm["py_objects"]
    assert grown_objects < 2000, f"{grown_objects:.0f} more Python objects after 40 more steps"
    assert end["rss"] - warm["rss"] < 64, f"RSS grew by {end['rss'] - warm['rss']:.0f} MB over 40 steps"
    assert end["hwm"] >= end["rss"] > 0

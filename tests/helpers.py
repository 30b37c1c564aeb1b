"""Helpers shared by the tests: backend lists, dtype tolerance tables, the host-read probe and an op-name recorder."""
import collections
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from iwm_kernels import _backend

# dtype -> (atol, rtol) for a kernel compared with the fp32-accumulating reference.
# bf16 has 8 mantissa bits: one rounding is ~4e-3 relative; a few accumulated roundings stay under 2e-2.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def backends_on(device: str = "cpu", include_reference: bool = True):
    names = [n for n in _backend.BACKENDS if _backend.runs_on(n, torch.device(device)).available]
    return names if include_reference else [n for n in names if n != "reference"]


# ---- the host-read probe (tests/test_host_syncs.py, tests/test_step.py) ----------------------------------
# Every aten op that must look at values to return a Python value or a data-dependent shape
# (`_local_scalar_dense` is item/float/int/bool), plus the Python-side readers that can bypass the
# dispatcher for CPU tensors.
_aten = torch.ops.aten
READING_OPS = {_aten._local_scalar_dense, _aten.nonzero, _aten.masked_select, _aten.equal, _aten._unique,
               _aten._unique2, _aten.unique_dim, _aten.unique_consecutive, _aten.unique_dim_consecutive}
PYTHON_READERS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
_ROOT = str(Path(__file__).resolve().parents[1])


def _where() -> str:
    """The repository frames that led to a read (innermost last), for the failure message."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if _ROOT in f.filename and "/tests/" not in f.filename and ".venv" not in f.filename]
    return " <- ".join(f"{Path(f.filename).relative_to(_ROOT)}:{f.lineno}" for f in reversed(frames[-4:])) or "?"


class HostReadCounter(TorchDispatchMode):
    """Counts value reads while active, keyed by (what, where)."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in READING_OPS:
            self.reads[(str(func), _where())] += 1
        elif func is _aten.repeat_interleave.Tensor and \
                kwargs.get("output_size", args[1] if len(args) > 1 else None) is None:
            self.reads[(str(func) + " (no output_size)", _where())] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    def report(self) -> str:
        return "\n".join(f"{n} x {what} at {where}" for (what, where), n in self.reads.most_common())


def count_python_readers(setattr_=setattr) -> list:
    """Patches Tensor.item/tolist/__bool__/... (with `setattr_`, e.g. monkeypatch.setattr) to count into
    the innermost HostReadCounter of the returned list: push a counter to count, pop it to stop."""
    active: list = []
    for name in PYTHON_READERS:
        original = getattr(torch.Tensor, name)

        def reader(self, *args, _original=original, _name=name, **kwargs):
            if active:
                active[-1].reads[(f"Tensor.{_name}", _where())] += 1
            return _original(self, *args, **kwargs)
        setattr_(torch.Tensor, name, reader)
    return active


def small_iwm(seed: int):
    """A 2-block tiny IWM at 32 px (the multi-process tests' model), initialised from `seed`."""
    from iwm.models import IWM

    torch.manual_seed(seed)
    return IWM.from_preset("tiny", img_size=32, encoder_depth=2, pred_depth=2)


def random_batches(model, seed: int, global_batch: int, steps: int) -> list:
    """The global batch of each step: random uint8 images and the sampler's masks, as the loader
    delivers them (the same for every rank and every process count)."""
    from iwm.masks import MultiBlockMaskSampler

    size = model.encoder.img_size
    gen = torch.Generator().manual_seed(seed)
    sampler = MultiBlockMaskSampler(model.encoder.patch_embed.grid, seed=seed, min_keep=2)
    return [(torch.randint(0, 256, (global_batch, 3, size, size), dtype=torch.uint8, generator=gen),
             sampler.sample(global_batch, step)) for step in range(steps)]


def assert_trained_close(a: torch.Tensor, b: torch.Tensor, name: str, *, lr: float, steps: int,
                         rel: float = 1e-3) -> None:
    """Parameters after `steps` AdamW steps on 2 ranks vs 1 (another reduction order): AdamW turns a
    rounding difference in a near-zero gradient into up to lr of a step, so such (rare) elements may
    differ by up to lr * steps; every other element is within `rel` of its tensor's scale. Such elements
    are about 0.2 % of a tensor at most, so a small tensor (a 96-wide bias) may have one or two: the count
    allowed is 1 % of the tensor, and never fewer than 2 (a sharding bug moves whole shards)."""
    if not b.numel():
        return
    scale = float(b.abs().max())
    diff = (a.float() - b.float()).abs()
    loose = diff > rel * scale + 1e-7 + rel * b.float().abs()
    if name.endswith("attn.qkv.bias"):
        # The key bias (qkv's middle third): softmax is invariant to it, so its exact gradient is zero and
        # every AdamW update of it is rounding noise made up to lr: only the lr * steps bound below holds.
        third = b.numel() // 3
        loose[third:2 * third] = False
    assert int(loose.sum()) <= max(0.01 * diff.numel(), 2), (name, int(loose.sum()), diff.numel())
    assert float(diff.max()) <= lr * steps, (name, float(diff.max()))


def start_two_ranks(cmd: list, cwd, **popen) -> list:
    """Start `cmd` as rank 0 and rank 1 of a 2-process gloo group on this host (RANK / WORLD_SIZE /
    MASTER_* set as torchrun or srun would; one thread each so the two share 2 cores fairly)."""
    import os
    import subprocess

    from iwm.distributed import free_port

    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": str(cwd)}
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen))
    return procs


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @property
    def onednn(self) -> bool:
        return any("mkldnn._linear_pointwise" in n for n in self.names)

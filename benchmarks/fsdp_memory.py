"""Per-rank memory of the model state under DDP and FSDP2, on 2 gloo processes (CPU).

    python benchmarks/fsdp_memory.py                         # ViT-L/16 IWM (iwm_equi_vitl16), FSDP2 measured
    python benchmarks/fsdp_memory.py --modes ddp,fsdp2 --preset iwm_equi_vitb16   # both measured

Each rank builds the model, runs one real training step (iwm.step.TrainStep, batch 1 per rank) and
sums the bytes of what it holds afterwards: parameters (encoder, target encoder, predictor), gradients
and AdamW state (the DTensors' local shards under FSDP2). These bytes do not depend on the image size,
so a small image keeps the step quick. Besides the measured rows, the table gives the replicated size
(what DDP holds on every rank, from the parameter counts): DDP of ViT-L on 2 processes needs ~2x8 GB
plus DDP's gradient buckets, more than a small CPU machine has, so there `--modes fsdp2` compares
against it; with a smaller preset both modes are measured and the DDP row equals it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _rss_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) / 1024
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from iwm import augment as aug
    from iwm.builders import build_optimizer
    from iwm.masks import MultiBlockMaskSampler
    from iwm.models import IWM
    from iwm.step import TrainStep

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = IWM.from_preset(args.preset, img_size=args.img_size)
    counts = {"params": sum(p.numel() for p in model.parameters()),
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    optimizer = build_optimizer(model, 1e-4, 0.04)
    step_fn = TrainStep(model, optimizer, device=torch.device("cpu"), aug_cfg=aug.AugmentConfig(out_size=args.img_size),
                        seed=0, global_batch=world, rank=rank, batch_size=1, distributed=True, parallel=args.mode)
    grid = model.encoder.patch_embed.grid
    masks = MultiBlockMaskSampler(grid, seed=0, min_keep=2).sample(world, 0).slice(rank, rank + 1)
    images = torch.randint(0, 256, (1, 3, args.img_size, args.img_size), dtype=torch.uint8)
    t0 = time.perf_counter()
    step_fn(images, masks, 0, 0.996)
    seconds = time.perf_counter() - t0
    params = sum(_bytes(p) for p in model.parameters())
    grads = sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(_bytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    row = {"rank": rank, "params": params, "grads": grads, "optimizer": state, "step_s": seconds, **_rss_mb(),
           "counts": counts}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def launch(mode: str, args) -> list[dict]:
    out = Path(args.tmp) / f"{mode}.json"
    from iwm.distributed import free_port

    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--mode", mode, "--preset", args.preset,
                                       "--img-size", str(args.img_size), "--out", str(out)], env=env, cwd=ROOT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{mode}: a rank failed (exit codes {codes})")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="iwm_equi_vitl16")
    parser.add_argument("--img-size", type=int, default=96, help="pixels (the state's bytes do not depend on it)")
    parser.add_argument("--modes", default="fsdp2", help="comma-separated: ddp, fsdp2")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("ddp", "fsdp2") for m in modes):
        raise SystemExit(f"--modes: expected ddp and/or fsdp2, got {args.modes!r}")
    results = {m: launch(m, args) for m in modes}
    counts = next(iter(results.values()))[0]["counts"]
    gib = 1024 ** 3
    # Replicated (DDP) per rank: every parameter, plus a gradient and AdamW's two moments per trainable one (fp32).
    replicated = {"params": 4 * counts["params"], "grads": 4 * counts["trainable"], "optimizer": 8 * counts["trainable"]}
    print(f"{args.preset}: {counts['params'] / 1e6:.1f}M parameters ({counts['trainable'] / 1e6:.1f}M trainable), "
          f"2 gloo processes, batch 1 per rank at {args.img_size}px")
    print(f"{'mode':<22}{'rank':>5}{'params GiB':>12}{'grads GiB':>11}{'AdamW GiB':>11}{'total GiB':>11}"
          f"{'RSS GiB':>9}{'step s':>8}")
    print(f"{'replicated (counts)':<22}{'-':>5}{replicated['params'] / gib:>12.3f}{replicated['grads'] / gib:>11.3f}"
          f"{replicated['optimizer'] / gib:>11.3f}{sum(replicated.values()) / gib:>11.3f}")
    totals = {}
    for mode, rows in results.items():
        for r in rows:
            total = r["params"] + r["grads"] + r["optimizer"]
            totals[mode] = max(totals.get(mode, 0), total)
            print(f"{mode + ' (measured)':<22}{r['rank']:>5}{r['params'] / gib:>12.3f}{r['grads'] / gib:>11.3f}"
                  f"{r['optimizer'] / gib:>11.3f}{total / gib:>11.3f}{r.get('VmRSS', 0) / 1024:>9.2f}{r['step_s']:>8.1f}")
    ddp = totals.get("ddp", sum(replicated.values()))
    if "fsdp2" in totals:
        what = "measured DDP" if "ddp" in totals else "the replicated (DDP) size"
        print(f"FSDP2 / DDP per rank (largest rank): {totals['fsdp2'] / ddp:.3f}x of {what} (target <= 0.55x)")


if __name__ == "__main__":
    main()

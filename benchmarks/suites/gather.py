"""Gather suite: masked-token gathering at ViT-B/16, ViT-L/16 and ViT-H/14 shapes, and the mask sampler.

Cases, per ViT shape and batch (masks from iwm.masks with I-JEPA's settings, grid 14 or 16):
- context gather, I-JEPA form: x [B, N, D] with the collated context mask [B, K] (truncated to the
  batch minimum). I-JEPA's apply_masks (baseline), advanced indexing, index_select on the flattened
  tokens, and ours (gather_tokens; apply_masks). Bytes: the K*D values read and written per sample plus
  a 4-byte index per row (what a gather must move).
- context gather, ragged: the packed (untruncated) context; advanced indexing with a per-row sample
  vector (the only eager way to gather ragged rows) against ours.
- fused targets: the packed target blocks, gather -> + pos -> + bias -> layer_norm. The eager sequence
  (baseline), torch.compile of it, and ours with pos, bias and normalize fused.
- gather forward + backward: I-JEPA's apply_masks (baseline) against ours.
- mask sampler: I-JEPA's per-sample collator (a port, benchmarks/ijepa_collator.py) against ours, at
  batch 256 on the 14x14 grid (and 16x16 for ViT-H/14); always timed on the CPU, where it runs.

On the CPU the native op's outputs of 32 MB and more come from its output pool (csrc/cpu_output_pool.h);
the fused case also times it with the pool off, so the kernel and the allocator effects can be told
apart. `python -m benchmarks.suites.gather [--threads 1]` prints the CPU headline ratios, timed
interleaved and best-of-rounds, which a busy shared machine disturbs least.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

import iwm_kernels
from iwm.masks import MultiBlockMaskSampler
from iwm_kernels._backend import runs_on
from iwm_kernels.gather import reference

from ..common import Row, time_fns, try_compile
from ..ijepa_collator import IJEPAMaskCollator
from ..shapes import VITS

SUITE = "gather"
APPLY_MASKS = "I-JEPA apply_masks"
EAGER = "eager gather -> +pos -> +bias -> layer_norm"
COLLATOR = "I-JEPA collator (per-sample port)"


def ijepa_apply_masks(x, masks):
    """I-JEPA's apply_masks: an int64 [B, K, D] index built by repeat, torch.gather, then cat."""
    out = []
    for m in masks:
        out.append(torch.gather(x, dim=1, index=m.unsqueeze(-1).repeat(1, 1, x.size(-1))))
    return torch.cat(out, dim=0)


def eager_sequence(x, rows, tokens, pos, bias):
    return F.layer_norm(x[rows, tokens] + pos[tokens] + bias[rows], (x.shape[-1],))


def our_backends(device: torch.device) -> dict[str, str]:
    """backend -> '' if it is timed here, else why not."""
    out = {}
    for backend in ("native", "triton"):
        status = runs_on(backend, device, "gather_tokens")  # the registry knows gather has no native CUDA code
        if backend == "triton" and device.type == "cpu":
            status = status._replace(available=False, detail="the Triton interpreter is a correctness tool, not timed")
        out[backend] = "" if status.available else status.detail
    return out


def configs(device: torch.device, quick: bool) -> list[tuple[str, int, torch.dtype, Optional[int]]]:
    """(vit, batch, dtype, CPU threads or None for the default)."""
    if device.type == "cuda":
        if quick:  # two shapes: each config pays a torch.compile of the eager sequence
            return [("vit_base", 128, torch.bfloat16, None), ("vit_huge", 256, torch.bfloat16, None)]
        return [(v, b, d, None) for v, b in [("vit_base", 64), ("vit_base", 128), ("vit_base", 256),
                                             ("vit_large", 128), ("vit_large", 256), ("vit_huge", 128),
                                             ("vit_huge", 256)]
                for d in (torch.bfloat16, torch.float32)]
    # The 1-thread rows compare every implementation on one core: on a shared machine, multi-threaded
    # timings also measure how long a parallel region waits for a descheduled thread.
    cases = [("vit_base", 128, torch.float32, None), ("vit_base", 128, torch.float32, 1)]
    if not quick:
        cases += [("vit_large", 64, torch.float32, None), ("vit_huge", 64, torch.float32, None)]
    return cases


class _threads:
    def __init__(self, n: Optional[int]):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


class _Timer:
    """Collects the implementations of one case, then `flush()` times them against each other
    (`time_fns`: turns, best turn) into rows; a failing one becomes a row with the reason."""

    def __init__(self, rows: list[Row], case: str, device: torch.device, nbytes: float, baseline: str,
                 config: dict, quick: bool, progress: Callable[[str], None], headline: bool = False):
        self.rows, self.case, self.device, self.nbytes = rows, case, device, nbytes
        self.baseline, self.config, self.quick, self.progress = baseline, config, quick, progress
        self.headline = headline  # the report's headline compares ours with the baseline on this case
        self.pending: list[tuple[str, Optional[Callable[[], object]], str, str]] = []

    def __call__(self, impl: str, fn: Optional[Callable[[], object]], why: str = "", note: str = "",
                 check: Optional[Callable[[object], Optional[str]]] = None) -> None:
        if fn is not None and check is not None:
            try:
                problem = check(fn())
            except Exception as exc:
                fn, why = None, f"failed: {exc.__class__.__name__}: {exc}"[:200]
            else:
                if problem:
                    fn, why = None, f"MISMATCH: {problem}"
        self.pending.append((impl, fn, why, note))

    def _row(self, impl: str, ms: Optional[float], note: str) -> Row:
        if ms is None:
            return Row(SUITE, self.case, impl, None, self.nbytes, note=note, config=self.config)
        return Row(SUITE, self.case, impl, ms, self.nbytes, baseline=self.baseline, note=note, config=self.config,
                   headline=self.headline)

    def flush(self) -> None:
        runnable = {impl: fn for impl, fn, _, _ in self.pending if fn is not None}
        self.progress(f"gather | {self.case} | {', '.join(runnable) or 'nothing to time'}")
        timed = time_fns(runnable, self.device, budget_s=0.5 if self.quick else 1.5)
        for impl, fn, why, note in self.pending:
            ms = timed.get(impl)
            if fn is None:
                self.rows.append(self._row(impl, None, why))
            elif isinstance(ms, BaseException):
                self.rows.append(self._row(impl, None, f"failed: {ms.__class__.__name__}: {ms}"[:200]))
            else:
                self.rows.append(self._row(impl, ms, note))
        self.pending = []


def _close(want: torch.Tensor, tol: float) -> Callable[[object], Optional[str]]:
    def check(got) -> Optional[str]:
        err = float((got.float() - want.float()).abs().max()) if got.numel() else 0.0
        return None if err <= tol else f"max abs error {err:.3g} vs the reference"
    return check


def _pool_off(fn: Callable[[], object]) -> Callable[[], object]:
    from iwm_kernels.gather import native

    def run():
        old = native.set_output_pool_limit(0)
        try:
            return fn()
        finally:
            native.set_output_pool_limit(old)
    return run


def gather_cases(device: torch.device, quick: bool, progress: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    ours = our_backends(device)
    for vit, batch, dtype, threads in configs(device, quick):
        with _threads(threads):
            rows += _gather_config(device, quick, progress, ours, vit, batch, dtype, threads)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _gather_config(device, quick, progress, ours, vit, batch, dtype, threads) -> list[Row]:
    rows: list[Row] = []
    cfg = VITS[vit]
    n, dim, grid = cfg.num_patches, cfg.dim, cfg.grid
    es = torch.empty((), dtype=dtype).element_size()
    dname = str(dtype).replace("torch.", "") + (f", {threads} thread" if threads else "")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    masks = MultiBlockMaskSampler(grid, context_mode="block", seed=0).sample(batch, step=0).to(device)
    masks_enc, _ = masks.to_ijepa()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, n, dim, device=device, generator=gen).to(dtype)
    pos = torch.randn(n, dim, device=device, generator=gen).to(dtype)
    bias = torch.randn(batch, dim, device=device, generator=gen).to(dtype)
    base = {"vit": vit, "batch": batch, "dtype": str(dtype), "N": n, "D": dim,
            "threads": threads or (torch.get_num_threads() if device.type == "cpu" else None)}

    # 1. context gather, I-JEPA's rectangular form
    enc = masks_enc[0]
    k = enc.shape[1]
    case = f"{vit} b{batch} {dname}: context gather [B, K={k}]"
    headline = vit == "vit_base" and batch == 128 and not threads
    time_case = _Timer(rows, case, device, 2.0 * batch * k * dim * es + batch * k * 4, APPLY_MASKS,
                       dict(base, K=k, rows=batch * k), quick, progress, headline)
    want = ijepa_apply_masks(x, masks_enc)
    time_case(APPLY_MASKS, lambda: ijepa_apply_masks(x, masks_enc))
    b_idx = torch.arange(batch, device=device)[:, None]
    time_case("advanced indexing x[b, idx]", lambda: x[b_idx, enc])
    flat = (enc + b_idx * n).reshape(-1)
    x_flat = x.reshape(batch * n, dim)
    time_case("index_select on flattened tokens", lambda: x_flat.index_select(0, flat).view(batch, k, dim))
    enc32 = enc.to(torch.int32)
    for backend, why in ours.items():
        run = (lambda b=backend: iwm_kernels.gather_tokens(x, enc32, backend=b)) if not why else None
        time_case(f"ours gather_tokens ({backend})", run, why, check=_close(want, 0.0))
        run_am = (lambda b=backend: iwm_kernels.apply_masks(x, masks_enc, backend=b)) if not why else None
        time_case(f"ours apply_masks ({backend})", run_am, why, check=_close(want, 0.0))
        if device.type == "cuda" and not why:  # the value checks cost a device sync: show it
            time_case(f"ours gather_tokens ({backend}, check_values=False)",
                      lambda b=backend: iwm_kernels.gather_tokens(x, enc32, backend=b, check_values=False),
                      note="no host round trip (values clamped on the device)", check=_close(want, 0.0))
    time_case.flush()

    # 2. context gather, ragged (packed, nothing truncated)
    total = masks.context_index.numel()
    case = f"{vit} b{batch} {dname}: ragged context gather [T={total}]"
    lengths = masks.context_lengths().long()
    row_sample = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
    tokens = masks.context_index.long()
    baseline = "advanced indexing x[rows, idx] (packed)"
    time_case = _Timer(rows, case, device, 2.0 * total * dim * es + total * 4, baseline,
                       dict(base, T=total), quick, progress)
    want = x[row_sample, tokens]
    time_case(baseline, lambda: x[row_sample, tokens])
    for backend, why in ours.items():
        run = (lambda b=backend: iwm_kernels.gather_tokens(x, masks.context_index, masks.context_cu, backend=b)
               ) if not why else None
        time_case(f"ours gather_tokens ({backend})", run, why, check=_close(want, 0.0))
    time_case.flush()

    # 3. fused targets: gather + pos + bias + layer_norm over the packed target blocks
    total = masks.target_index.numel()
    cu = masks.target_cu_per_sample
    row_sample = torch.repeat_interleave(torch.arange(batch, device=device), (cu[1:] - cu[:-1]).long())
    tokens = masks.target_index.long()
    case = f"{vit} b{batch} {dname}: targets gather+pos+bias+norm [T={total}]"
    time_case = _Timer(rows, case, device, 3.0 * total * dim * es + batch * dim * es + total * 4, EAGER,
                       dict(base, T=total), quick, progress, headline)
    want = reference.gather_tokens(x, masks.target_index, cu, pos=pos, bias=bias, normalize=True)
    time_case(EAGER, lambda: eager_sequence(x, row_sample, tokens, pos, bias))
    compiled, why = try_compile(eager_sequence, dynamic=False)
    time_case("torch.compile(eager sequence)",
              (lambda: compiled(x, row_sample, tokens, pos, bias)) if compiled else None, why)
    for backend, why in ours.items():
        run = (lambda b=backend: iwm_kernels.gather_tokens(x, masks.target_index, cu, pos=pos, bias=bias,
                                                           normalize=True, backend=b)) if not why else None
        time_case(f"ours gather_tokens fused ({backend})", run, why, check=_close(want, tol * 4))
        if device.type == "cuda" and not why:
            time_case(f"ours gather_tokens fused ({backend}, check_values=False)",
                      lambda b=backend: iwm_kernels.gather_tokens(x, masks.target_index, cu, pos=pos, bias=bias,
                                                                  normalize=True, backend=b, check_values=False),
                      note="no host round trip (values clamped on the device)", check=_close(want, tol * 4))
        if backend == "native" and not why and total * dim * es >= 32 << 20:
            time_case("ours gather_tokens fused (native, output pool off)", _pool_off(run),
                      note="outputs of 32 MB and more page-fault on every call without the pool")
    time_case.flush()

    # 4. forward + backward of the context gather
    if (vit == "vit_base" or not quick) and not threads:
        case = f"{vit} b{batch} {dname}: context gather forward+backward [B, K={k}]"
        nbytes = 3.0 * batch * k * dim * es + batch * n * dim * es + 2 * batch * k * 4
        time_case = _Timer(rows, case, device, nbytes, APPLY_MASKS + " fwd+bwd",
                           dict(base, K=k), quick, progress)
        xg = x.detach().clone().requires_grad_()
        grad = torch.randn(batch, k, dim, device=device, generator=gen).to(dtype)

        def fwd_bwd(fn):
            def run():
                xg.grad = None
                fn().backward(grad)
                return xg.grad
            return run

        time_case(APPLY_MASKS + " fwd+bwd", fwd_bwd(lambda: ijepa_apply_masks(xg, masks_enc)))
        for backend, why in ours.items():
            run = fwd_bwd(lambda b=backend: iwm_kernels.gather_tokens(xg, enc32, backend=b)) if not why else None
            time_case(f"ours gather_tokens fwd+bwd ({backend})", run, why)
        time_case.flush()
    return rows


def sampler_cases(quick: bool, progress: Callable[[str], None]) -> list[Row]:
    rows: list[Row] = []
    cpu = torch.device("cpu")
    grids = [14] if quick else [14, 16]
    for grid in grids:
        case = f"mask sampler b256, {grid}x{grid} grid (4 targets + context), CPU"
        time_case = _Timer(rows, case, cpu, None, COLLATOR, {"batch": 256, "grid": grid}, quick, progress)
        collator = IJEPAMaskCollator(grid, seed=0)
        steps = iter(range(10**9))
        time_case(COLLATOR, lambda: collator.sample(256, next(steps)), note="I-JEPA's block context, truncated")
        for mode in ("block", "complement"):
            sampler = MultiBlockMaskSampler(grid, context_mode=mode, seed=0)
            time_case(f"ours MultiBlockMaskSampler ({mode})", lambda s=sampler: s.sample(256, next(steps)),
                      note="ragged, nothing truncated")
        time_case.flush()
    return rows


def run(device: torch.device, quick: bool, progress: Callable[[str], None] = print) -> list[Row]:
    return gather_cases(device, quick, progress) + sampler_cases(quick, progress)


def headline(rounds: int = 15, threads: Optional[int] = None) -> dict[str, float]:
    """The three CPU targets of the gather issue, timed interleaved (each round runs every
    implementation once) and reported as best-of-rounds, which a busy shared machine disturbs least:
    gather vs I-JEPA apply_masks (ViT-B/16, batch 128), fused gather+pos+bias+norm vs its eager
    sequence, and the sampler vs I-JEPA's collator (batch 256, 14x14)."""
    import time

    cfg = VITS["vit_base"]
    masks = MultiBlockMaskSampler(cfg.grid, context_mode="block", seed=0).sample(128, 0)
    masks_enc, _ = masks.to_ijepa()
    enc32 = masks_enc[0].to(torch.int32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, cfg.num_patches, cfg.dim, generator=gen)
    pos = torch.randn(cfg.num_patches, cfg.dim, generator=gen)
    bias = torch.randn(128, cfg.dim, generator=gen)
    cu = masks.target_cu_per_sample
    rows = torch.repeat_interleave(torch.arange(128), (cu[1:] - cu[:-1]).long())
    tokens = masks.target_index.long()
    flat = (masks_enc[0] + torch.arange(128)[:, None] * cfg.num_patches).reshape(-1)
    x_flat = x.reshape(-1, cfg.dim)
    collator, sampler = IJEPAMaskCollator(14), MultiBlockMaskSampler(14, context_mode="block")
    steps = iter(range(10**9))
    fns = {
        "apply_masks": lambda: ijepa_apply_masks(x, masks_enc),
        "index_select": lambda: x_flat.index_select(0, flat),
        "ours": lambda: iwm_kernels.gather_tokens(x, enc32, backend="native"),
        "eager_fused": lambda: eager_sequence(x, rows, tokens, pos, bias),
        "ours_fused": lambda: iwm_kernels.gather_tokens(x, masks.target_index, cu, pos=pos, bias=bias,
                                                        normalize=True, backend="native"),
        "collator": lambda: collator.sample(256, next(steps)),
        "sampler": lambda: sampler.sample(256, next(steps)),
    }
    best = {k: float("inf") for k in fns}
    with _threads(threads):
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    ratios = {"gather vs apply_masks": best["apply_masks"] / best["ours"],
              "index_select vs apply_masks": best["apply_masks"] / best["index_select"],
              "fused vs eager sequence": best["eager_fused"] / best["ours_fused"],
              "sampler vs I-JEPA collator": best["collator"] / best["sampler"]}
    return {**{f"{k} ms": v for k, v in best.items()}, **ratios}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.suites.gather",
                                     description="CPU headline ratios of the gather issue (best of interleaved rounds)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    print(f"threads: {args.threads or torch.get_num_threads()}")
    for key, value in headline(args.rounds, args.threads).items():
        print(f"{key:36s} {value:9.2f}{'' if key.endswith('ms') else '×'}")

"""Runs the evaluations on a model and writes `eval-step<N>.json` (+ the MRR rank histogram PNG) into
the run folder. Used at the end of training, periodically (eval.every), and by `python -m iwm.eval`.

Each task's results are merged into eval-step<N>.json as soon as the task ends, so separate runs
(`--task mrr`, then `--task linear`) add up instead of overwriting each other, and a run stopped or
killed half-way keeps what it finished."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config
from . import TASKS

PROBE_TRAIN_PER_CLASS = 40
PROBE_VAL_PER_CLASS = 12


def normalizer(mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    def normalize(images: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - m) / s
    return normalize


def _stack(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return torch.stack([s.image for s in samples]), torch.tensor([s.label for s in samples])


def probe_sets(cfg: Config, size: int, seed: int = 0):
    """(train_images, train_labels, val_images, val_labels), uint8 [n, 3, size, size].

    builtin: label = source photograph; train crops from each photograph's training region, val crops
    from its held-out strip. imagefolder: data.image_folder (train) and data.val_folder, centre crops,
    decoded as data.decode says (gpu: draft, since the crops are stacked on the host).
    """
    from ..data import BuiltinPhotos, ImageFolderDataset

    d = cfg.data
    if d.dataset == "builtin":
        classes = len(BuiltinPhotos(size, 1).photos)
        train = BuiltinPhotos(size, classes * PROBE_TRAIN_PER_CLASS, split="train", seed=seed + 1000)
        val = BuiltinPhotos(size, classes * PROBE_VAL_PER_CLASS, split="val", seed=seed + 2000)
        return (*_stack(train, range(len(train))), *_stack(val, range(len(val))))
    root = Path(d.root_path) if d.root_path else Path(".")
    if not d.val_folder:
        raise ValueError("data.val_folder: the linear probe on an ImageFolder dataset needs a labelled val split")
    # The training run's decode path (data.decode), except gpu: these crops are stacked here on the host,
    # where a gpu-mode sample carries only its bytes; draft decodes those on the CPU instead.
    decode = "draft" if d.decode == "gpu" else d.decode
    train = ImageFolderDataset(root / d.image_folder, size, random_crops=False, decode=decode)
    val = ImageFolderDataset(root / d.val_folder, size, random_crops=False, decode=decode)
    gen = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(train), generator=gen)[:min(len(train), 20000)].tolist()
    va = torch.randperm(len(val), generator=gen)[:min(len(val), 5000)].tolist()
    return (*_stack(train, tr), *_stack(val, va))




@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`.lock for a read-merge-write: two evaluations of one checkpoint that
    finish at the same moment must not lose one another's results."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one evaluation at a time is the caller's business
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def merge_results(path: str | Path, results: dict) -> dict:
    """Merge `results` into the JSON object at `path` (created if absent) and write it back atomically
    (temporary file, fsync, rename): a reader or a kill sees the old file or the new one, never half.
    A file that is not a JSON object (torn by a crash of an older version, say) is replaced."""
    path = Path(path)
    with _locked(path):
        merged: dict = {}
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict):
                merged = old
        except (OSError, ValueError):
            pass
        merged.update(results)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(merged, indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return merged


def run_evaluations(model, cfg: Config, device: torch.device, folder: str | Path, *, step: int,
                    tasks: Optional[list[str]] = None, log: Callable = print,
                    backend: Optional[str] = None, stop: Optional[Callable[[], Optional[str]]] = None) -> dict:
    """Run `tasks` (default cfg.eval.tasks) in order; returns this call's results.

    `stop` is polled before each task: when it returns a reason (a signal's name), the remaining tasks
    are skipped and the results carry `interrupted_by`. A task is not cut short: it is minutes at most
    and its result is worth keeping, and one that dies half-way has nothing to keep."""
    from ..builders import augment_config, build_mask_sampler
    from ..models import IWM
    from .linear_probe import extract_features, fit_linear_probe
    from .mrr import evaluate_mrr, plot_rank_histogram
    from .predictor_finetune import finetune_predictor

    tasks = list(tasks if tasks is not None else cfg.eval.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:  # before any work, not after the first task's minutes
        raise ValueError(f"tasks: unknown evaluation(s) {unknown} (known: {', '.join(TASKS)})")
    folder = Path(folder)
    out_path = folder / f"eval-step{step}.json"
    folder.mkdir(parents=True, exist_ok=True)
    size = model.encoder.img_size
    aug_cfg = augment_config(cfg)
    normalize = normalizer(aug_cfg.mean, aug_cfg.std)
    results: dict = {"step": step}
    probe = None
    seed = cfg.meta.seed
    random_model = None

    def random_init():
        nonlocal random_model
        if random_model is None:
            torch.manual_seed(seed + 12345)
            random_model = IWM.from_preset(model.preset if hasattr(model, "preset") else "tiny").to(device)
        return random_model

    for i, task in enumerate(tasks):
        reason = stop() if stop is not None else None
        if reason:
            results["interrupted_by"] = reason
            log(f"eval: {reason} received: stopping before {task!r}; finished: {tasks[:i] or 'none'}, "
                f"skipped: {tasks[i:]}; results so far in {out_path}")
            break
        t0 = time.time()
        if task in ("linear", "predictor") and probe is None:
            probe = probe_sets(cfg, size, seed)
        if task == "mrr":
            _, _, val_images, _ = probe if probe is not None else probe_sets(cfg, size, seed)
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(val_images), generator=gen)[:cfg.eval.mrr_images]
            res = evaluate_mrr(model, val_images[pick], aug_cfg, build_mask_sampler(cfg, seed + 777),
                               num_candidates=cfg.eval.mrr_candidates, seed=seed, backend=backend)
            results.update(res.as_dict())
            plot_rank_histogram(res, folder / f"mrr-step{step}.png")
            log(f"eval: MRR {res.mrr:.3f} (chance {res.chance:.3f}) top-1 {res.top1:.3f} top-5 {res.top5:.3f} "
                f"over {res.num_images} images x {res.num_candidates} candidates [{time.time() - t0:.0f}s]")
        elif task == "linear":
            tr_x, tr_y, va_x, va_y = probe
            feats = [extract_features(model.target_encoder, x, normalize) for x in (tr_x, va_x)]
            res = fit_linear_probe(feats[0], tr_y, feats[1], va_y, epochs=cfg.eval.probe_epochs, seed=seed)
            rnd = random_init()
            feats_r = [extract_features(rnd.target_encoder, x, normalize) for x in (tr_x, va_x)]
            floor = fit_linear_probe(feats_r[0], tr_y, feats_r[1], va_y, epochs=cfg.eval.probe_epochs, seed=seed)
            results.update(res.as_dict("linear_"))
            results.update(floor.as_dict("linear_random_init_"))
            log(f"eval: linear probe top-1 {res.top1:.3f} top-5 {res.top5:.3f} ({res.num_classes} classes; "
                f"random-init encoder {floor.top1:.3f} / {floor.top5:.3f}) [{time.time() - t0:.0f}s]")
        elif task == "predictor":
            tr_x, tr_y, va_x, va_y = probe
            res = finetune_predictor(model.target_encoder, model.predictor, tr_x, tr_y, va_x, va_y, normalize,
                                     epochs=cfg.eval.predictor_epochs, seed=seed, backend=backend)
            rnd = random_init()
            floor = finetune_predictor(model.target_encoder, rnd.predictor, tr_x, tr_y, va_x, va_y, normalize,
                                       epochs=cfg.eval.predictor_epochs, seed=seed, backend=backend)
            results.update(res.as_dict("predictor_"))
            results.update(floor.as_dict("predictor_random_init_"))
            log(f"eval: predictor finetune top-1 {res.top1:.3f} top-5 {res.top5:.3f} "
                f"(random-init predictor {floor.top1:.3f}) [{time.time() - t0:.0f}s]")
        merge_results(out_path, results)
    return results

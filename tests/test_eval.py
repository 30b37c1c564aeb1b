"""Evaluations on known cases, and every evaluation end to end on a tiny model; result files and
stop signals during an evaluation."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iwm.config import load_config
from iwm.eval.linear_probe import fit_linear_probe
from iwm.eval.mrr import chance_mrr, pairwise_sq_distances, ranks_from_distances, summarize

ROOT = Path(__file__).resolve().parents[1]


def test_perfect_predictor_gets_mrr_one(seed):
    targets = torch.randn(3, 16, 5, 8)  # images, K candidates, positions, dim
    ranks = torch.stack([ranks_from_distances(pairwise_sq_distances(t, t)) for t in targets])
    res = summarize(ranks, 16)
    assert res.mrr == 1.0 and res.top1 == 1.0


def test_constant_predictor_gets_chance_exactly(seed):
    k = 32
    targets = torch.randn(k, 4, 8)
    pred = torch.randn(1, 4, 8).expand(k, -1, -1)
    res = summarize(ranks_from_distances(pairwise_sq_distances(pred, targets))[None], k)
    assert res.mrr == pytest.approx(chance_mrr(k), abs=1e-12)
    assert sorted(res.ranks) == list(range(1, k + 1))


def test_ties_break_deterministically_by_index():
    dist = torch.zeros(4, 4)
    assert ranks_from_distances(dist).tolist() == [1, 2, 3, 4]
    dist = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert ranks_from_distances(dist).tolist() == [1, 2]


def test_noisy_predictor_is_between_chance_and_one(seed):
    """Noise large enough that some predictions rank a wrong candidate first (at 0.3 every rank was 1)."""
    k = 64
    targets = torch.randn(k, 4, 8)
    pred = targets + 2.0 * torch.randn_like(targets)
    res = summarize(ranks_from_distances(pairwise_sq_distances(pred, targets))[None], k)
    # Independently: rank of the true candidate = 1 + how many candidates are strictly closer (no ties
    # with continuous noise), from the distances of each prediction to every candidate.
    ranks = []
    for i in range(k):
        d = [float(((pred[i].double() - targets[j].double()) ** 2).mean()) for j in range(k)]
        ranks.append(1 + sum(dj < d[i] for dj in d))
    assert res.ranks == ranks
    assert res.mrr == pytest.approx(sum(1 / r for r in ranks) / k, rel=1e-12)
    assert chance_mrr(k) < res.mrr < 1.0


def test_distances_match_direct_computation(seed):
    p, t = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    # The reference is computed in float64 too, so the tolerance tests the formula, not fp32 rounding.
    want = ((p.double()[:, None] - t.double()[None]) ** 2).mean(dim=(2, 3))
    torch.testing.assert_close(pairwise_sq_distances(p, t), want, atol=1e-9, rtol=1e-9)


def test_linear_probe_separable_and_noise(seed):
    gen = torch.Generator().manual_seed(seed)
    classes, d = 5, 16
    centers = 10 * torch.randn(classes, d, generator=gen)
    y_tr, y_va = torch.randint(classes, (400,), generator=gen), torch.randint(classes, (200,), generator=gen)
    x_tr = centers[y_tr] + torch.randn(400, d, generator=gen)
    x_va = centers[y_va] + torch.randn(200, d, generator=gen)
    assert fit_linear_probe(x_tr, y_tr, x_va, y_va, epochs=100).top1 > 0.97
    noise = fit_linear_probe(torch.randn(400, d, generator=gen), y_tr, torch.randn(200, d, generator=gen), y_va,
                             epochs=100)
    assert abs(noise.top1 - 1 / classes) < 0.12
    with pytest.raises(ValueError, match="train_x, val_x"):
        fit_linear_probe(x_tr, y_tr, x_va[:, :3], y_va)


TINY_EVAL = ["data.crop_size=32", "mask.patch_size=8", "mask.min_keep=2", "eval.mrr_images=2",
             "eval.mrr_candidates=16", "eval.probe_epochs=20", "eval.predictor_epochs=1"]


def tiny_model(seed):
    from iwm.models import IWM

    torch.manual_seed(seed)
    return IWM.from_preset("tiny", img_size=32, encoder_depth=2, pred_depth=1)


@pytest.mark.slow
def test_every_evaluation_end_to_end_on_a_tiny_model(tmp_path, seed):
    """The runner's numbers are the evaluation functions' numbers on the runner's inputs (the target
    encoder, the probe sets, the normalisation), recomputed here independently of the runner."""
    from iwm.eval.linear_probe import extract_features
    from iwm.eval.mrr import evaluate_mrr
    from iwm.eval.predictor_finetune import finetune_predictor
    from iwm.eval.runner import normalizer, probe_sets, run_evaluations
    from iwm.builders import augment_config, build_mask_sampler

    cfg = load_config(None, TINY_EVAL + [f"meta.seed={seed % 1000}"])
    model = tiny_model(seed)
    res = run_evaluations(model, cfg, torch.device("cpu"), tmp_path, step=0, tasks=["mrr", "linear", "predictor"],
                          log=lambda *a: None)
    s = cfg.meta.seed
    tr_x, tr_y, va_x, va_y = probe_sets(cfg, 32, s)
    aug_cfg = augment_config(cfg)
    normalize = normalizer(aug_cfg.mean, aug_cfg.std)
    pick = torch.randperm(len(va_x), generator=torch.Generator().manual_seed(s))[:2]
    mrr = evaluate_mrr(model, va_x[pick], aug_cfg, build_mask_sampler(cfg, s + 777), num_candidates=16, seed=s)
    assert res["mrr"] == mrr.mrr and 0 < res["mrr"] <= 1 and res["mrr_chance"] == pytest.approx(chance_mrr(16))
    feats = [extract_features(model.target_encoder, x, normalize) for x in (tr_x, va_x)]
    linear = fit_linear_probe(feats[0], tr_y, feats[1], va_y, epochs=20, seed=s)
    assert res["linear_top1"] == linear.top1 and res["linear_top5"] == linear.top5
    assert res["linear_num_classes"] == int(tr_y.max()) + 1 and "linear_random_init_top1" in res
    pred = finetune_predictor(model.target_encoder, model.predictor, tr_x, tr_y, va_x, va_y, normalize, epochs=1,
                              seed=s)
    assert res["predictor_top1"] == pred.top1 and "predictor_random_init_top1" in res
    assert json.loads((tmp_path / "eval-step0.json").read_text()) == res
    assert (tmp_path / "mrr-step0.png").exists()


@pytest.mark.slow
def test_separate_task_runs_add_up_in_one_result_file(tmp_path, seed):
    """`--task mrr` then `--task linear` on one checkpoint: the second adds to eval-step<N>.json."""
    from iwm.eval.runner import run_evaluations

    cfg = load_config(None, TINY_EVAL)
    model = tiny_model(seed)
    first = run_evaluations(model, cfg, torch.device("cpu"), tmp_path, step=3, tasks=["mrr"], log=lambda *a: None)
    second = run_evaluations(model, cfg, torch.device("cpu"), tmp_path, step=3, tasks=["linear"],
                             log=lambda *a: None)
    saved = json.loads((tmp_path / "eval-step3.json").read_text())
    assert saved == {**first, **second} and "mrr" in saved and "linear_top1" in saved and saved["step"] == 3


def test_a_stop_request_ends_the_evaluation_after_the_running_task(tmp_path, seed):
    """The task that was running when the signal came is finished and on disk; the rest are skipped."""
    from iwm.eval.runner import run_evaluations

    cfg = load_config(None, TINY_EVAL)
    asked = []

    def stop():  # the signal arrives while the first task runs
        asked.append(len(asked))
        return "SIGTERM" if len(asked) > 1 else None

    res = run_evaluations(tiny_model(seed), cfg, torch.device("cpu"), tmp_path, step=5,
                          tasks=["mrr", "linear", "predictor"], log=lambda *a: None, stop=stop)
    assert res["interrupted_by"] == "SIGTERM" and "mrr" in res and "linear_top1" not in res
    saved = json.loads((tmp_path / "eval-step5.json").read_text())
    assert saved["mrr"] == res["mrr"] and "linear_top1" not in saved and "predictor_top1" not in saved


def test_result_merge_is_atomic_and_replaces_a_torn_file(tmp_path):
    from iwm.eval.runner import merge_results

    path = tmp_path / "eval-step1.json"
    path.write_text('{"step": 1, "mr')  # what an old non-atomic write left after a kill
    assert merge_results(path, {"step": 1, "linear_top1": 0.5}) == {"step": 1, "linear_top1": 0.5}
    assert merge_results(path, {"step": 1, "mrr": 0.25}) == {"step": 1, "linear_top1": 0.5, "mrr": 0.25}
    assert json.loads(path.read_text()) == {"step": 1, "linear_top1": 0.5, "mrr": 0.25}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["eval-step1.json"]


def test_unknown_task_is_refused_before_any_work(tmp_path, seed):
    from iwm.eval.runner import run_evaluations

    with pytest.raises(ValueError, match="tasks: unknown"):
        run_evaluations(tiny_model(seed), load_config(None, TINY_EVAL), torch.device("cpu"), tmp_path, step=0,
                        tasks=["mrr", "bogus"], log=lambda *a: None)
    assert not (tmp_path / "eval-step0.json").exists()


def _start(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sigterm_after(proc, text, timeout=300):
    """SIGTERM once a stdout line contains `text`; returns (stdout, stderr)."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(seen)[-3000:]
    out, err = proc.communicate(timeout=timeout)
    return "".join(seen) + out, err


TRAIN_EVAL = ["data.crop_size=32", "mask.patch_size=8", "data.batch_size=8", "data.builtin_samples=64",
              "data.num_workers=0", "logging.tensorboard=false", "meta.use_bfloat16=false", "mask.min_keep=2",
              "optimization.max_steps=2", "eval.at_end=true", "eval.tasks=[mrr,linear,predictor]",
              "eval.mrr_images=2", "eval.mrr_candidates=8", "eval.probe_epochs=5", "eval.predictor_epochs=1"]


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_cleanly_and_resumes_it(tmp_path):
    cmd = [sys.executable, "-m", "iwm.train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           f"logging.folder={tmp_path}", *TRAIN_EVAL]
    out, err = _sigterm_after(_start(cmd), "eval: MRR")
    assert "Traceback" not in err, err[-3000:]
    assert "received SIGTERM during the evaluation at step 2" in out, out[-3000:]
    saved = json.loads((tmp_path / "eval-step2.json").read_text())
    assert "mrr" in saved and "predictor_top1" not in saved  # finished tasks kept, the rest not run
    assert not (tmp_path / "evals.jsonl").exists() or not (tmp_path / "evals.jsonl").read_text().strip()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((tmp_path / "eval-step2.json").read_text())
    assert {"mrr", "linear_top1", "predictor_top1"} <= set(saved)
    evals = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and evals[0]["predictor_top1"] == saved["predictor_top1"]


@pytest.mark.slow
def test_sigterm_during_python_m_iwm_eval_keeps_finished_tasks(tmp_path):
    from iwm.train import Trainer

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"logging.folder={tmp_path}", *TRAIN_EVAL, "eval.at_end=false", "optimization.max_steps=1"])
    Trainer(cfg, log=lambda *a, **k: None).train()
    cmd = [sys.executable, "-m", "iwm.eval", "--checkpoint", str(tmp_path / "latest.pt"), "--device", "cpu"]
    proc = _start(cmd + ["--task", "mrr", "--task", "linear", "--task", "predictor"])
    out, err = _sigterm_after(proc, "eval: MRR")
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "evaluation stopped by SIGTERM" in err, err[-3000:]
    saved = json.loads((tmp_path / "eval-step1.json").read_text())
    assert "mrr" in saved and "predictor_top1" not in saved
    res = subprocess.run(cmd + ["--task", "predictor"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    merged = json.loads((tmp_path / "eval-step1.json").read_text())
    assert merged["mrr"] == saved["mrr"] and "predictor_top1" in merged  # added to, not overwritten


@pytest.mark.parametrize("decode,used", [("pil", "pil"), ("fast", "fast"), ("gpu", "draft")])
def test_probe_sets_decode_as_the_run_does(tmp_path, monkeypatch, decode, used):
    """An ImageFolder probe decodes with the run's data.decode (gpu, whose samples carry only bytes,
    decodes with draft on the host)."""
    from PIL import Image

    from iwm import data as data_module
    from iwm.eval.runner import probe_sets

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 200, 30) if cls == "a" else (200, 10, 30)).save(
                tmp_path / split / cls / "x.jpg")
    seen = []
    real = data_module.ImageFolderDataset

    def spy(*args, **kwargs):
        seen.append(kwargs.get("decode"))
        return real(*args, **kwargs)
    monkeypatch.setattr(data_module, "ImageFolderDataset", spy)
    cfg = load_config(None, ["data.dataset=imagefolder", f"data.root_path={tmp_path}", "data.image_folder=train",
                             "data.val_folder=val", f"data.decode={decode}"])
    tr_x, tr_y, va_x, va_y = probe_sets(cfg, 16)
    assert seen == [used, used]
    assert tr_x.shape == (2, 3, 16, 16) and tr_x.float().std() > 0 and sorted(va_y.tolist()) == [0, 1]

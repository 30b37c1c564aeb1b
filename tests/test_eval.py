"""Evaluations on known cases, and every evaluation end to end on a tiny model."""
import pytest
import torch

from iwm.config import load_config
from iwm.eval.linear_probe import fit_linear_probe
from iwm.eval.mrr import chance_mrr, pairwise_sq_distances, ranks_from_distances, summarize


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
    k = 64
    targets = torch.randn(k, 4, 8)
    res = summarize(ranks_from_distances(pairwise_sq_distances(targets + 0.3 * torch.randn_like(targets),
                                                               targets))[None], k)
    assert chance_mrr(k) < res.mrr < 1.0 or res.mrr == 1.0


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


@pytest.mark.slow
def test_every_evaluation_end_to_end_on_a_tiny_model(tmp_path):
    from iwm.eval.runner import run_evaluations
    from iwm.models import IWM

    cfg = load_config(None, ["data.crop_size=32", "mask.patch_size=8", "mask.min_keep=2", "eval.mrr_images=2",
                             "eval.mrr_candidates=16", "eval.probe_epochs=20", "eval.predictor_epochs=1"])
    model = IWM.from_preset("tiny", img_size=32, encoder_depth=2, pred_depth=1)
    res = run_evaluations(model, cfg, torch.device("cpu"), tmp_path, step=0, tasks=["mrr", "linear", "predictor"],
                          log=lambda *a: None)
    assert 0 < res["mrr"] <= 1 and res["mrr_chance"] == pytest.approx(chance_mrr(16))
    assert 0 <= res["linear_top1"] <= 1 and "linear_random_init_top1" in res
    assert 0 <= res["predictor_top1"] <= 1 and "predictor_random_init_top1" in res
    assert (tmp_path / "eval-step0.json").exists() and (tmp_path / "mrr-step0.png").exists()

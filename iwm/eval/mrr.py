"""World-model MRR: how well the predictor models the effect of a transformation.

For each held-out image: draw K candidate photometric transformations; encode each transformed image
once with the target encoder; from the clean image's context latents, predict the target-position
latents under the action of every candidate in ONE packed predictor call (the clean context repeated
K times, each copy with its own action); rank, for each candidate k, the true target latents among all K
by distance to the prediction. MRR = mean(1/rank); chance = H_K / K.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


def ranks_from_distances(dist: torch.Tensor) -> torch.Tensor:
    """dist[..., k, j]: distance of prediction k to candidate j's targets -> rank (1-based) of j == k.

    Ties are broken deterministically and pessimistically for nothing in particular: an equally distant
    candidate with a smaller index ranks ahead. So a constant predictor gets exactly the chance level.
    """
    if dist.shape[-1] != dist.shape[-2]:
        raise ValueError(f"dist: expected [..., K, K], got {tuple(dist.shape)}")
    k = dist.shape[-1]
    true = dist.diagonal(dim1=-2, dim2=-1)[..., :, None]                # [..., K, 1]
    idx = torch.arange(k, device=dist.device)
    closer = (dist < true).sum(-1)
    tied_before = ((dist == true) & (idx[None, :] < idx[:, None])).sum(-1)
    return 1 + closer + tied_before


def chance_mrr(k: int) -> float:
    """Expected MRR of a random ranking of K candidates: H_K / K."""
    return sum(1.0 / r for r in range(1, k + 1)) / k


@dataclass
class MRRResult:
    mrr: float
    chance: float
    top1: float
    top5: float
    num_images: int
    num_candidates: int
    ranks: list = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        return {"mrr": self.mrr, "mrr_chance": self.chance, "mrr_top1": self.top1, "mrr_top5": self.top5,
                "mrr_images": self.num_images, "mrr_candidates": self.num_candidates}


def summarize(ranks: torch.Tensor, k: int) -> MRRResult:
    r = ranks.reshape(-1).double()
    return MRRResult(mrr=float((1.0 / r).mean()), chance=chance_mrr(k), top1=float((r <= 1).double().mean()),
                     top5=float((r <= 5).double().mean()), num_images=int(ranks.shape[0]) if ranks.dim() > 1 else 1,
                     num_candidates=k, ranks=ranks.reshape(-1).tolist())


def pairwise_sq_distances(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """pred [K, T, D], targets [K, T, D] -> [K, K]: mean squared distance over positions and channels."""
    p = pred.flatten(1).double()
    t = targets.flatten(1).double()
    d = (p * p).sum(1)[:, None] + (t * t).sum(1)[None, :] - 2.0 * p @ t.T
    return d.clamp_min_(0) / pred[0].numel()


def plot_rank_histogram(result: MRRResult, path, title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    k = result.num_candidates
    ax.hist(result.ranks, bins=min(64, k), range=(1, k + 1), color="tab:blue")
    ax.set_xlabel(f"rank of the true transformation among {k}")
    ax.set_ylabel("count")
    ax.set_title(title or f"MRR {result.mrr:.3f} (chance {result.chance:.3f}), top-1 {result.top1:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _repeat_masks(masks, k: int):
    """K identical samples of a one-sample MaskBatch (the same positions for every candidate)."""
    enc, pred = masks.to_ijepa()  # exact for one sample: nothing to truncate
    return type(masks).from_ijepa([enc[0].repeat(k, 1)], [p.repeat(k, 1) for p in pred], grid=masks.grid)


@torch.no_grad()
def evaluate_mrr(model, images: torch.Tensor, aug_cfg, mask_sampler, *, num_candidates: int = 256, seed: int = 0,
                 chunk: int = 64, backend: Optional[str] = None) -> MRRResult:
    """MRR of `model`'s predictor as a world model on uint8 images [n, 3, S, S] (S = the model's size).

    Candidates: K target-view colour jitters (always applied, so no two candidates are the identity by
    construction); the source is the clean image (zero destructive flags), so a(x→y_k) is candidate k's
    jitter relative to identity. Target positions: one multi-block mask per image.
    """
    from iwm import augment as aug

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected uint8 [n, 3, S, S], got {tuple(images.shape)}")
    if num_candidates < 2:
        raise ValueError(f"num_candidates: need at least 2, got {num_candidates}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cand_cfg = replace(aug_cfg, jitter_p=1.0)
    all_ranks = []
    k = num_candidates
    for i in range(images.shape[0]):
        img = images[i:i + 1].to(device)
        drawn = aug.sample_view_params(k, cand_cfg, aug.generator_for_step(seed, i))
        clean = aug.ViewParams.identity(k, out_size=cand_cfg.out_size, solarize_threshold=cand_cfg.solarize_threshold)
        cand = aug.ViewParams(**{**clean.__dict__, "target_jitter": drawn.target_jitter,
                                 "target_jitter_applied": torch.ones(k, dtype=torch.bool)})
        action = aug.action_from_params(cand).to(device)
        source = aug.apply_view(img, clean.slice(0, 1), "source", cfg=cand_cfg, geometry=False, backend=backend)
        masks1 = mask_sampler.sample(1, i)
        masks = _repeat_masks(masks1, k).to(device)
        masks1 = masks1.to(device)
        context = model.encoder(source.float(), masks1.context_index, cu_seqlens=masks1.context_cu, backend=backend)
        context = context.repeat(k, 1)
        conditioning = model.predictor.conditioning
        pred = model.predictor(context, masks, action=None if conditioning == "none" else action, backend=backend)
        per_sample = masks.target_index.numel() // k
        targets = []
        for lo in range(0, k, chunk):  # encode each candidate once, in chunks to bound memory
            hi = min(k, lo + chunk)
            views = aug.apply_view(img.expand(hi - lo, -1, -1, -1), cand.slice(lo, hi), "target", cfg=cand_cfg,
                                   geometry=False, backend=backend)
            targets.append(model.targets(views.float(), masks.slice(lo, hi), backend))
        targets = torch.cat(targets).view(k, per_sample, -1)
        dist = pairwise_sq_distances(pred.view(k, per_sample, -1), targets)
        all_ranks.append(ranks_from_distances(dist).cpu())
    model.train(was_training)
    return summarize(torch.stack(all_ranks), k)

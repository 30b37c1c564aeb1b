"""World-model MRR (DESIGN.md §2, Evaluations).

For each held-out image: draw K candidate photometric transformations; encode each transformed image
once with the target encoder; from the clean image's context latents, predict the target-position
latents under the action of every candidate in ONE packed predictor call (the clean context repeated
K times, each copy with its own action); rank, for each candidate k, the true target latents among all K
by distance to the prediction. MRR = mean(1/rank); chance = H_K / K.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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

"""Fixed 2-D sin-cos positional embeddings (MAE / I-JEPA convention, no class token)."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    if dim % 2:
        raise ValueError(f"dim: must be even for sin-cos embeddings, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """[grid_h * grid_w, dim] float32, row-major over the grid, in I-JEPA's (and MAE's) channel layout:
    the first half encodes the column coordinate, the second half the row, so checkpoints transfer."""
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"dim: must be divisible by 4 for 2-D sin-cos embeddings, got {dim}")
    hh, ww = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], dim=1)
    return emb.to(torch.float32)

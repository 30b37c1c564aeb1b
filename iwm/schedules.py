"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

Being functions of the global step (not stateful iterators as in I-JEPA) makes resume exact: a resumed
run computes the same values from the saved step, with nothing else to restore.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    warmup_steps: int
    start_lr: float
    lr: float
    final_lr: float
    weight_decay: float
    final_weight_decay: float
    ema_start: float
    ema_end: float
    ipe_scale: float = 1.0

    def lr_at(self, step: int) -> float:
        """Linear warm-up from start_lr to lr, then cosine down to final_lr (I-JEPA's schedule)."""
        if step < self.warmup_steps:
            return self.start_lr + (self.lr - self.start_lr) * step / max(1, self.warmup_steps)
        span = max(1, int(self.ipe_scale * self.total_steps) - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def wd_at(self, step: int) -> float:
        """Cosine from weight_decay to final_weight_decay over the run."""
        progress = min(1.0, step / max(1, int(self.ipe_scale * self.total_steps)))
        return self.final_weight_decay + (self.weight_decay - self.final_weight_decay) * 0.5 * (
            1.0 + math.cos(math.pi * progress))

    def momentum_at(self, step: int) -> float:
        """Linear from ema_start to ema_end over the run."""
        progress = min(1.0, step / max(1, int(self.ipe_scale * self.total_steps)))
        return self.ema_start + (self.ema_end - self.ema_start) * progress


def apply_lr_wd(optimizer, lr: float, wd: float) -> None:
    """Set lr on every group and wd on groups that decay (I-JEPA: no decay for biases and norms)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("no_decay", False):
            group["weight_decay"] = wd

"""Linear warmup, then cosine, linear or warmup-stable-decay down to min_lr_ratio of the peak."""

import math
from functools import partial

import torch

from titan_mm.config import LRScheduler as LRSchedulerConfig


def lr_multiplier(step: int, *, cfg: LRSchedulerConfig, total_steps: int) -> float:
    """Multiplier of the peak LR used for optimizer step ``step + 1`` (LambdaLR counts from 0)."""
    step += 1
    if step <= cfg.warmup_steps:
        return step / (cfg.warmup_steps + 1)
    if cfg.decay_type == "wsd":
        decay_steps = max(1, round(cfg.decay_ratio * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step <= decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total_steps - decay_start)
    else:
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(progress, 1.0)
    if cfg.decay_type == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_lr_scheduler(cfg: LRSchedulerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, cfg=cfg, total_steps=total_steps))

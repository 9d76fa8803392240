"""The order of training data and the learning-rate schedule, both pure functions of the config and the
step (which is what makes resuming exact)."""

from __future__ import annotations

from typing import Any

import numpy as np


def batch_for_step(train_rows: list, step: int, size: int, seed: int) -> list:
    """The rows of step ``step`` (1-based): consecutive slices of a per-epoch shuffle. A pure function of
    (seed, step), which is what makes resuming exact."""
    n = len(train_rows)
    out = []
    for pos in range((step - 1) * size, step * size):
        epoch, index = divmod(pos, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(train_rows[order[index]])
    return out


def make_scheduler(optimizer, cfg: Any):
    """transformers' LR schedule from ``cfg.optim`` (schedule, warmup_steps) over ``cfg.max_steps``."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.optim.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=max(cfg.max_steps, 1))

"""What every recipe needs around its loop: run dirs (Hydra's or a default), resume lookup, device, seeds,
the data order and the LR schedule. One copy here, so `frugal train`, `train-prm`, `label-prm`, `eval` and
`plan` behave the same way."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from frugal.train.checkpoint import find_resume_checkpoint

log = logging.getLogger(__name__)


def hydra_run_dir() -> Optional[str]:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def default_run_dir(recipe: str, run_dir=None, output_dir: Optional[str] = None) -> Path:
    """``run_dir`` (a caller's), else ``output_dir`` (config), else Hydra's, else outputs/<recipe>/<date>/<time>."""
    return Path(run_dir or output_dir or hydra_run_dir() or Path("outputs") / recipe / time.strftime("%Y-%m-%d/%H-%M-%S"))


def resolve_run_dir(cfg: Any, run_dir, recipe: str) -> tuple[Path, Optional[Path]]:
    """The run dir and the checkpoint to resume from (``cfg.resume``: true/latest, a run dir or a step dir).
    Resuming continues writing into the resumed run."""
    default = default_run_dir(recipe, run_dir, getattr(cfg, "output_dir", None))
    resume_from = None
    if cfg.resume and str(cfg.resume).lower() not in ("false", "none", "null"):
        root = default.parent.parent  # `resume=true` searches the recipe's output root (<root>/<date>/<time>/...)
        resume_from = find_resume_checkpoint(cfg.resume, root)
        if resume_from is None:
            log.warning("resume=%s: no checkpoint found under %s; starting fresh", cfg.resume, root)
        else:
            return resume_from.parent.parent, resume_from
    default.mkdir(parents=True, exist_ok=True)
    return default, resume_from


def device_from(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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

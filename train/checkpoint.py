"""A training run's state on disk: ``<run>/checkpoints/step_<n>/`` holds the adapter, optimizer, scheduler,
RNG states and the loop state (step, data position, best metrics), written atomically and closed by a
manifest (:mod:`frugal.runtime.io`); finding and verifying checkpoints is :mod:`frugal.runtime.checkpoints`.
"""

from __future__ import annotations

import json
import shutil
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugal.runtime.checkpoints import CorruptCheckpoint, list_checkpoints
from frugal.runtime.io import atomic_dir, write_manifest

log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, loop_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step_<step>`` atomically (manifest last) and prune all but the newest ``keep``."""
    final = Path(run_dir) / "checkpoints" / f"step_{step}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=2))
        write_manifest(tmp)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the loop state. A file that fails to
    load raises :class:`CorruptCheckpoint` naming it."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = Path(path)

    def read(name: str, load):
        try:
            return load(path / name)
        except Exception as err:  # torch, safetensors and json each raise their own types
            raise CorruptCheckpoint(f"checkpoint {path}: cannot read {path / name}: {type(err).__name__}: "
                                    f"{err}") from err

    weights = read("adapter", lambda p: load_peft_weights(str(p), device=str(next(model.parameters()).device)))
    state = read("state.json", lambda p: json.loads(p.read_text()))
    optimizer_state = read("optimizer.pt", lambda p: torch.load(p, weights_only=False))
    scheduler_state = read("scheduler.pt", lambda p: torch.load(p, weights_only=False))
    rng = read("rng.pt", lambda p: torch.load(p, weights_only=False))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    set_rng_state(rng)
    return state

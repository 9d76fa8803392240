"""Atomic checkpoints: ``<run>/checkpoints/step_<n>/`` holds the adapter, optimizer, scheduler, RNG states
and the loop state (step, data position, best metrics).

A checkpoint is written into a hidden temporary folder and renamed into place, so a run killed at any
moment (SIGKILL included) leaves either the previous complete checkpoint or the new complete one, never
a torn one. Small files (json, jsonl rewrites) go through :func:`atomic_write_text` for the same reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_dir(target: Path):
    """Yield a hidden temporary folder beside ``target``; when the block ends without an error the folder
    replaces ``target`` in one rename, so a reader (or a resumed run) sees the old complete folder or the
    new complete one, never a torn one. On an error the temporary folder is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():  # e.g. re-saving the same step, a rebuilt cache, overwrite=true
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Write ``checkpoints/step_<step>`` atomically and prune all but the newest ``keep``."""
    final = Path(run_dir) / "checkpoints" / f"step_{step}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders start with '.' and are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(resume: str, output_root: Path) -> Optional[Path]:
    """``resume`` is ``true``/``latest`` (newest checkpoint of the newest run under ``output_root``), a run
    dir, or a ``step_<n>`` folder. Returns None when ``latest`` finds nothing (a fresh start)."""
    if str(resume).lower() in ("true", "latest"):
        runs = sorted((p.parent.parent for p in Path(output_root).glob("*/*/checkpoints/step_*")),
                      key=lambda run: max(c.stat().st_mtime for c in list_checkpoints(run)) if list_checkpoints(run) else 0)
        runs = [r for r in runs if list_checkpoints(r)]
        return list_checkpoints(runs[-1])[-1] if runs else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint or run directory")
    if STEP_DIR.match(path.name):
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"resume={resume}: {path} is not a complete checkpoint (no state.json)")
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(f"resume={resume}: {path} holds no checkpoints/step_<n> folder")
    return ckpts[-1]


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG; return the loop state."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = Path(path)
    weights = load_peft_weights(str(path / "adapter"), device=str(next(model.parameters()).device))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())

"""Atomic checkpoints: ``<run>/checkpoints/step_<n>/`` holds the adapter, optimizer, scheduler, RNG states
and the loop state (step, data position, best metrics).

A checkpoint is written into a hidden temporary folder and renamed into place, so a run killed at any
moment (SIGKILL included) leaves either the previous complete checkpoint or the new complete one, never
a torn one. Small files (json, jsonl rewrites) go through :func:`atomic_write_text` for the same reason.

Each checkpoint ends with ``manifest.json`` (every file's size and sha256), written last: a checkpoint
whose files were damaged after the rename (a full disk, a copy cut short, bit rot) fails
:func:`verify_checkpoint`, which names the bad file, and resuming falls back to the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
MANIFEST = "manifest.json"
REQUIRED = ("adapter", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")

log = logging.getLogger(__name__)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the checkpoint and the bad file."""


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``manifest.json``: size and sha256 of every file under ``folder``. Written last, so its presence
    says every other file was complete when it was written."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> list[str]:
    """Problems that make ``path`` unusable, each naming its file; [] for an intact checkpoint. A checkpoint
    from before manifests existed is checked for its required files only."""
    path = Path(path)
    problems = [f"{path / name}: missing" for name in REQUIRED if not (path / name).exists()]
    manifest = path / MANIFEST
    if not manifest.exists():
        return problems
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return problems + [f"{manifest}: unreadable ({err})"]
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
        elif sha256_file(file) != want["sha256"]:
            problems.append(f"{file}: contents changed since it was written (sha256 mismatch)")
    return problems


def newest_intact(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint`; each newer damaged one
    is reported in a warning that names the bad file. None when there is none."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(ckpt)
        if not problems:
            return ckpt
        log.warning("checkpoint %s is damaged and is skipped: %s", ckpt, "; ".join(problems))
    return None


def clean_temporary(run_dir: Path) -> list[Path]:
    """Remove what a killed write left in ``run_dir``: hidden temporary folders of :func:`atomic_dir`
    (``checkpoints/.step_<n>.*``, ``.final.*``) and temporary files of :func:`atomic_write_text`. Call it
    only while holding the run's lock (nobody else is writing there)."""
    run_dir = Path(run_dir)
    removed = []
    for parent in (run_dir, run_dir / "checkpoints"):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(".") and re.match(r"^\.(step_\d+|final|[\w.-]+\.(jsonl|json|yaml|txt))\.", p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                removed.append(p)
    if removed:
        log.warning("removed %d temporary file(s)/folder(s) left by a killed write in %s: %s", len(removed),
                    run_dir, ", ".join(p.name for p in removed))
    return removed


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders start with '.' and are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(resume: str, output_root: Path) -> Optional[Path]:
    """``resume`` is a run dir (its newest intact checkpoint) or a ``step_<n>`` folder; ``true``/``latest``
    means the one unfinished run (checkpoints, no ``summary.json``) under ``output_root``, and when several
    qualify it stops and lists them rather than guess (see :func:`unfinished_runs`). Returns None when
    ``latest`` finds nothing (a fresh start)."""
    if str(resume).lower() in ("true", "latest"):
        runs = unfinished_runs(output_root)
        if len(runs) > 1:
            listing = "\n".join(f"  {run}  (last checkpoint {list_checkpoints(run)[-1].name})" for run in runs)
            raise ValueError(f"resume={resume} is ambiguous: {len(runs)} unfinished runs under {output_root}:\n"
                             f"{listing}\nname the one to continue: resume=<run dir> (or output_dir=<run dir> "
                             "resume=true)")
        if not runs:
            return None
        log.info("resume=%s: continuing the only unfinished run under %s: %s", resume, output_root, runs[0])
        return _intact_or_raise(runs[0], resume)
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint or run directory")
    if STEP_DIR.match(path.name):
        problems = verify_checkpoint(path)
        if problems:
            raise CorruptCheckpoint(f"resume={resume}: {path} is not a complete checkpoint: {'; '.join(problems)}")
        return path
    if not list_checkpoints(path):
        raise FileNotFoundError(f"resume={resume}: {path} holds no checkpoints/step_<n> folder")
    return _intact_or_raise(path, resume)


def _intact_or_raise(run_dir: Path, resume: str) -> Path:
    found = newest_intact(run_dir)
    if found is None:
        raise CorruptCheckpoint(f"resume={resume}: every checkpoint of {run_dir} is damaged (see the warnings above)")
    return found


def unfinished_runs(output_root: Path) -> list[Path]:
    """Runs under ``output_root`` (``<root>/<date>/<time>/``) that have a checkpoint and no ``summary.json``
    (a finished run writes it last), oldest first. A finished run is never a candidate of ``resume=true``:
    continuing it would extend it and overwrite its ``final/`` and summary."""
    runs = {p.parent.parent for p in Path(output_root).glob("*/*/checkpoints/step_*")}
    runs = [r for r in runs if list_checkpoints(r) and not (r / "summary.json").exists()]
    return sorted(runs, key=lambda r: list_checkpoints(r)[-1].stat().st_mtime)


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

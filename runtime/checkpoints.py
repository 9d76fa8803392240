"""Finding and checking a run's checkpoints: ``<run>/checkpoints/step_<n>/`` folders written atomically
(:func:`frugal.runtime.io.atomic_dir`) and closed by a manifest (:func:`frugal.runtime.io.write_manifest`).

:func:`verify_checkpoint` names the damaged file of a checkpoint whose files changed after the rename (a
full disk, a copy cut short, bit rot); resuming then falls back to the newest intact one
(:func:`newest_intact`), and ``resume=true`` picks the one unfinished run (:func:`find_resume_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

from frugal.runtime.io import MANIFEST, sha256_file

STEP_DIR = re.compile(r"^step_(\d+)$")
# The files of a training checkpoint (a checkpoint from before manifests existed is checked for these).
REQUIRED = ("adapter", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")

log = logging.getLogger(__name__)


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the checkpoint and the bad file."""


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
        return intact_or_raise(runs[0], resume)
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
    return intact_or_raise(path, resume)


def intact_or_raise(run_dir: Path, resume: str) -> Path:
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

"""Atomic writes: a file or a folder is replaced in one rename, so a reader (or a resumed job) sees the old
complete version or the new complete one, never a torn one, whenever the writer is killed (SIGKILL
included). ``manifest.json`` (every file's size and sha256, written last) lets a reader tell a complete
folder from one damaged after the rename. JSONL logs (``metrics.jsonl``, ``samples.jsonl``) are read
back with :func:`read_jsonl` and cut back to a resumed step with :func:`truncate_after`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


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


def truncate_after(path: Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step`` (a resumed run redoes the later ones)."""
    if not Path(path).exists():
        return
    kept = [row for row in read_jsonl(path) if row["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log. A torn last line (the process was killed while appending it) is dropped
    with a warning; a bad line anywhere else is an error naming the file and line."""
    path = Path(path)
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == last:
                log.warning("%s line %d: dropping a torn last line (a write cut short by a kill): %r",
                            path, i + 1, line[:80])
                continue
            raise ValueError(f"{path} line {i + 1}: not valid JSON ({err.msg})") from None
    return rows

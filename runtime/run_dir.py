"""The run lifecycle every recipe shares: run dirs (Hydra's or a default), resume lookup, the run lock and
signal handling. One copy here, so `frugal train`, `train-prm`, `label-prm`, `eval` and `plan` behave the
same way.

Run directories. Hydra's pattern is ``outputs/<recipe>/<date>/<time>-<launch id>`` (the ``launch_id``
resolver, ``conf/__init__.py``): two runs started in the same second get two folders. A run holds
``<run>/.lock`` (its PID) while it writes; a second live process is refused, and the lock of a process
that died (SIGKILL, power loss) is taken over with a warning.

Signals. :func:`stop_on_signals` turns the first SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers
send before they kill) into a request the training loop reads between steps (:func:`stop_signal`): the
loop finishes the step in progress, saves a checkpoint of it, says where, and the recipe exits with
128 + the signal number. A second signal aborts at once (the newest checkpoint stays).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional


from frugal.conf import launch_id
from frugal.runtime.checkpoints import (intact_or_raise, clean_temporary, find_resume_checkpoint, list_checkpoints, verify_checkpoint)
from frugal.runtime.io import truncate_after

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


def hydra_run_dir() -> Optional[str]:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def default_run_dir(recipe: str, run_dir=None, output_dir: Optional[str] = None) -> Path:
    """``run_dir`` (a caller's), else ``output_dir`` (config), else Hydra's, else
    outputs/<recipe>/<date>/<time>-<launch id>."""
    return Path(run_dir or output_dir or hydra_run_dir()
                or Path("outputs") / recipe / f"{time.strftime('%Y-%m-%d/%H-%M-%S')}-{launch_id()}")


def _resume_value(cfg: Any) -> Optional[str]:
    value = getattr(cfg, "resume", None)
    if value is None or str(value).strip().lower() in ("", "false", "none", "null"):
        return None
    return str(value)


def resolve_run_dir(cfg: Any, run_dir, recipe: str) -> tuple[Path, Optional[Path]]:
    """The run dir and the checkpoint to resume from, the run dir locked (:func:`lock_run_dir`) and
    cleaned of a killed write's temporary files.

    * ``resume=<run dir>`` or ``resume=<run>/checkpoints/step_<n>``: exactly that run.
    * ``output_dir=<dir> resume=true``: exactly that run (its newest intact checkpoint; a fresh start in
      it, with a warning, when it has none).
    * ``resume=true`` alone: the one unfinished run under the recipe's output root; several: an error that
      lists them (it never guesses, and never continues a finished run).
    * no resume: a fresh run; a folder that already holds a run's metrics or checkpoints is refused rather
      than mixed into.
    """
    explicit = run_dir or getattr(cfg, "output_dir", None)
    default = default_run_dir(recipe, run_dir, getattr(cfg, "output_dir", None))
    resume = _resume_value(cfg)
    resume_from = None
    if resume is not None and resume.lower() not in ("true", "latest"):
        resume_from = find_resume_checkpoint(resume, default.parent.parent)
        target = resume_from.parent.parent
        if explicit and Path(explicit).resolve() != target.resolve():
            raise ValueError(f"output_dir={explicit} and resume={resume} name two different runs; "
                             f"pass one of them")
    elif resume is not None and explicit:
        target = Path(explicit)
        if list_checkpoints(target):
            resume_from = intact_or_raise(target, resume)
        else:
            log.warning("resume=%s: %s has no checkpoint; starting a fresh run there", resume, target)
    elif resume is not None:
        root = default.parent.parent  # the recipe's output root (<root>/<date>/<time>/...)
        resume_from = find_resume_checkpoint(resume, root)
        if resume_from is None:
            log.warning("resume=%s: no unfinished run with a checkpoint under %s; starting fresh", resume, root)
        target = resume_from.parent.parent if resume_from is not None else default
    else:
        target = default
    target.mkdir(parents=True, exist_ok=True)
    lock_run_dir(target)
    if resume_from is None and resume is not None:
        # Steps an earlier attempt logged before its first checkpoint are about to be redone.
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_after(target / name, 0)
    elif resume_from is None:
        earlier = [name for name in ("metrics.jsonl", "summary.json") if (target / name).exists()]
        earlier += [p.name for p in list_checkpoints(target)[-1:]]
        if earlier:
            release_lock(target)
            raise FileExistsError(f"{target} already holds a run ({', '.join(earlier)}): continue it with "
                                  f"resume={target}, or choose a new output_dir")
    clean_temporary(target)
    if resume_from is not None:
        set_aside_newer(target, resume_from)
    return target, resume_from


def set_aside_newer(run_dir: Path, resume_from: Path) -> None:
    """Rename the damaged checkpoints newer than ``resume_from`` (the ones the resume skipped) to
    ``damaged_step_<n>``: kept for inspection, but no longer what pruning keeps, export picks or the next
    resume tries."""
    step = int(resume_from.name.split("_")[1])
    for ckpt in list_checkpoints(run_dir):
        if int(ckpt.name.split("_")[1]) > step and verify_checkpoint(ckpt):
            aside = ckpt.with_name(f"damaged_{ckpt.name}")
            if aside.exists():
                shutil.rmtree(aside)
            ckpt.rename(aside)
            log.warning("set aside %s as %s (resuming from the older %s)", ckpt, aside.name, resume_from.name)


# ---------------------------------------------------------------------- the run lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def lock_run_dir(run_dir: Path) -> Path:
    """Take ``<run_dir>/.lock`` for this process (created exclusively, holding the PID and host). A lock
    held by another live process on this host is refused, naming it; a dead process's lock is taken over.
    Released at exit (:func:`release_lock`), so a killed run's lock is the only kind left behind."""
    path = Path(run_dir) / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            pid = holder.get("pid")
            if pid == os.getpid():
                return path  # this process already holds it (a second run() in the same process)
            if isinstance(pid, int) and holder.get("host", me["host"]) != me["host"]:
                raise RuntimeError(f"{run_dir} is locked by process {pid} on host {holder.get('host')} "
                                   f"({path}); if that run is gone, delete the lock file")
            if isinstance(pid, int) and _alive(pid):
                raise RuntimeError(f"{run_dir} is in use by another live run (PID {pid}, lock {path}); "
                                   "choose another output_dir, or wait for that run to end")
            log.warning("%s: taking over the lock of process %s, which is no longer running", run_dir, pid)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, Path(run_dir))
        return path
    raise RuntimeError(f"could not take the lock {path}")


def release_lock(run_dir: Path) -> None:
    """Remove ``<run_dir>/.lock`` if this process holds it."""
    path = Path(run_dir) / LOCK_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


# ---------------------------------------------------------------------- signals

class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int, checkpoint: Optional[Path] = None):
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


_requests: list[dict] = []  # one entry per active stop_on_signals block (innermost last)


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, the first SIGINT/SIGTERM is recorded (:func:`stop_signal`) instead of raising;
    a second one raises KeyboardInterrupt at once. Outside the main thread (signals cannot be caught
    there) the block changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    request: dict = {"signum": None}

    def handler(signum, frame):
        if request["signum"] is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        request["signum"] = signum
        print(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in signals}
    _requests.append(request)
    try:
        yield
    finally:
        _requests.remove(request)
        for s, h in previous.items():
            signal.signal(s, h)


def on_signals(fn: Callable) -> Callable:
    """Decorator: run ``fn`` inside :func:`stop_on_signals`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with stop_on_signals():
            return fn(*args, **kwargs)
    return wrapper


def stop_signal() -> Optional[int]:
    """The signal number received inside the innermost :func:`stop_on_signals` block, or None."""
    return _requests[-1]["signum"] if _requests else None


def interrupted(signum: int, step: int, checkpoint: Optional[Path], run_dir: Path, recipe: str) -> Interrupted:
    """The :class:`Interrupted` a loop raises after saving ``checkpoint`` (the last finished step)."""
    name = signal.Signals(signum).name
    where = f"checkpoint of step {step} saved to {checkpoint}" if checkpoint else "no step had finished; nothing saved"
    return Interrupted(f"{name}: training stopped after step {step}; {where}. Continue with: "
                       f"frugal {recipe} resume={run_dir}", 128 + signum, checkpoint)

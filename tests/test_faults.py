"""Fault drills for runs and checkpoints (issue 21, items 1-6): resume continues the run it is told to,
two runs never share a folder, damaged checkpoints are named and skipped, a torn metrics line is dropped,
SIGINT/SIGTERM save the last finished step, and export refuses an incomplete final/.

Each test fails on the code before the fix: see the comment at its top."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_train

from frugal.train.tracking import read_jsonl

FAST = TINY + ["eval_before=false", "eval_limit=2"]
def _bench_faults():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_faults", ROOT / "scripts" / "bench_faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two processes import, wait for each other, then start Hydra at the same whole second (the drill's script).
BARRIER = _bench_faults().BARRIER


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _cli(args, cwd=ROOT, **kw):
    return subprocess.Popen([sys.executable, "-m", "frugal.recipes.train", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step (trained once per module, copied per test)."""
    from frugal.recipes.train import run

    run_dir = tmp_path_factory.mktemp("runs") / "day" / "finished"
    run(compose_train(FAST + ["max_steps=3", "save_every=1", "keep_checkpoints=3"]), run_dir=run_dir)
    return run_dir


def _killed_copy(finished: Path, dest: Path) -> Path:
    """A copy of the finished run as a run killed right after step 3's checkpoint (no final/, no summary)."""
    shutil.copytree(finished, dest)
    shutil.rmtree(dest / "final")
    (dest / "summary.json").unlink()
    return dest


# ---------------------------------------------------------------------- 1. resume the named run

def test_resume_true_continues_the_run_named_by_output_dir(finished_run, tmp_path):
    # Before: resume=true searched the output root and continued the newest run (E), not D.
    from frugal.recipes.train import run
    from frugal.runtime.run_dir import resolve_run_dir
    from frugal.runtime.config import to_config

    root = tmp_path / "outputs" / "train"
    killed = _killed_copy(finished_run, root / "day" / "D")
    newer = root / "day" / "E"
    shutil.copytree(finished_run, newer)  # a finished run beside it, newer on disk
    for ckpt in (newer / "checkpoints").iterdir():
        os.utime(ckpt, (time.time() + 60, time.time() + 60))
    e_files = {p.name: p.read_bytes() for p in newer.iterdir() if p.is_file()}

    run(compose_train(FAST + ["max_steps=4", "save_every=1", "keep_checkpoints=3", "resume=true",
                              f"output_dir={killed}"]))
    assert _steps(killed) == [1, 2, 3, 4]
    assert (killed / "summary.json").exists() and (killed / "final").is_dir()
    assert {p.name: p.read_bytes() for p in newer.iterdir() if p.is_file()} == e_files, "run E was touched"

    # resume=true alone with two unfinished runs under the root: stop and list both
    _killed_copy(finished_run, root / "day" / "F")
    _killed_copy(finished_run, root / "day" / "G")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ValueError, match="ambiguous") as err:
            resolve_run_dir(to_config(compose_train(FAST + ["resume=true"])), None, "train")
    finally:
        os.chdir(cwd)
    assert "day/F" in str(err.value) and "day/G" in str(err.value) and "day/E" not in str(err.value)


# ---------------------------------------------------------------------- 2. one folder per run, locked

def test_two_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    # Before: both runs wrote outputs/train/<date>/<time>: every step twice in one metrics.jsonl.
    # Both processes import first, wait for each other, then start Hydra at the same whole second.
    (tmp_path / "barrier").mkdir()
    args = FAST + ["max_steps=2"]
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(tmp_path / "barrier"), *args], cwd=tmp_path,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    dirs = sorted(p.parent for p in tmp_path.glob("outputs/train/*/*/metrics.jsonl"))
    assert len(dirs) == 2, dirs
    # <date>/<HH-MM-SS>-<launch id>: the same second, two folders
    assert len({(d.parent.name, d.name.rsplit("-", 1)[0]) for d in dirs}) == 1, f"not the same second: {dirs}"
    for d in dirs:
        assert _steps(d) == [1, 2] and (d / "final").is_dir() and not (d / ".lock").exists()


def test_a_run_dir_in_use_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    # Before: no lock: a second run into the same output_dir wrote into the first one's files.
    from frugal.runtime.run_dir import lock_run_dir, release_lock

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename}))
        proc = _cli(FAST + ["max_steps=1", f"output_dir={tmp_path / 'busy'}"])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and f"PID {sleeper.pid}" in err and "in use" in err
        assert not (tmp_path / "busy" / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same lock, its process now dead: taken over
    lock_run_dir(tmp_path / "busy")
    assert json.loads((tmp_path / "busy" / ".lock").read_text())["pid"] == os.getpid()
    release_lock(tmp_path / "busy")
    assert not (tmp_path / "busy" / ".lock").exists()


# ---------------------------------------------------------------------- 3. damaged checkpoints

@pytest.mark.parametrize("damage", ["optimizer.pt", "adapter/adapter_model.safetensors", "state.json", "rng.pt"])
def test_damaged_checkpoint_is_named_and_skipped(finished_run, tmp_path, damage):
    # Before: a truncated file gave a raw torch/safetensors/JSON error naming no file, and no fallback.
    from frugal.runtime.checkpoints import newest_intact, verify_checkpoint

    run_dir = _killed_copy(finished_run, tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_3" / damage
    bad.write_bytes(b"" if damage == "rng.pt" else bad.read_bytes()[: bad.stat().st_size // 2])
    problems = verify_checkpoint(run_dir / "checkpoints" / "step_3")
    assert len(problems) == 1 and str(bad) in problems[0]
    assert newest_intact(run_dir) == run_dir / "checkpoints" / "step_2"


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_cleans_temp_folders(finished_run, tmp_path, caplog):
    from frugal.recipes.train import run

    run_dir = _killed_copy(finished_run, tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_3" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:100])
    leftover = run_dir / "checkpoints" / ".step_4.x1y2z3"  # a write killed mid-way
    (leftover / "adapter").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        run(compose_train(FAST + ["max_steps=4", "save_every=0", f"resume={run_dir}"]))
    assert str(bad) in caplog.text and "damaged" in caplog.text
    assert not leftover.exists()
    assert (run_dir / "checkpoints" / "damaged_step_3" / "optimizer.pt").exists()  # set aside, not deleted
    assert _steps(run_dir) == [1, 2, 3, 4]  # step 3 redone from step 2, logged once
    assert _losses(run_dir)[3] == pytest.approx(_losses(finished_run)[3], abs=1e-6)


def test_checkpoint_without_manifest_names_the_file_that_fails_to_load(finished_run, tmp_path):
    from frugal.recipes.train import run
    from frugal.runtime.checkpoints import CorruptCheckpoint

    run_dir = _killed_copy(finished_run, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "step_3"
    (ckpt / "manifest.json").unlink()  # an older checkpoint: no manifest to verify against
    (ckpt / "state.json").write_text('{"step": 3, "data_pos')
    with pytest.raises(CorruptCheckpoint, match=str(ckpt / "state.json")):
        run(compose_train(FAST + ["max_steps=4", f"resume={ckpt}"]))


# ---------------------------------------------------------------------- 4. torn last line of metrics.jsonl

def test_torn_last_metrics_line_is_dropped_on_resume(finished_run, tmp_path, caplog):
    # Before: JSONDecodeError, resume impossible.
    from frugal.recipes.train import run

    run_dir = _killed_copy(finished_run, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/mean": 0.2, "lo')
    assert _steps(run_dir) == [1, 2, 3]
    with caplog.at_level(logging.WARNING):
        run(compose_train(FAST + ["max_steps=4", "save_every=0", f"resume={run_dir}"]))
    assert "torn last line" in caplog.text
    assert _steps(run_dir) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="line 1"):  # a bad line that is not the last is an error
        (tmp_path / "bad.jsonl").write_text('{"step": 1\n{"step": 2}\n')
        read_jsonl(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------- 5. SIGINT / SIGTERM

def _interrupt_after(proc, run_dir: Path, min_step: int, signum: int) -> None:
    deadline = time.time() + 240
    while not ((run_dir / "metrics.jsonl").exists() and len(_steps(run_dir)) >= min_step):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.05)
    proc.send_signal(signum)


def test_sigint_saves_the_last_finished_step_and_resume_is_exact(tmp_path):
    # Before: a raw KeyboardInterrupt traceback and only the save_every checkpoint (step 4) kept.
    args = FAST + ["max_steps=12", "save_every=4", "keep_checkpoints=1", "generation.max_new_tokens=24"]
    run_dir, full_dir = tmp_path / "run", tmp_path / "full"
    proc = _cli(args + [f"output_dir={run_dir}"])
    _interrupt_after(proc, run_dir, 5, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err
    last = _steps(run_dir)[-1]
    assert 5 <= last < 12, "the run ended before the interrupt; the test proves nothing"
    assert f"training stopped after step {last}" in err and str(run_dir / "checkpoints" / f"step_{last}") in err
    assert (run_dir / "checkpoints" / f"step_{last}" / "manifest.json").exists()
    assert not (run_dir / ".lock").exists()

    resumed = _cli(args + [f"resume={run_dir}"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    full = _cli(args + [f"output_dir={full_dir}"])
    assert full.wait(timeout=300) == 0, full.stderr.read()[-3000:]
    got, want = _losses(run_dir), _losses(full_dir)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], abs=1e-6), f"step {step} differs after resume"


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    args = FAST + ["max_steps=40", "save_every=0", "generation.max_new_tokens=24"]
    run_dir = tmp_path / "run"
    proc = _cli(args + [f"output_dir={run_dir}"])
    _interrupt_after(proc, run_dir, 2, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = _steps(run_dir)[-1]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{last}"]
    assert "SIGTERM" in err and f"resume={run_dir}" in err


# ---------------------------------------------------------------------- 6. incomplete final/

def test_export_refuses_an_incomplete_final_naming_what_is_missing(finished_run, tmp_path):
    # Before: `frugal export` accepted it (tokenizer fetched from the base) and exited 0.
    from frugal.train.export import ExportConfig, export

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for p in (run_dir / "final").glob("tokenizer*"):
        p.unlink()
    (run_dir / "summary.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        export(ExportConfig(source=str(run_dir), output_dir=str(tmp_path / "out")))
    assert "tokenizer_config.json" in str(err.value) and "summary.json" in str(err.value)
    assert not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "frugal.recipes.export", f"source={run_dir}",
                           f"output_dir={tmp_path / 'out2'}"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "tokenizer_config.json" in proc.stderr


def test_train_prm_sigint_saves_the_last_finished_step(tmp_path):
    # frugal train-prm shares the run-dir, lock and signal helpers (runtime/run_dir.py).
    run_dir = tmp_path / "prm"
    proc = subprocess.Popen([sys.executable, "-m", "frugal.recipes.train_prm", "model=tiny_random", "prm.num_layers=0",
                             "lora.r=4", "max_minutes=null", "task.n_train=24", "task.n_test=6", "batch_size=4",
                             "data.drills_per_step=0", "max_steps=200", "eval_every=0", "save_every=0",
                             f"output_dir={run_dir}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _interrupt_after(proc, run_dir, 2, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    last = _steps(run_dir)[-1]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{last}"]
    assert f"frugal train-prm resume={run_dir}" in err and not (run_dir / ".lock").exists()

"""Fault drills, end to end on the tiny random model (issue 21). Not a timing benchmark: it runs real
``frugal train`` / ``train-prm`` / ``export`` processes, injects one fault each, and checks what a careful
user would check afterwards.

    python scripts/bench_faults.py            # all drills, ~3 minutes on a quiet 2-core machine (~8 loaded)
    python scripts/bench_faults.py --only sigint,secrets

Drills (each: survived yes/no, lost steps, leaked files):

* ``sigint`` / ``sigterm`` — the signal after step >= 5 of 10 (save_every=4): exit 128+sig, a checkpoint
  of the last finished step, resume to 10 with each step logged once and losses equal to an
  uninterrupted run's. lost = last finished step - checkpointed step.
* ``corrupt`` — the newest checkpoint's optimizer.pt truncated, a killed write's temporary folder left
  behind: resume warns naming the file, falls back to the newest intact checkpoint, removes the folder.
  lost = newest intact step - the step resumed from.
* ``torn`` — a torn last line in metrics.jsonl: resume drops it and continues.
* ``resume_named`` — output_dir=D resume=true with a newer finished run E beside it: D continues, E is
  untouched; resume=true alone with two unfinished runs stops and lists them.
* ``same_second`` — two runs started in the same second: two folders, each step logged once in each.
* ``lock`` — a run into a folder that a live process holds: refused, nothing written.
* ``final`` — export of a final/ without tokenizer and summary.json: refused, naming both.
* ``secrets`` — tokens as overrides (refused) and inside values of a W&B offline run: leaked = files
  (binary W&B run files included) that hold any of them.
* ``bad_rows`` — a JSONL with a word answer, non-UTF-8 bytes, a broken JSON line and a prompt over
  ``task.max_prompt_tokens``, under on_bad_row=skip: the run finishes and reports 4 skipped rows.
* ``prm_held_out`` — a PRM run whose held-out set is empty: stopped before training, with a message.

Ends with one line: ``FAULTS tried=<n> survived=<n> lost_steps=<n> leaked=<n>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "logger=none", "task.n_train=32", "task.n_test=8", "prompts_per_step=2",
        "algo.group_size=4", "generation.max_new_tokens=24", "eval_limit=2", "eval_before=false",
        "optim.micro_batch_size=4", 'reward.functions=[{name:"reward_fixtures:share_of_letter_e",weight:1.0}]']
HF = "hf_" + "Q7x" * 10
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"
ENV_SECRET = "env-secret-value-987"
# Two processes import, wait for each other, then start Hydra at the same whole second.
BARRIER = ("import datetime, math, os, pathlib, sys, time; import frugal.recipes.train; import hydra.core.utils as hu\n"
           "from frugal.recipes.cli import main\n"
           "d = pathlib.Path(sys.argv[1]); (d / f'ready-{os.getpid()}').touch()\n"
           "while len(list(d.glob('ready-*'))) < 2: time.sleep(0.005)\n"
           "target = math.ceil(max(p.stat().st_mtime for p in d.glob('ready-*'))) + 0.02  # the same for both\n"
           "time.sleep(max(0.0, target - time.time()))\n"
           # On a loaded machine one process may reach Hydra's clock a second later; reading the shared
           # start time instead makes the same second certain (what `now` returns is all that differs).
           "class Clock(datetime.datetime):\n"
           "    @classmethod\n"
           "    def now(cls, tz=None): return datetime.datetime.fromtimestamp(target)\n"
           "hu.datetime = Clock\n"
           "sys.exit(main(['train', *sys.argv[2:]]))")


def env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                WANDB_SILENT="true", **extra)


def frugal(recipe: str, args: list[str], cwd=ROOT, wait=True, **extra):
    module = {"train": "frugal.recipes.train", "train-prm": "frugal.recipes.train_prm",
              "export": "frugal.recipes.export"}[recipe]
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env(**extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, out + err  # Hydra's console log goes to stdout


def metrics(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    if len(steps) != len(set(steps)):
        raise AssertionError(f"{run_dir}/metrics.jsonl logs a step twice: {steps}")
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def killed_run(tmp: Path, name: str, steps: int = 3) -> Path:
    """A run that saved a checkpoint after each of ``steps`` steps and was then killed (no final/, no summary)."""
    run_dir = tmp / "outputs" / "train" / "day" / name
    rc, _, err = frugal("train", TINY + [f"max_steps={steps}", "save_every=1", f"keep_checkpoints={steps}",
                                         f"output_dir={run_dir}"])
    assert rc == 0, err[-2000:]
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    return run_dir


# ---------------------------------------------------------------------- drills

def drill_signal(tmp: Path, signum: int) -> tuple[bool, int, int]:
    args = TINY + ["max_steps=10", "save_every=4", "keep_checkpoints=1"]
    run_dir = tmp / f"sig{signum}"
    proc = frugal("train", args + [f"output_dir={run_dir}"], wait=False)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 5):
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the run ended or stalled before the signal: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    last, saved = max(metrics(run_dir)), (checkpoints(run_dir) or [0])[-1]
    ok = proc.returncode == 128 + signum and f"step_{last}" in err and "Traceback" not in err
    rc, _, err2 = frugal("train", args + [f"resume={run_dir}"])
    full = tmp / f"full{signum}"
    rc2, _, _ = frugal("train", args + [f"output_dir={full}"])
    got, want = metrics(run_dir), metrics(full)
    ok = ok and rc == 0 and rc2 == 0 and sorted(got) == list(range(1, 11)) and all(
        abs(got[s] - want[s]) <= 1e-6 for s in got)
    return ok, last - saved, 0


def drill_corrupt(tmp: Path) -> tuple[bool, int, int]:
    run_dir = killed_run(tmp / "corrupt", "run", steps=4)
    bad = run_dir / "checkpoints" / "step_4" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:64])
    leftover = run_dir / "checkpoints" / ".step_5.killed"
    leftover.mkdir()
    rc, _, err = frugal("train", TINY + ["max_steps=5", "save_every=0", f"resume={run_dir}"])
    resumed = 3 if "Resumed from" in err and "step_3" in err else 0
    ok = rc == 0 and str(bad) in err and not leftover.exists() and sorted(metrics(run_dir)) == [1, 2, 3, 4, 5]
    return ok, 3 - resumed, 0


def drill_torn(tmp: Path) -> tuple[bool, int, int]:
    run_dir = killed_run(tmp / "torn", "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    rc, _, err = frugal("train", TINY + ["max_steps=4", "save_every=0", f"resume={run_dir}"])
    return rc == 0 and "torn last line" in err and sorted(metrics(run_dir)) == [1, 2, 3, 4], 0, 0


def drill_resume_named(tmp: Path) -> tuple[bool, int, int]:
    base = tmp / "named"
    d = killed_run(base, "D")
    e = base / "outputs" / "train" / "day" / "E"
    rc, _, _ = frugal("train", TINY + ["max_steps=2", "save_every=1", f"output_dir={e}"])
    e_files = {p.name: p.read_bytes() for p in e.iterdir() if p.is_file()}
    rc2, _, err = frugal("train", TINY + ["max_steps=4", "save_every=0", "resume=true", f"output_dir={d}"])
    ok = rc == 0 and rc2 == 0 and sorted(metrics(d)) == [1, 2, 3, 4]
    ok = ok and {p.name: p.read_bytes() for p in e.iterdir() if p.is_file()} == e_files
    killed_run(base, "F")  # now two unfinished runs: D is finished, F and G are not
    killed_run(base, "G")
    rc3, _, err3 = frugal("train", TINY + ["max_steps=4", "resume=true"], cwd=base)
    return ok and rc3 != 0 and "ambiguous" in err3 and "day/F" in err3 and "day/G" in err3, 0, 0


def drill_same_second(tmp: Path) -> tuple[bool, int, int]:
    cwd = tmp / "same_second"
    cwd.mkdir()
    (cwd / "barrier").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(cwd / "barrier"), *TINY, "max_steps=2"], cwd=cwd,
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    rcs = [p.wait(timeout=600) for p in procs]
    dirs = sorted(p.parent for p in cwd.glob("outputs/train/*/*/metrics.jsonl"))
    same = len({(d.parent.name, d.name.rsplit("-", 1)[0]) for d in dirs}) == 1
    ok = same and rcs == [0, 0] and len(dirs) == 2 and all(sorted(metrics(d)) == [1, 2] for d in dirs)
    print(f"  same_second: dirs={[str(d.relative_to(cwd)) for d in dirs]} same_second={same}")
    return ok, 0, 0


def drill_lock(tmp: Path) -> tuple[bool, int, int]:
    run_dir = tmp / "locked"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_dir / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        rc, _, err = frugal("train", TINY + ["max_steps=1", f"output_dir={run_dir}"])
    finally:
        holder.kill()
        holder.wait()
    return rc != 0 and "in use" in err and not (run_dir / "metrics.jsonl").exists(), 0, 0


def drill_final(tmp: Path) -> tuple[bool, int, int]:
    run_dir = tmp / "final_run"
    rc, _, _ = frugal("train", TINY + ["max_steps=1", f"output_dir={run_dir}"])
    for p in (run_dir / "final").glob("tokenizer*"):
        p.unlink()
    (run_dir / "summary.json").unlink()
    rc2, _, err = frugal("export", [f"source={run_dir}", f"output_dir={tmp / 'export'}"])
    return rc == 0 and rc2 != 0 and "tokenizer_config.json" in err and "summary.json" in err, 0, 0


def drill_secrets(tmp: Path) -> tuple[bool, int, int]:
    cwd = tmp / "secrets"
    cwd.mkdir()
    secrets = dict(HF_TOKEN=ENV_SECRET, WANDB_API_KEY=WANDB_KEY, WANDB_MODE="offline")
    rc1, _, _ = frugal("train", TINY + [f"+hf_token={HF}", f"+logger.api_key={WANDB_KEY}"], cwd=cwd, **secrets)
    run_dir = cwd / "run"
    rc2, out, err = frugal("train", TINY + ["max_steps=1", "logger=wandb", "logger.mode=offline",
                                            f"logger.name=run-{HF}", f"logger.tags=[t-{ENV_SECRET}]",
                                            f"output_dir={run_dir}"], cwd=cwd, **secrets)
    rc3, _, _ = frugal("export", [f"source={run_dir}", f"output_dir={cwd / 'export'}"], cwd=cwd, **secrets)
    leaked = [p for p in cwd.rglob("*") if p.is_file()
              and any(s.encode() in p.read_bytes() for s in (HF, WANDB_KEY, ENV_SECRET))]
    leaked += ["console"] if any(s in out + err for s in (HF, ENV_SECRET)) else []
    for p in leaked:
        print(f"  LEAK: {p}")
    return rc1 != 0 and rc2 == 0 and rc3 == 0 and bool(list(run_dir.glob("wandb/offline-run-*"))), 0, len(leaked)


def drill_bad_rows(tmp: Path) -> tuple[bool, int, int]:
    path = tmp / "bad.jsonl"
    good = [json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}).encode() + b"\n" for i in range(12)]
    bad = [json.dumps({"question": "Three plus four?", "answer": "seven"}).encode() + b"\n",
           b'{"question": "caf\xe9?", "answer": "1"}\n', b'{"question": \n',
           json.dumps({"question": "Add " + " + ".join(["1"] * 400), "answer": "400"}).encode() + b"\n"]
    path.write_bytes(b"".join(good[:4] + bad + good[4:]))
    args = [a for a in TINY if not a.startswith("task.")] + ["task=jsonl", f"task.path={path}", "task.test_fraction=0.25",
                                                              "task.on_bad_row=skip", "task.max_prompt_tokens=300",
                                                              "max_steps=1", f"output_dir={tmp / 'bad_rows'}"]
    rc, _, err = frugal("train", args)
    summary = json.loads((tmp / "bad_rows" / "summary.json").read_text()) if rc == 0 else {}
    return rc == 0 and summary.get("skipped_rows") == 4, 0, 0


def drill_prm_held_out(tmp: Path) -> tuple[bool, int, int]:
    path = tmp / "prm.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "completions": [f"{i} + {i} = {2 * i}"],
                                        "labels": [True]}) + "\n" for i in range(6)))
    rc, _, err = frugal("train-prm", ["model=tiny_random", "prm.num_layers=0", "lora.r=4", "max_minutes=null",
                                      "data.generated=false", "data.drills_per_step=0", f"data.paths=[{path}]",
                                      "data.eval_fraction=0.0", "max_steps=1", f"output_dir={tmp / 'prm'}"])
    return rc != 0 and "held-out set is empty" in err and not (tmp / "prm" / "final").exists(), 0, 0


DRILLS = {
    "sigint": lambda tmp: drill_signal(tmp, signal.SIGINT),
    "sigterm": lambda tmp: drill_signal(tmp, signal.SIGTERM),
    "corrupt": drill_corrupt, "torn": drill_torn, "resume_named": drill_resume_named,
    "same_second": drill_same_second, "lock": drill_lock, "final": drill_final, "secrets": drill_secrets,
    "bad_rows": drill_bad_rows, "prm_held_out": drill_prm_held_out,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated drill names (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(DRILLS)
    tried = survived = lost = leaked = 0
    with tempfile.TemporaryDirectory(prefix="frugal-faults-") as tmp:
        for name in names:
            t0 = time.time()
            try:
                ok, lost_steps, leaks = DRILLS[name](_fresh(Path(tmp), name))
            except Exception as err:  # a drill that crashes did not survive
                ok, lost_steps, leaks = False, 0, 0
                print(f"  {name}: {type(err).__name__}: {str(err)[-500:]}")
            tried += 1
            survived += bool(ok)
            lost += lost_steps
            leaked += leaks
            print(f"drill {name:<13} survived={ok} lost_steps={lost_steps} leaked={leaks} ({time.time() - t0:.0f}s)",
                  flush=True)
    print(f"FAULTS tried={tried} survived={survived} lost_steps={lost} leaked={leaked}")


def _fresh(tmp: Path, name: str) -> Path:
    folder = tmp / name
    folder.mkdir()
    return folder


if __name__ == "__main__":
    main()

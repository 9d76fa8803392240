"""Benchmark: the `make demo` training step alone and beside one busy competing process (issue 21, item 16).

    python scripts/bench_demo_load.py                  # ~6 minutes alone on 2 CPU cores (run on a quiet machine)
    python scripts/bench_demo_load.py --quick          # tiny random model, 3 steps: a check that it runs (~1 min)
    python scripts/bench_demo_load.py --wait-policy ACTIVE --threads 2   # the old behaviour, for comparison

Each phase runs ``frugal train recipe=demo`` (the demo's model, task, algorithm, batch and generation
length) in its own process for ``--steps`` steps with evaluation and checkpoints off, and reports the
median of ``time/step_s`` from its ``metrics.jsonl`` over steps 2..N (step 1 warms up). Phase 1 runs alone;
phase 2 runs beside one competing process started ``--settle`` seconds before (so that the load average
the trainer reads at start-up counts it): ``--competitor python`` is a pure-Python busy loop (one core),
``torch`` a process doing matrix products on torch's default thread count.

The trainer's thread settings are Frugal's defaults unless overridden: ``OMP_WAIT_POLICY=PASSIVE`` (set by
the ``frugal`` CLI and ``make demo``; ``--wait-policy`` sets it for the trainer) and, with ``num_threads``
unset, torch threads = the cores free at start-up (``frugal.runtime.system.set_cpu_threads``; ``--threads``
sets ``num_threads``). The goal (issue 21): slowdown <= 2.5x. Ends with exactly one line::

    BENCH demo_load alone_s=<x> loaded_s=<y> slowdown=<r>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPETITORS = {
    "python": "while True: pass",
    "torch": "import torch\na = torch.randn(512, 512)\nwhile True: a = torch.tanh(a @ a)",
}


def train_phase(args, out: Path) -> tuple[float, list[float]]:
    overrides = ["recipe=demo", f"max_steps={args.steps}", "eval_before=false", "eval_every=0", "save_every=0",
                 "eval_limit=1", "max_minutes=null", "require_improvement=false", f"output_dir={out}"]
    if args.quick:
        overrides += ["model=tiny_random", "generation.max_new_tokens=16"]
    if args.threads:
        overrides.append(f"num_threads={args.threads}")
    env = dict(os.environ, OMP_WAIT_POLICY=args.wait_policy)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # let Frugal pick the threads, as `make demo` does
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "frugal.recipes.cli", "train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["time/step_s"] for r in rows if "time/step_s" in r]
    return statistics.median(times[1:] or times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 3 steps (a smoke run)")
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="python")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds the competitor runs before the trainer")
    parser.add_argument("--wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"])
    parser.add_argument("--threads", type=int, default=0, help="num_threads for the trainer (0 = Frugal's default)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.settle = 3, min(args.settle, 5.0)
    print(f"cores={len(os.sched_getaffinity(0))} load_before={os.getloadavg()[0]:.2f} wait_policy={args.wait_policy} "
          f"threads={args.threads or 'auto'} competitor={args.competitor}", flush=True)
    with tempfile.TemporaryDirectory(prefix="frugal-demo-load-") as tmp:
        alone, alone_times = train_phase(args, Path(tmp) / "alone")
        print(f"alone : median step {alone:.2f}s  steps={[round(t, 2) for t in alone_times]}", flush=True)
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]])
        try:
            time.sleep(args.settle)
            print(f"load with the competitor: {os.getloadavg()[0]:.2f}", flush=True)
            loaded, loaded_times = train_phase(args, Path(tmp) / "loaded")
        finally:
            competitor.kill()
            competitor.wait()
        print(f"loaded: median step {loaded:.2f}s  steps={[round(t, 2) for t in loaded_times]}", flush=True)
    print(f"BENCH demo_load alone_s={alone:.2f} loaded_s={loaded:.2f} slowdown={loaded / alone:.2f}")


if __name__ == "__main__":
    main()

"""T-SPMO vs S-GRPO vs full-token GRPO on the embedded SmolLM2-135M: cost per step and accuracy.

For each task, seed and algorithm, one ``frugal train`` run (``frugal.recipes.train.run``) in its own child
process, so peak RSS is per algorithm; all runs share seeds, prompts, model, LoRA and generation settings
and differ only in ``algo=``. Reported per algorithm: fraction of completion tokens in the loss, seconds
per step (mean over steps 2.., step 1 warms up), peak RSS of the child, held-out greedy accuracy after the
same number of steps; "base" is the held-out accuracy before training (the same for every algorithm).

Tasks: ``arith`` = the demo task (conf/recipe/demo.yaml: ops [+], 1 digit, answer_format number, 4 prompts
x G=8 per step, 32 new tokens); ``multiply`` = conf/recipe/tspmo_multiply.yaml (2-digit x 1-digit, 48 new
tokens, 50 held-out problems).

Default run: 6 steps per algorithm on arith, 2 on multiply, seed 0, one torch thread per run -- 6 child
runs (the base model is evaluated in the first run of each task). Measured: 34 min on the shared 2-core
machine at load average ~8 (~60 s per step); about a third of that on a quiet machine. That is a
smoke-scale comparison: with one seed and a 35-problem test split, accuracy differences of a few points
are noise (one problem = 2.9 points), and seconds per step move with the machine's load (compare
``update_s``, the step minus generation, for the loss's own cost). Scale up with
``--steps 60 --mult-steps 60 --seeds 0 1 2 --threads 2`` on a quiet machine.

    python scripts/bench_algos.py [--steps 6] [--mult-steps 2] [--seeds 0] [--tasks arith multiply]
                                  [--json outputs/bench/bench_algos.json]

Ends with: BENCH algos tspmo_token_frac=<x> tspmo_vs_sgrpo_time=<r> acc_base=<x> acc_grpo=<x>
acc_sgrpo=<x> acc_tspmo=<x>   (arithmetic task; accuracies as fractions, mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("grpo", "sgrpo", "tspmo")
TASK_OVERRIDES = {
    "arith": ["recipe=demo"],
    "multiply": ["recipe=tspmo_multiply"],
}


def child(spec: dict) -> dict:
    """Runs in the child process: one training run, then its per-step averages and peak RSS."""
    import resource

    import torch
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train import CONF_DIR, run
    from frugal.train.tracking import read_jsonl

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=spec["overrides"])
    run_dir = Path(spec["run_dir"])
    summary = run(cfg, run_dir=run_dir)
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    timed = steps[1:] or steps  # step 1 pays one-off warm-up costs

    def mean(rows, key):
        return sum(r[key] for r in rows) / max(len(rows), 1)

    return {
        "steps": summary["steps"],
        "accuracy_before": summary["accuracy_before"],
        "accuracy_after": summary["accuracy_after"],
        "token_frac": mean(steps, "tokens/selected_frac"),
        "selected_tokens": mean(steps, "tokens/selected"),
        "step_s": mean(timed, "time/step_s"),
        "update_s": mean(timed, "time/step_s") - mean(timed, "time/generate_s"),
        "reward_mean": mean(steps, "reward/mean"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "minutes": summary["minutes"],
    }


def run_child(overrides: list[str], run_dir: Path, timeout: float, threads: int) -> dict:
    spec = json.dumps({"overrides": overrides, "run_dir": str(run_dir)})
    env = dict(os.environ, WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, "--child", spec], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHILD_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training run failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("CHILD_RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per algorithm on arith")
    parser.add_argument("--mult-steps", type=int, default=2, help="training steps per algorithm on multiply")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", default=["arith", "multiply"], choices=list(TASK_OVERRIDES))
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run (1: oversubscribed OpenMP threads stall on a loaded machine)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    parser.add_argument("--json", default="outputs/bench/bench_algos.json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("CHILD_RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    started = time.time()
    results: dict = {"settings": vars(args) | {"child": None}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_algos_") as tmp:
        for task in args.tasks:
            steps = args.steps if task == "arith" else args.mult_steps
            for seed in args.seeds:
                for i, algo in enumerate(args.algos):
                    overrides = TASK_OVERRIDES[task] + [
                        f"algo={algo}", f"max_steps={steps}", f"seed={seed}", "max_minutes=null", "save_every=0",
                        "logger=none", f"num_threads={args.threads}", "samples_every=0",
                        # The base model is the same for every algorithm: evaluate it once per task and seed.
                        f"eval_before={'true' if i == 0 else 'false'}", *args.extra,
                    ]
                    out = run_child(overrides, Path(tmp) / f"{task}_{seed}_{algo}", args.timeout, args.threads)
                    out |= {"task": task, "seed": seed, "algo": algo}
                    results["runs"].append(out)
                    print(f"{task:8s} seed={seed} {algo:6s} steps={out['steps']:3d} token_frac={out['token_frac']:.3f} "
                          f"step_s={out['step_s']:.2f} update_s={out['update_s']:.2f} "
                          f"peak_rss_mb={out['peak_rss_mb']:.0f} acc_after={out['accuracy_after']:.3f}"
                          + (f" acc_base={out['accuracy_before']:.3f}" if out["accuracy_before"] is not None else ""),
                          flush=True)

    summary = summarise(results["runs"], args)
    results["summary"] = summary
    results["minutes"] = (time.time() - started) / 60
    print_table(summary)
    from frugal.runtime.io import atomic_write_text

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
    print(f"wrote {path} ({results['minutes']:.1f} min)")
    a = summary.get("arith", {})
    get = lambda algo, key: a.get(algo, {}).get(key, float("nan"))  # noqa: E731
    ratio = get("tspmo", "step_s") / get("sgrpo", "step_s")
    print(f"BENCH algos tspmo_token_frac={get('tspmo', 'token_frac'):.4f} tspmo_vs_sgrpo_time={ratio:.3f} "
          f"acc_base={get('base', 'accuracy'):.4f} acc_grpo={get('grpo', 'accuracy'):.4f} "
          f"acc_sgrpo={get('sgrpo', 'accuracy'):.4f} acc_tspmo={get('tspmo', 'accuracy'):.4f}")


def summarise(runs: list[dict], args) -> dict:
    """Per task: per algorithm means over seeds (and the seeds' min/max accuracy), plus the base model."""
    out = {}
    for task in args.tasks:
        rows = [r for r in runs if r["task"] == task]
        task_out = {}
        base = [r["accuracy_before"] for r in rows if r["accuracy_before"] is not None]
        if base:
            task_out["base"] = {"accuracy": sum(base) / len(base), "acc_min": min(base), "acc_max": max(base)}
        for algo in args.algos:
            mine = [r for r in rows if r["algo"] == algo]
            if not mine:
                continue
            accs = [r["accuracy_after"] for r in mine]
            m = lambda k: sum(r[k] for r in mine) / len(mine)  # noqa: E731
            task_out[algo] = {"accuracy": sum(accs) / len(accs), "acc_min": min(accs), "acc_max": max(accs),
                              "token_frac": m("token_frac"), "step_s": m("step_s"), "update_s": m("update_s"),
                              "peak_rss_mb": max(r["peak_rss_mb"] for r in mine), "steps": mine[0]["steps"]}
        out[task] = task_out
    return out


def print_table(summary: dict) -> None:
    for task, algos in summary.items():
        sgrpo = algos.get("sgrpo", {})
        print(f"\n{task}: algo    accuracy   token_frac  step_s  update_s  x_sgrpo_time  peak_rss_mb")
        for algo, s in algos.items():
            if algo == "base":
                print(f"{task}: base    {s['accuracy']:.3f}")
                continue
            rel = s["step_s"] / sgrpo["step_s"] if sgrpo.get("step_s") else float("nan")
            print(f"{task}: {algo:6s}  {s['accuracy']:.3f}      {s['token_frac']:.3f}       {s['step_s']:6.2f}  "
                  f"{s['update_s']:7.2f}   {rel:10.3f}   {s['peak_rss_mb']:10.0f}")


if __name__ == "__main__":
    main()

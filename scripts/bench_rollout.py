"""Benchmark: training rollouts through Frugal's HF sampler vs vLLM colocate (tokens/s, step time, memory).

    .venv-vllm/bin/python scripts/bench_rollout.py            # default: ~12 minutes on 2 CPU cores (HF + 2 vLLM runs)
    .venv-vllm/bin/python scripts/bench_rollout.py --quick    # smoke run (~2 minutes: mostly vLLM start-up)
    .venv-vllm/bin/python scripts/bench_rollout.py --vllm auto/auto float32/lora   # other variants

Needs vLLM (``make test-vllm`` builds ``.venv-vllm``); both backends run in that same environment.

**What it measures.** Two S-GRPO runs of ``frugal train`` (``frugal.recipes.train.run``), each in its own
subprocess (peak RSS = that run's ``ru_maxrss``: imports, model, and for vLLM its engine and KV cache), on
the embedded SmolLM2-135M-Instruct, the demo task, the same prompts (same seed, same data order), group
size, ``max_new_tokens``, LoRA (r=16, all linear layers), lr 2e-4, temperature 1.0, one torch thread:

1. ``generation.backend=hf``: Frugal's decoding core (KV cache, finished rows leave the batch).
2. ``generation.backend=vllm`` colocate, once per ``--vllm`` variant ``<dtype>/<sync>``
   (``vllm.dtype`` / ``vllm.sync``; default ``auto/auto float32/auto``: the library's
   defaults — on a CPU with native bf16, vLLM in bf16 beside the fp32 trainer — then vLLM in the trainer's
   float32): an in-process vLLM engine (1024-token context, 1 GiB KV cache); after every step the policy
   moves to it (sync ``auto`` on CPU: merged weights reloaded; ``lora``: the adapter as a new
   ``LoRARequest``); the loss applies truncated importance weights against vLLM's log-probs.

Per run, over steps 2..N (step 1 is warm-up): rollout tokens/s = completion tokens sampled / seconds in
sampling (``time/generate_s``, which for vLLM includes publishing the adapter), median S-GRPO step time
(``time/step_s``: sample + reward + advantage + update), and for vLLM the mean |log π_trainer − log π_vLLM|
over the loss's tokens (``vllm/logprob_gap``). Engine start-up and evaluation are outside the timed steps.
Sampled completions differ between backends (different random streams), so their mean lengths are
printed next to the times. The script ends with exactly one line::

    BENCH rollout vllm_vs_hf_tokens_per_s=<r> vllm_vs_hf_step_time=<r> logprob_gap=<mean abs>

for the first ``--vllm`` variant (the library's defaults unless told otherwise); every variant's ratios
are printed above it.

Goal on a 2-core CPU: vLLM's tokens/s >= 1.3x the HF sampler's with the step time no worse (ratio <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--vllm", nargs="+", default=["auto/auto", "float32/auto"], metavar="DTYPE/SYNC",
                   help="vLLM variants: vllm.dtype (auto|float32|bfloat16|float16) / vllm.sync "
                        "(auto|lora|full); the BENCH line is the first's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 2 prompts x 4, 16 new tokens")
    p.add_argument("--workdir", default=None, help="run dirs and logs (default outputs/bench_rollout/<time>)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one run ("hf" or a --vllm variant), in a subprocess
    args = p.parse_args(argv)
    for variant in args.vllm:
        dtype, _, sync = variant.partition("/")
        if dtype not in ("auto", "float32", "bfloat16", "float16") or sync not in ("auto", "lora", "full"):
            p.error(f"--vllm {variant!r}: expected <auto|float32|bfloat16|float16>/<auto|lora|full>")
    if args.quick:
        args.steps, args.prompts, args.group, args.max_new_tokens = 2, 2, 4, 16
    return args


def overrides(args, backend: str) -> list[str]:
    common = [
        "recipe=demo", f"max_steps={args.steps}", f"prompts_per_step={args.prompts}", f"algo.group_size={args.group}",
        f"generation.max_new_tokens={args.max_new_tokens}", f"seed={args.seed}", f"num_threads={args.threads}",
        "eval_before=false", "eval_every=0", "eval_limit=1", "save_every=0", "max_minutes=null",
        "samples_every=0", "logger=none", "optim.lr=2e-4", "lora.r=16", "lora.alpha=32",
        f"optim.micro_batch_size={args.prompts * args.group}",
    ]
    if backend != "hf":  # a --vllm variant, dtype/sync
        dtype, _, sync = backend.partition("/")
        common += ["generation.backend=vllm", f"vllm.dtype={dtype}", f"vllm.sync={sync}",
                   "vllm.max_model_len=1024", "vllm.kv_cache_gib=1"]
    return common


def worker(args) -> None:
    """One run in this process; prints a JSON line with its measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from hydra import compose, initialize_config_dir

    from frugal.conf import CONF_DIR
    from frugal.recipes.train import run
    from frugal.train.tracking import read_jsonl

    run_dir = Path(args.workdir) / args.worker.replace("/", "-")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides(args, args.worker))
    t0 = time.time()
    run(cfg, run_dir=run_dir)
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    timed = steps[1:] or steps  # step 1 is warm-up
    tokens = sum(r["tokens/completion_mean"] * r["batch/completions"] for r in timed)
    gaps = [r["vllm/logprob_gap"] for r in timed if "vllm/logprob_gap" in r]
    print("RESULT " + json.dumps({
        "backend": args.worker, "tokens_per_s": tokens / sum(r["time/generate_s"] for r in timed),
        "step_s": statistics.median(r["time/step_s"] for r in timed),
        "generate_s": statistics.median(r["time/generate_s"] for r in timed),
        "completion_mean": statistics.mean(r["tokens/completion_mean"] for r in timed),
        "logprob_gap": statistics.mean(gaps) if gaps else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": time.time() - t0,
    }), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    workdir = Path(args.workdir or f"outputs/bench_rollout/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    results = {}
    for backend in ("hf", *args.vllm):
        cmd = [sys.executable, __file__, "--worker", backend, "--workdir", str(workdir), "--steps", str(args.steps),
               "--prompts", str(args.prompts), "--group", str(args.group), "--max-new-tokens",
               str(args.max_new_tokens), "--threads", str(args.threads), "--seed", str(args.seed)]
        log_path = workdir / f"{backend.replace('/', '-')}.log"
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"bench_rollout: the {backend} run failed ({proc.returncode}); see {log_path}")
        results[backend] = json.loads(lines[-1][len("RESULT "):])
        r = results[backend]
        print(f"{backend:14s} tokens/s={r['tokens_per_s']:.1f} step_s={r['step_s']:.2f} "
              f"generate_s={r['generate_s']:.2f} completion_mean={r['completion_mean']:.1f} "
              f"peak_rss_mb={r['peak_rss_mb']:.0f} load={os.getloadavg()[0]:.2f}", flush=True)
    hf = results["hf"]
    ratios = {v: {"vllm_vs_hf_tokens_per_s": results[v]["tokens_per_s"] / hf["tokens_per_s"],
                  "vllm_vs_hf_step_time": results[v]["step_s"] / hf["step_s"],
                  "logprob_gap": results[v]["logprob_gap"]} for v in args.vllm}
    for v, r in ratios.items():
        print(f"{v:14s} " + " ".join(f"{k}={fmt(k, x)}" for k, x in r.items()))
    if args.json:
        from frugal.runtime.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps({"results": results, "ratios": ratios}, indent=2))
    print("BENCH rollout " + " ".join(f"{k}={fmt(k, x)}" for k, x in ratios[args.vllm[0]].items()))


def fmt(key: str, x) -> str:
    """A ratio with 3 decimals, the log-prob gap with 5; None (no timed step had a token in the loss): nan."""
    return "nan" if x is None else f"{x:.5f}" if key == "logprob_gap" else f"{x:.3f}"


if __name__ == "__main__":
    main()

"""Engine benchmark: the same search through ``engine.backend=hf`` and ``engine.backend=vllm`` in one run.

Best-of-N and particle filtering at N = 8 on the same 48 held-out problems (the search benchmark's
setting: ``arith``, 3 one-digit operands, + −, 3 worked examples in the prompt, at most 48 tokens per
solution and 32 per step), the embedded policy (SmolLM2-135M-Instruct, float32 on both backends) and the
default PRM (the newest ``outputs/train_prm/*/*/final``, as ``scripts/bench_search.py``), one thread.
Per backend and strategy: accuracy, policy tokens generated, prefilled and (vLLM) served from the prefix
cache, PRM tokens, and the search's wall time (the engine's start-up — loading the model, vLLM's profiling
and KV-cache allocation — is printed apart: it is paid once per process, not per search).

Noise: the two backends sample different tokens (each its own sampler, seeded per candidate), so their
accuracies differ by sampling luck even when the backends are equivalent. On 48 problems one accuracy's
binomial standard error is sqrt(p(1-p)/48) ≈ 7 points at p = 0.5; the script prints it and a paired
bootstrap (problems resampled, 2000 draws) 95% interval of the vllm − hf difference per strategy: a
difference inside that interval is noise.

Last line:

    BENCH engine vllm_vs_hf_wall=<vLLM search wall ÷ HF's> acc_delta=<vLLM − HF accuracy, points, mean over
                 the strategies> tokens_ratio=<vLLM policy tokens charged (prefill + generated) ÷ HF's>

    python scripts/bench_engine.py                         # the full run (after `frugal train-prm`)
    python scripts/bench_engine.py --quick --prm random    # a smoke test: 4 problems, N = 2, a random tiny PRM
    .venv-vllm/bin/python scripts/bench_engine.py --python-hf .venv/bin/python   # hf in another environment

Each backend runs in a fresh process of its own, one after the other (``--python-hf`` / ``--python-vllm``
choose their environments: vLLM's wheel may pin a transformers older than the one Frugal's HF paths need).
Outputs (summary.json and results.jsonl per backend, <backend>.json) go to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prm", default=None, help="PRM folder or Hub id (default: the newest outputs/train_prm/*/*/final; "
                                                "`random`: a random tiny PRM, for --quick smoke tests only)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--first", type=int, default=0, help="index of the first held-out problem")
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--strategies", nargs="+", default=["best_of_n", "particle_filter"])
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--fewshot", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-step-tokens", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--dtype", default="float32", help="vLLM's dtype (the HF policy is float32 on a CPU)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both backends")
    ap.add_argument("--quick", action="store_true", help="4 problems at N = 2: checks the script end to end")
    ap.add_argument("--out", default=None, help="output folder (default outputs/bench/engine/<time>)")
    ap.add_argument("--python-hf", default=sys.executable,
                    help="the Python that runs the hf backend (an environment whose transformers Frugal's HF "
                         "paths support; default: this one)")
    ap.add_argument("--python-vllm", default=sys.executable, help="the Python that runs the vllm backend (with vLLM)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one backend, write --result
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.budget = min(args.problems, 4), min(args.budget, 2)
    return args


def paired_bootstrap(a: list[bool], b: list[bool], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(b) − mean(a) over problems resampled with replacement (the pairs kept)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    diff = np.asarray(b, float) - np.asarray(a, float)
    idx = rng.integers(0, len(diff), size=(draws, len(diff)))
    means = diff[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None) -> None:
    """Each backend runs in a process of its own (``--python-hf`` / ``--python-vllm``: the two may be
    different environments), one after the other, so neither's threads, memory or caches touch the other's
    timing; this process then compares them."""
    import json
    import subprocess

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = Path(args.out or ROOT / "outputs/bench/engine" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for backend in args.backends:
        python = args.python_vllm if backend == "vllm" else args.python_hf
        path = out / f"{backend}.json"
        subprocess.run([python, str(Path(__file__).resolve()), *argv, "--out", str(out), "--worker", backend,
                        "--result", str(path)], check=True)
        results[backend] = json.loads(path.read_text())
    if {"hf", "vllm"} <= set(results):
        compare(results["hf"], results["vllm"], args)


def worker(args) -> None:
    """One backend: every strategy at N = ``--budget``; writes rows and per-problem correctness to ``--result``."""
    import json
    from dataclasses import asdict

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM's CPU worker: OMP_NUM_THREADS threads
    import torch

    from frugal.inference.backends import engine_config, make_engine
    from frugal.evaluator.config import search_config
    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.inference.vllm_setup import VLLMConfig
    from frugal.evaluator.harness import run_strategy, write_outputs
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig
    from frugal.inference.models import ModelConfig

    backend = args.worker
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = TaskConfig(name="arith", ops=["+", "-"], num_operands=3, digits=1,
                      prompt=PromptConfig(num_fewshot=args.fewshot))
    problems = load_task(task).test[args.first:args.first + args.problems]
    if not problems:
        sys.exit(f"bench_engine: --first {args.first} --problems {args.problems} selects no held-out problem")
    prm = CountingPRM(load_prm(args.prm, device, task.prompt.step_separator))
    common = dict(max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens, max_steps=args.max_steps,
                  temperature=args.temperature)
    vllm = VLLMConfig(dtype=args.dtype, max_model_len=args.max_model_len) if backend == "vllm" else None
    print(f"[{backend}] policy={args.model} prm={args.prm or 'newest outputs/train_prm'} problems={len(problems)} "
          f"(held-out {args.first}-{args.first + len(problems) - 1}) N={args.budget} strategies={args.strategies} "
          f"threads={args.threads} device={device}", flush=True)
    started = time.time()
    engine = make_engine(ModelConfig(name_or_path=args.model), engine_config(backend, **common), device,
                         seed=args.seed, vllm=vllm)
    startup = time.time() - started
    torch.set_num_threads(args.threads)  # vLLM's start-up may have changed it
    print(f"[{backend}] engine start-up {startup:.1f}s (torch threads {torch.get_num_threads()})", flush=True)
    rows, records, result = [], [], {"startup_s": startup, "strategies": {}}
    for name in args.strategies:
        before = engine.counts.snapshot()
        r, rec = run_strategy(name, problems, [args.budget], engine, prm, search_config(name, budgets=[args.budget]),
                              seed=args.seed, label=name, progress=False)
        cached = engine.counts.since(before).cached
        rows += r
        records += rec
        x = r[0]
        result["strategies"][name] = {"row": asdict(x), "correct": [bool(y["correct"]) for y in rec], "cached": cached}
        print(f"[{backend}] {name:16s} N={args.budget} acc={100 * x.accuracy:5.1f}  generated={x.policy_generated_tokens:7d} "
              f"prefill={x.policy_prefill_tokens:7d} cached={cached:7d} prm_tokens={x.prm_tokens:7d} "
              f"flops={x.flops_total:.3g} wall={x.wall_s:.1f}s", flush=True)
    write_outputs(Path(args.out) / backend, rows, records, plots=False)
    Path(args.result).write_text(json.dumps(result))


def compare(hf: dict, vllm: dict, args) -> None:
    """Per strategy: accuracies, their noise, wall and token ratios; then the BENCH line."""
    walls, deltas, tokens = {"hf": 0.0, "vllm": 0.0}, [], {"hf": 0, "vllm": 0}
    print(f"engine start-up: hf {hf['startup_s']:.1f}s, vllm {vllm['startup_s']:.1f}s (once per process; not in the "
          "wall times below)")
    for name in args.strategies:
        h, v = hf["strategies"][name], vllm["strategies"][name]
        hr, vr = h["row"], v["row"]
        n = len(h["correct"])
        for backend, row in (("hf", hr), ("vllm", vr)):
            walls[backend] += row["wall_s"]
            tokens[backend] += row["policy_prefill_tokens"] + row["policy_generated_tokens"]
        p = (hr["accuracy"] + vr["accuracy"]) / 2
        se = (p * (1 - p) / n) ** 0.5
        lo, hi = paired_bootstrap(h["correct"], v["correct"], seed=args.seed)
        deltas.append(100 * (vr["accuracy"] - hr["accuracy"]))
        print(f"{name}: accuracy hf {100 * hr['accuracy']:.1f} vllm {100 * vr['accuracy']:.1f} (delta "
              f"{deltas[-1]:+.1f} points; one accuracy's binomial SE at {n} problems {100 * se:.1f} points, at most "
              f"{100 * (0.25 / n) ** 0.5:.1f} (p = 0.5); paired "
              f"bootstrap 95% interval of the delta [{100 * lo:+.1f}, {100 * hi:+.1f}]); wall hf {hr['wall_s']:.1f}s "
              f"vllm {vr['wall_s']:.1f}s ({vr['wall_s'] / hr['wall_s']:.2f}x); generated "
              f"{vr['policy_generated_tokens'] / max(1, hr['policy_generated_tokens']):.2f}x, prefill "
              f"{vr['policy_prefill_tokens'] / max(1, hr['policy_prefill_tokens']):.2f}x (vllm: {v['cached']} prompt "
              "tokens from its prefix cache)", flush=True)
    print(f"BENCH engine vllm_vs_hf_wall={walls['vllm'] / walls['hf']:.3f} acc_delta={sum(deltas) / len(deltas):+.1f} "
          f"tokens_ratio={tokens['vllm'] / max(1, tokens['hf']):.3f}")


def load_prm(path, device, separator):
    """The PRM the search benchmarks use (``bench_search.find_prm``), or a random tiny one (``random``)."""
    import torch

    if path == "random":  # smoke tests only: scores are noise
        from frugal.train.lora import LoraConfig
        from frugal.inference.models import ModelConfig
        from frugal.train.prm import PRMConfig, build_prm

        torch.manual_seed(0)
        prm = build_prm(ModelConfig(name_or_path="builtin:tiny-random"), LoraConfig(r=4, alpha=8),
                        PRMConfig(separator=separator))
    else:
        from bench_search import find_prm  # a sibling script: Python puts a script's own folder on sys.path

        from frugal.evaluator.hub_prm import load_any_prm

        prm = load_any_prm(find_prm(path), None, device, separator=separator)
    return prm


if __name__ == "__main__":
    main()

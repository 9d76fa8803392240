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

Needs vLLM in the environment (``.venv-vllm``). Outputs (summary.json, results.jsonl per backend) go to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


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
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM's CPU workers: OMP_NUM_THREADS threads
    import torch

    from frugal.evaluator.backends import make_engine
    from frugal.evaluator.config import search_config
    from frugal.evaluator.engine import CountingPRM, EngineConfig
    from frugal.evaluator.harness import run_strategy, write_outputs
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig
    from frugal.train.models import ModelConfig

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or ROOT / "outputs/bench/engine" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    task = TaskConfig(name="arith", ops=["+", "-"], num_operands=3, digits=1,
                      prompt=PromptConfig(num_fewshot=args.fewshot))
    problems = load_task(task).test[args.first:args.first + args.problems]
    if not problems:
        sys.exit(f"bench_engine: --first {args.first} --problems {args.problems} selects no held-out problem")
    prm = CountingPRM(load_prm(args.prm, device, task.prompt.step_separator))
    common = dict(max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens, max_steps=args.max_steps,
                  temperature=args.temperature)
    backend_keys = {"hf": {}, "vllm": dict(dtype=args.dtype, max_model_len=args.max_model_len)}
    print(f"policy={args.model} prm={args.prm or 'newest outputs/train_prm'} problems={len(problems)} "
          f"(held-out {args.first}-{args.first + len(problems) - 1}) N={args.budget} strategies={args.strategies} "
          f"threads={args.threads} device={device}", flush=True)

    results = {}  # (backend, strategy) -> (Row, [correct per problem], cached tokens)
    for backend in args.backends:
        started = time.time()
        engine = make_engine(ModelConfig(name_or_path=args.model), EngineConfig(backend=backend, **common,
                                                                               **backend_keys[backend]),
                             device, seed=args.seed)
        torch.set_num_threads(args.threads)  # vLLM's start-up may have changed it
        print(f"[{backend}] engine start-up {time.time() - started:.1f}s (torch threads {torch.get_num_threads()})",
              flush=True)
        rows, records = [], []
        for name in args.strategies:
            cfg = search_config(name, budgets=[args.budget])
            before = engine.counts.snapshot()
            r, rec = run_strategy(name, problems, [args.budget], engine, prm, cfg, seed=args.seed,
                                  label=f"{name}@{backend}", progress=False)
            cached = engine.counts.since(before).cached
            results[backend, name] = (r[0], [x["correct"] for x in rec], cached)
            rows += r
            records += rec
            x = r[0]
            print(f"[{backend}] {name:16s} N={args.budget} acc={100 * x.accuracy:5.1f}  generated={x.policy_generated_tokens:7d} "
                  f"prefill={x.policy_prefill_tokens:7d} cached={cached:7d} prm_tokens={x.prm_tokens:7d} "
                  f"flops={x.flops_total:.3g} wall={x.wall_s:.1f}s", flush=True)
        write_outputs(out / backend, rows, records, plots=False)
        del engine

    if not {"hf", "vllm"} <= set(args.backends):
        return
    n = len(problems)
    walls, deltas, tokens = {"hf": 0.0, "vllm": 0.0}, [], {"hf": 0, "vllm": 0}
    for name in args.strategies:
        (h, hc, _), (v, vc, _) = results["hf", name], results["vllm", name]
        for backend, row in (("hf", h), ("vllm", v)):
            walls[backend] += row.wall_s
            tokens[backend] += row.policy_prefill_tokens + row.policy_generated_tokens
        p = (h.accuracy + v.accuracy) / 2
        se = (p * (1 - p) / n) ** 0.5
        lo, hi = paired_bootstrap(hc, vc, seed=args.seed)
        deltas.append(100 * (v.accuracy - h.accuracy))
        print(f"{name}: accuracy hf {100 * h.accuracy:.1f} vllm {100 * v.accuracy:.1f} (delta {deltas[-1]:+.1f} points; "
              f"one accuracy's binomial SE at {n} problems {100 * se:.1f} points; paired bootstrap 95% interval of the "
              f"delta [{100 * lo:+.1f}, {100 * hi:+.1f}]); wall hf {h.wall_s:.1f}s vllm {v.wall_s:.1f}s; generated "
              f"{v.policy_generated_tokens / max(1, h.policy_generated_tokens):.2f}x, prefill "
              f"{v.policy_prefill_tokens / max(1, h.policy_prefill_tokens):.2f}x", flush=True)
    print(f"BENCH engine vllm_vs_hf_wall={walls['vllm'] / walls['hf']:.3f} acc_delta={sum(deltas) / len(deltas):+.1f} "
          f"tokens_ratio={tokens['vllm'] / max(1, tokens['hf']):.3f}")


def load_prm(path, device, separator):
    """The PRM the search benchmarks use (``bench_search.find_prm``), or a random tiny one (``random``)."""
    import torch

    if path == "random":  # smoke tests only: scores are noise
        from frugal.train.models import LoraConfig, ModelConfig
        from frugal.train.prm import PRMConfig, build_prm

        torch.manual_seed(0)
        return build_prm(ModelConfig(name_or_path="builtin:tiny-random"), LoraConfig(r=4, alpha=8),
                         PRMConfig(separator=separator))
    from bench_search import find_prm

    from frugal.evaluator.hub_prm import load_any_prm

    return load_any_prm(find_prm(path), None, device, separator=separator)


if __name__ == "__main__":
    main()

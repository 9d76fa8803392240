"""Benchmark: SSR speculative step decoding (evaluator/strategies/ssr.py) against target-only decoding.

Default run (≈ 10–15 min on 2 shared CPU cores): draft = the embedded SmolLM2-135M-Instruct, target = the
same model + the newest LoRA adapter under outputs/train/*/*/final (``frugal train recipe=demo``; pass
``--adapter``). Held-out generated arithmetic (single-digit + and −, the demo's task family; the reply's
last number is the answer), 40 problems, the default pool of 6 hints, k = 2 paths, fast=1, greedy steps,
threshold −0.3 on the mean token log-prob (picked on training-split problems).

1. SPM once (the draft writes a first step per hint, the target scores it, top-k hints kept).
2. The same paths decoded twice: SSR (draft proposes each step, target accepts when the mean token
   log-prob ≥ threshold, else regenerates) and target-only (the target writes every step).
3. Report per mode: draft / target tokens (generated and processed), acceptance rate, FLOPs per model,
   accuracy. SPM's cost is charged to SSR only.

Last line: ``BENCH ssr target_token_ratio=<SSR target generated tokens ÷ target-only target generated
tokens> acc_delta=<SSR accuracy − target-only accuracy, points>``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluator.strategies.ssr import DEFAULT_HINTS, SSRConfig, decode, report, select_strategies  # noqa: E402
from train.checkpoint import atomic_write_text  # noqa: E402


def newest_adapter() -> str:
    found = sorted(glob.glob(str(ROOT / "outputs/train/*/*/final/adapter_config.json")), key=os.path.getmtime)
    if not found:
        raise SystemExit("no adapter under outputs/train/*/*/final: run `frugal train recipe=demo` or pass --adapter")
    return str(Path(found[-1]).parent)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="target adapter (default: newest outputs/train/*/*/final)")
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--k", type=int, default=2, help="parallel paths kept by SPM")
    ap.add_argument("--hints", type=int, default=6, help="first N hints of the default pool")
    ap.add_argument("--threshold", type=float, default=-0.3)
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--max-step-tokens", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--ops", nargs="+", default=["+", "-"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from evaluator.engine import Engine, EngineConfig
    from evaluator.flops import policy_shape
    from tasks import load_task
    from tasks.config import PromptConfig, TaskConfig
    from train.models import ModelConfig, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = args.adapter or newest_adapter()
    out = Path(args.out or ROOT / "outputs/bench_ssr" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    task = TaskConfig(name="arith", ops=list(args.ops), digits=1, test_fraction=0.3,
                      prompt=PromptConfig(answer_format="number"))
    problems = load_task(task).test[:args.problems]
    ecfg = EngineConfig(max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens,
                        max_steps=args.max_steps, batch_size=64)
    dev = torch.device("cpu")
    dm, dt = load_model(ModelConfig(name_or_path=args.draft), dev)
    tm, tt = load_model(ModelConfig(name_or_path=args.target, adapter=adapter), dev)
    draft, target = Engine(dm, dt, ecfg, "draft"), Engine(tm, tt, ecfg, "target")
    dshape, tshape = policy_shape(dm), policy_shape(tm)
    cfg = SSRConfig(hints=list(DEFAULT_HINTS[:args.hints]), threshold=args.threshold, fast=args.fast)

    t0 = time.time()
    d0, g0 = draft.counts.snapshot(), target.counts.snapshot()
    paths = select_strategies(problems, args.k, draft, target, cfg)
    ssr_results = decode(problems, paths, draft, target, cfg)
    ssr = report(problems, ssr_results, draft.counts.since(d0), target.counts.since(g0), dshape, tshape)
    t1 = time.time()
    d1, g1 = draft.counts.snapshot(), target.counts.snapshot()
    base_cfg = SSRConfig(hints=cfg.hints, threshold=cfg.threshold, fast=cfg.fast, speculative=False)
    base_results = decode(problems, paths, None, target, base_cfg)
    base = report(problems, base_results, draft.counts.since(d1), target.counts.since(g1), None, tshape)
    t2 = time.time()

    print(f"problems={len(problems)} k={args.k} hints={len(cfg.hints)} threshold={cfg.threshold} fast={cfg.fast} "
          f"adapter={adapter}")
    for name, r, secs in (("ssr", ssr, t1 - t0), ("target-only", base, t2 - t1)):
        print(f"{name:>12}: accuracy {100 * r.accuracy:.1f}%  acceptance {r.acceptance_rate:.2f} "
              f"({r.steps_accepted}/{r.steps_proposed})  draft gen {r.draft_generated} / processed "
              f"{r.draft_generated + r.draft_prefill}  target gen {r.target_generated} / processed "
              f"{r.target_generated + r.target_prefill} (scoring {r.target_scored})  FLOPs draft {r.flops_draft:.3g} "
              f"target {r.flops_target:.3g}  wall {secs:.0f}s")
    ratio = ssr.target_generated / max(1, base.target_generated)
    print(f"target FLOPs ratio (scoring included) {ssr.flops_target / max(1.0, base.flops_target):.2f}; "
          f"total FLOPs ratio {(ssr.flops_target + ssr.flops_draft) / max(1.0, base.flops_target):.2f}")
    records = [{"question": p["question"], "answer": p["answer"], "ssr": r.chosen.text, "target_only": b.chosen.text,
                "ssr_info": r.info, "target_only_info": b.info} for p, r, b in zip(problems, ssr_results, base_results)]
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(x) + "\n" for x in records))
    atomic_write_text(out / "summary.json", json.dumps({"ssr": asdict(ssr), "target_only": asdict(base),
                                                        "args": vars(args), "adapter": adapter}, indent=2))
    print(f"results in {out}")
    print(f"BENCH ssr target_token_ratio={ratio:.3f} acc_delta={100 * (ssr.accuracy - base.accuracy):.2f}")


if __name__ == "__main__":
    main()

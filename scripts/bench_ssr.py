"""Benchmark: SSR speculative step decoding (evaluator/strategies/ssr.py) against target-only decoding.

Default run (≈ 10 min on a quiet 2-core machine, ≈ 30 min with the cores shared at load ≈ 8): draft = the
embedded SmolLM2-135M-Instruct, target = the same model + the newest LoRA adapter under outputs/train/*/*/final (``frugal train recipe=demo``; pass
``--adapter``). Held-out generated arithmetic (single-digit + and −, the demo's task family; the reply's
last number is the answer), 40 problems, the default pool of 6 hints, k = 2 paths, fast=1, greedy steps.
Headline criterion ``margin:0:regen=1``: a drafted token is accepted iff it is the target's greedy token
(lossless for a greedy target, up to re-tokenisation at step boundaries); the accepted prefix of a rejected
step is kept, the target writes one token, and the draft continues the open step — token-level speculative
decoding with step-sized draft blocks. The other default criteria print the trade-off: ``margin:0`` (the
target writes the rest of a rejected step), ``mean:-0.3`` (the issue's step-level mean log-prob test)
and ``min:-2:regen=1`` (a looser token-level test).

1. SPM once (the draft writes a first step per hint, the target scores it, top-k hints kept).
2. The same paths decoded target-only (the target writes every step) and with SSR under each criterion
   of ``--criteria`` (the first one is the headline; the rest print the trade-off curve).
3. Report per mode: draft / target tokens (generated and processed), acceptance, FLOPs per model,
   accuracy. Verification is a target forward pass over prompt + path + drafted step: it is charged as
   target *prefill* tokens and FLOPs (the target-only baseline's prompt and partial-solution re-encoding
   is prefill too); SPM's cost is charged to SSR only.

Last line: ``BENCH ssr target_token_ratio=<SSR target generated tokens ÷ target-only target generated
tokens> acc_delta=<SSR accuracy − target-only accuracy, points>`` for the headline criterion.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from frugal.evaluator.strategies.ssr import DEFAULT_HINTS, SSRConfig, decode, report, select_strategies  # noqa: E402
from frugal.train.checkpoint import atomic_write_text  # noqa: E402


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
    ap.add_argument("--criteria", nargs="+", default=["margin:0:regen=1", "margin:0", "mean:-0.3", "min:-2:regen=1"],
                    help="SSR verification criteria score:threshold[:whole|:regen=N] (first = headline): "
                         "score mean|min|margin; ':whole' drops the accepted prefix of a rejected step; "
                         "':regen=N' lets the target write only N tokens after a rejection")
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--max-step-tokens", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--ops", nargs="+", default=["+", "-"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from frugal.evaluator.engine import Counts, Engine, EngineConfig
    from frugal.evaluator.flops import policy_shape
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig
    from frugal.train.models import ModelConfig, load_model

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

    def parse(spec: str) -> SSRConfig:
        score, thr, *opts = spec.split(":")
        regen = next((int(o.split("=")[1]) for o in opts if o.startswith("regen=")), None)
        return SSRConfig(hints=list(DEFAULT_HINTS[:args.hints]), score=score, threshold=float(thr), fast=args.fast,
                         keep_prefix="whole" not in opts, regen_tokens=regen)

    configs = [parse(c) for c in args.criteria]
    t0 = time.time()
    d0, g0 = draft.counts.snapshot(), target.counts.snapshot()
    paths = select_strategies(problems, args.k, draft, target, configs[0])  # SPM ranks by mean log-prob
    spm_draft, spm_target = draft.counts.since(d0), target.counts.since(g0)
    def fresh_caches():  # every run pays its own prompt prefills (the engines cache prompt KV across calls)
        draft.clear_prompt_cache()
        target.clear_prompt_cache()

    fresh_caches()
    g1 = target.counts.snapshot()
    base_cfg = SSRConfig(hints=configs[0].hints, fast=args.fast, speculative=False)
    base_results = decode(problems, paths, None, target, base_cfg)
    base = report(problems, base_results, Counts(), target.counts.since(g1), None, tshape)
    print(f"problems={len(problems)} k={args.k} hints={len(configs[0].hints)} fast={args.fast} adapter={adapter}")
    print(f"{'target-only':>22}: accuracy {100 * base.accuracy:.1f}%  target gen {base.target_generated} / processed "
          f"{base.target_generated + base.target_prefill}  FLOPs target {base.flops_target:.3g}  wall {time.time() - t0:.0f}s")
    runs = []
    for spec, cfg in zip(args.criteria, configs):
        t1 = time.time()
        fresh_caches()
        d1, g1 = draft.counts.snapshot(), target.counts.snapshot()
        res = decode(problems, paths, draft, target, cfg)
        dc, gc = draft.counts.since(d1), target.counts.since(g1)
        for c, spm in ((dc, spm_draft), (gc, spm_target)):  # SPM's drafting and scoring belong to every SSR run
            c.prefill, c.decode, c.attention = c.prefill + spm.prefill, c.decode + spm.decode, c.attention + spm.attention
        r = report(problems, res, dc, gc, dshape, tshape)
        kept = sum(x.info["accepted_tokens"] for x in res) / max(1, r.draft_generated)
        ratio = r.target_generated / max(1, base.target_generated)
        runs.append((spec, r, res, ratio))
        print(f"{'ssr ' + spec:>22}: accuracy {100 * r.accuracy:.1f}% (delta {100 * (r.accuracy - base.accuracy):+.1f})  "
              f"target gen ratio {ratio:.3f}  steps accepted whole {r.acceptance_rate:.2f} "
              f"({r.steps_accepted}/{r.steps_proposed}), drafted tokens kept {kept:.2f}  draft gen {r.draft_generated}  "
              f"target gen {r.target_generated} / processed {r.target_generated + r.target_prefill} (verification "
              f"{r.target_scored})  FLOPs target {r.flops_target / max(1.0, base.flops_target):.2f}x, target+draft "
              f"{(r.flops_target + r.flops_draft) / max(1.0, base.flops_target):.2f}x  wall {time.time() - t1:.0f}s")
    spec, ssr, ssr_results, ratio = runs[0]
    records = [{"question": p["question"], "answer": p["answer"], "ssr": r.chosen.text, "target_only": b.chosen.text,
                "ssr_info": r.info, "target_only_info": b.info} for p, r, b in zip(problems, ssr_results, base_results)]
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(x) + "\n" for x in records))
    atomic_write_text(out / "summary.json", json.dumps({"ssr": {s_: asdict(r_) for s_, r_, _, _ in runs},
                                                        "target_only": asdict(base), "args": vars(args),
                                                        "adapter": adapter}, indent=2))
    print(f"results in {out}")
    print(f"headline criterion: {spec}")
    print(f"BENCH ssr target_token_ratio={ratio:.3f} acc_delta={100 * (ssr.accuracy - base.accuracy):.2f}")


if __name__ == "__main__":
    main()

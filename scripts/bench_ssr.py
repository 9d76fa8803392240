"""Benchmark: SSR speculative step decoding (evaluator/strategies/ssr.py) against target-only decoding.

Default run (about 35 min on a shared 2-core machine; the figures are token and FLOPs counts, not times):
draft = the embedded SmolLM2-135M-Instruct, target = the same model + the newest LoRA adapter under
outputs/train/*/*/final (``frugal train recipe=demo``; pass ``--adapter``), PRM = the newest
outputs/train_prm/*/*/final (``--prm``). Held-out generated arithmetic (single-digit + and −, two operands,
the demo's task family; the reply's last number is the answer): all 70 problems of the test split, asked
after 3 worked solutions (``--fewshot 3``: the models write one equation per step, the format the PRM was
trained on), the default pool of 6 hints, k = 2 paths, fast=1, greedy steps.

Headline criterion ``prm:0.5`` (reward-guided speculative decoding): the PRM judges each drafted step and
ranks the SPM's hints, and the target runs only to rewrite a rejected step. It is the one mode whose
target FLOPs can fall well below target-only decoding's: in every other mode the target reads each drafted
token, which costs it about the FLOPs of writing it. The other default criteria: ``margin:0:regen=1`` (a
drafted token is accepted iff it is the target's greedy token — lossless for a greedy target, up to
re-tokenisation at step boundaries; the accepted prefix of a rejected step is kept, the target writes one
token, the draft continues: token-level speculative decoding with step-sized draft blocks), ``margin:0``
(the target writes the rest of a rejected step), ``mean:-0.3`` (the issue's step-level mean log-prob test)
and ``min:-2:regen=1`` (a looser token-level test).

1. SPM once for the target-only baseline's paths (ranked by the target's mean log-prob): the same paths
   decoded by the target alone (the target writes every step; SPM not charged to it).
2. Each criterion of ``--criteria`` (the first is the headline) runs SPM + SSD with fresh caches, every
   token of every model charged (draft, target, and the PRM for ``prm:<τ>``). Verification is one target
   pass over the drafted tokens on the target's cached prefix (``Engine.score``; persistent per-candidate
   KV, ``engine.kv_cache_tokens``), so the target's prefill is about the drafted tokens, not the whole path
   again.
3. ``--self-draft-layers k``: ``--self-draft-criterion`` (``margin:0:regen=1``) with the self-speculative
   draft, the target cut to its first k decoder layers (LayerSkip; ``ssr.self_draft``): acceptance and
   FLOPs ratios.

Printed last: ``CRITERION ssr criterion=<spec> acceptance_rate=<r> drafted_tokens_kept=<r>
target_token_ratio=<r> target_flops_ratio=<r> prm_flops_ratio=<r> total_flops_ratio=<r> acc_delta=<points>``
per criterion, a ``SELF ssr draft_layers=<k> criterion=<spec> …`` line per k, then
``BENCH ssr target_token_ratio=<r> target_flops_ratio=<r> total_flops_ratio=<r> acc_delta=<points>`` for
the headline criterion: target generated tokens, target FLOPs and all models' FLOPs (draft + target + PRM)
of SSR ÷ those of target-only decoding of the same problems, and SSR accuracy − target-only accuracy. With
today's offline pairing the draft is as large as the target (SmolLM2-135M both), so ``total_flops_ratio``
cannot fall below 1 however many tokens are accepted: the draft runs every drafted token through a model as
costly as the target (and the SPM drafts a first step for every hint). The self-speculative draft is the
smaller offline draft; it picks its own SPM hints, so its accuracy delta also reflects a different choice
of paths.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from frugal.evaluator.strategies.ssr import (DEFAULT_HINTS, SSRConfig, decode, report, select_strategies,  # noqa: E402
                                            self_draft)
from frugal.runtime.io import atomic_write_text  # noqa: E402


def newest_adapter() -> str:
    found = sorted(glob.glob(str(ROOT / "outputs/train/*/*/final/adapter_config.json")), key=os.path.getmtime)
    if not found:
        raise SystemExit("no adapter under outputs/train/*/*/final: run `frugal train recipe=demo` or pass --adapter")
    return str(Path(found[-1]).parent)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--target", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None,
                    help="target adapter (default: newest outputs/train/*/*/final; 'none': the target without one)")
    ap.add_argument("--problems", type=int, default=70, help="held-out problems (70: the whole test split)")
    ap.add_argument("--k", type=int, default=2, help="parallel paths kept by SPM")
    ap.add_argument("--hints", type=int, default=6, help="first N hints of the default pool")
    ap.add_argument("--criteria", nargs="+",
                    default=["prm:0.5", "margin:0:regen=1", "margin:0", "mean:-0.3", "min:-2:regen=1"],
                    help="SSR verification criteria score:threshold[:whole|:regen=N] (first = headline): "
                         "score mean|min|margin|prm; ':whole' drops the accepted prefix of a rejected step; "
                         "':regen=N' lets the target write only N tokens after a rejection; prm:<τ> lets the PRM "
                         "(--prm) judge each step, the target rewriting only rejected ones")
    ap.add_argument("--prm", default=None,
                    help="PRM folder for prm:<τ> criteria (default: the newest outputs/train_prm/*/*/final)")
    ap.add_argument("--fast", type=int, default=1)
    ap.add_argument("--sample", action="store_true",
                    help="sample the steps at the engines' temperature (search.ssr.greedy=false) instead of greedy")
    ap.add_argument("--max-step-tokens", type=int, default=24)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--ops", nargs="+", default=["+", "-"])
    ap.add_argument("--operands", type=int, default=2)
    ap.add_argument("--fewshot", type=int, default=3,
                    help="worked examples before each question (task.prompt.num_fewshot): with 3 the models write "
                         "one equation per step, the format `frugal train-prm`'s PRM was trained on")
    ap.add_argument("--self-draft-layers", type=int, nargs="*", default=[20],
                    help="also run --self-draft-criterion with the target cut to its first k layers as the draft "
                         "(self-speculative, LayerSkip); none: skip")
    ap.add_argument("--self-draft-criterion", default="margin:0:regen=1",
                    help="the criterion of the self-speculative runs (the target verifies, so the acceptance rate "
                         "says how well the cut target predicts the full one)")
    ap.add_argument("--self-draft-tokens", type=int, default=4,
                    help="draft tokens per round for the self-speculative runs (search.ssr.draft_tokens; 0: the "
                         "whole step). An untrained early exit is a weak draft: short blocks waste less verification")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    def parse(spec: str) -> SSRConfig:
        score, thr, *opts = spec.split(":")
        regen = next((int(o.split("=")[1]) for o in opts if o.startswith("regen=")), None)
        return SSRConfig(hints=list(DEFAULT_HINTS[:args.hints]), score=score, threshold=float(thr), fast=args.fast,
                         keep_prefix="whole" not in opts, regen_tokens=regen, greedy=not args.sample)

    def checked(flag: str, spec: str) -> SSRConfig:  # a malformed spec or a refused setting, named
        try:
            return parse(spec)
        except ValueError as err:
            ap.error(f"{flag} {spec!r}: {err} (a criterion is score:threshold[:whole|:regen=N])")

    configs = [checked("--criteria", c) for c in args.criteria]
    self_cfg = checked("--self-draft-criterion", args.self_draft_criterion)

    import torch

    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.inference.engine import Counts, Engine
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.evaluator.flops import policy_shape, prm_shape
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig
    from frugal.inference.models import ModelConfig, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    adapter = None if args.adapter == "none" else (args.adapter or newest_adapter())
    out = Path(args.out or ROOT / "outputs/bench_ssr" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    task = TaskConfig(name="arith", ops=list(args.ops), num_operands=args.operands, digits=1, test_fraction=0.3,
                      prompt=PromptConfig(answer_format="number", num_fewshot=args.fewshot))
    problems = load_task(task).test[:args.problems]
    ecfg = HFEngineConfig(max_new_tokens=args.max_new_tokens, max_step_tokens=args.max_step_tokens,
                        max_steps=args.max_steps, batch_size=64)
    dev = torch.device("cpu")
    dm, dt = load_model(ModelConfig(name_or_path=args.draft), dev)
    tm, tt = load_model(ModelConfig(name_or_path=args.target, adapter=adapter), dev)
    draft, target = HFEngine(dm, dt, ecfg, "draft"), HFEngine(tm, tt, ecfg, "target")
    dshape, tshape = policy_shape(dm), policy_shape(tm)

    prm = pshape = None
    if any(c.score == "prm" for c in configs + ([self_cfg] if args.self_draft_layers else [])):  # reward-guided: the PRM judges, counted with its own shape
        from bench_search import find_prm

        from frugal.evaluator.hub_prm import load_any_prm

        args.prm = find_prm(args.prm)
        prm = CountingPRM(load_any_prm(args.prm, device=dev))
        pshape = prm_shape(prm.prm)
    t0 = time.time()

    def fresh_caches(*engines):  # every run pays its own prompt prefills and candidate KV
        for e in engines:
            e.clear_cache()

    # SPM once for the paths that the target-only baseline decodes (not charged to it)
    # (ranked by the target's mean log-prob, whatever the criteria: the paths do not depend on their order)
    paths = select_strategies(problems, args.k, draft, target, replace(configs[0], score="margin", threshold=0.0))
    fresh_caches(draft, target)
    g1 = target.counts.snapshot()
    base_cfg = SSRConfig(hints=configs[0].hints, fast=args.fast, speculative=False, greedy=not args.sample)
    base_results = decode(problems, paths, None, target, base_cfg)
    base = report(problems, base_results, Counts(), target.counts.since(g1), None, tshape)
    print(f"problems={len(problems)} operands={args.operands} fewshot={args.fewshot} k={args.k} "
          f"hints={len(configs[0].hints)} fast={args.fast} adapter={adapter}")
    print(f"{'target-only':>22}: accuracy {100 * base.accuracy:.1f}%  target gen {base.target_generated} / processed "
          f"{base.target_generated + base.target_prefill}  FLOPs target {base.flops_target:.3g}  wall {time.time() - t0:.0f}s")

    def run_ssr(spec, cfg, drafter, dshape_):
        """SPM + SSD with fresh caches; every token either engine runs (SPM included) is charged."""
        t1 = time.time()
        fresh_caches(drafter, target)
        d1, g1 = drafter.counts.snapshot(), target.counts.snapshot()
        p1 = prm.counts.snapshot() if prm is not None else None
        gate = prm if cfg.score == "prm" else None
        res = decode(problems, select_strategies(problems, args.k, drafter, target, cfg, prm=gate), drafter, target,
                     cfg, prm=gate)
        r = report(problems, res, drafter.counts.since(d1), target.counts.since(g1), dshape_, tshape,
                   prm.counts.since(p1) if gate is not None else None, pshape)
        kept = sum(x.info["accepted_tokens"] for x in res) / max(1, r.draft_generated)
        ratio = r.target_generated / max(1, base.target_generated)
        tflops = r.flops_target / max(1.0, base.flops_target)
        total = (r.flops_target + r.flops_draft + r.flops_prm) / max(1.0, base.flops_target)
        print(f"{'ssr ' + spec:>22}: accuracy {100 * r.accuracy:.1f}% (delta {100 * (r.accuracy - base.accuracy):+.1f})  "
              f"target gen ratio {ratio:.3f}  steps accepted whole {r.acceptance_rate:.2f} "
              f"({r.steps_accepted}/{r.steps_proposed}), drafted tokens kept {kept:.2f}  draft gen {r.draft_generated}  "
              f"target gen {r.target_generated} / prefill {r.target_prefill}  FLOPs target {tflops:.3f}x, "
              f"target+draft{'+prm' if gate is not None else ''} {total:.3f}x  wall {time.time() - t1:.0f}s", flush=True)
        return {"spec": spec, "report": r, "results": res, "token_ratio": ratio, "target_flops_ratio": tflops,
                "total_flops_ratio": total, "drafted_tokens_kept": kept}

    runs = [run_ssr(spec, cfg, draft, dshape) for spec, cfg in zip(args.criteria, configs)]
    selfs = []
    for k in args.self_draft_layers:  # self-speculative: the target cut to its first k layers drafts
        drafter = HFEngine(self_draft(tm, k), tt, ecfg, "draft")
        scfg = replace(self_cfg, draft_tokens=args.self_draft_tokens or None)
        selfs.append(run_ssr(f"self[:{k}] {args.self_draft_criterion}", scfg, drafter, policy_shape(drafter.model)))
        selfs[-1]["layers"] = k
    head = runs[0]
    records = [{"question": p["question"], "answer": p["answer"], "ssr": r.chosen.text, "target_only": b.chosen.text,
                "ssr_info": r.info, "target_only_info": b.info}
               for p, r, b in zip(problems, head["results"], base_results)]
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(x) + "\n" for x in records))
    strip = lambda x: {k: (asdict(v) if k == "report" else v) for k, v in x.items() if k != "results"}  # noqa: E731
    atomic_write_text(out / "summary.json", json.dumps({"ssr": [strip(x) for x in runs],
                                                        "self_draft": [strip(x) for x in selfs],
                                                        "target_only": asdict(base), "args": vars(args),
                                                        "adapter": adapter}, indent=2))
    print(f"results in {out}")
    print(f"headline criterion: {head['spec']} (draft {args.draft}: as large as the target, so target + draft "
          f"FLOPs cannot fall below the target-only baseline's)")

    def ratios(x) -> str:
        r = x["report"]
        return (f"acceptance_rate={r.acceptance_rate:.3f} drafted_tokens_kept={x['drafted_tokens_kept']:.3f} "
                f"target_token_ratio={x['token_ratio']:.3f} target_flops_ratio={x['target_flops_ratio']:.3f} "
                f"prm_flops_ratio={r.flops_prm / max(1.0, base.flops_target):.3f} "
                f"total_flops_ratio={x['total_flops_ratio']:.3f} acc_delta={100 * (r.accuracy - base.accuracy):.2f}")

    for x in runs:
        print(f"CRITERION ssr criterion={x['spec']} {ratios(x)}")
    for x in selfs:
        print(f"SELF ssr draft_layers={x['layers']} criterion={args.self_draft_criterion} {ratios(x)}")
    r = head["report"]
    print(f"BENCH ssr target_token_ratio={head['token_ratio']:.3f} target_flops_ratio={head['target_flops_ratio']:.3f} "
          f"total_flops_ratio={head['total_flops_ratio']:.3f} acc_delta={100 * (r.accuracy - base.accuracy):.2f}")


if __name__ == "__main__":
    main()

"""Search benchmark: accuracy and compute of best-of-N, early rejection, beam search and particle
filtering with the embedded policy and a trained PRM, on the arithmetic task.

Default run (sized for a shared, busy 2-core CPU: about 30–40 minutes there): policy
builtin:smollm2-135m-instruct, the first 12 held-out problems of `arith` with 3 one-digit operands and
+ − (the task `frugal train-prm` trains its PRM on; graded on the stated answer, ``\boxed{…}``, the
task's default format — ``--answer-format number`` reads the reply's last number instead, which grades a
reply that stopped after its first equation by that intermediate result),
prompted with 3 worked solutions as earlier chat turns (``--fewshot``, ``task.prompt.num_fewshot``) so that
the policy writes one equation per step, the format the PRM was trained on (asked the bare question it
writes prose that the PRM cannot judge, and every strategy is then a lottery),
budgets N ∈ {4, 8, 16}, completions of at most 48 tokens (steps of at most 32), and these settings, which
differ from the issue's defaults (τ = 64, beam width 4) because of the task, not to tune the result:

* early rejection with τ = 8 tokens and rejection rate 0.875 (keep N/8, at least one): the few-shot
  policy's replies are ~28 tokens, so τ = 64 would cover whole solutions and nothing could be rejected
  early; τ = 8 is the first equation (where these replies differ most). With τ a third of a reply,
  keeping N/4 (the beam width) generates 0.46× best-of-N's tokens but, with the PRM's partial and final
  scoring on top, costs ~0.6× its FLOPs: halving the compute takes the higher rate (``--rejection-rate``;
  a negative value keeps N // beam width);
* beam search with beam width 4; particle filtering with T = 1, systematic resampling when ESS < N/2,
  answer = weighted majority of the final particles' scores (the `ParticleFilterConfig` defaults; the answer rule
  was chosen on the development set ``--first 48``, see ``search.final``); greedy as the reference point.
  Weighted best-of-N (the same answer rule on best-of-N's own candidates) is printed for reference.

The 3-shot prompts share their first ~180 of ~193 tokens: the engine prefills that shared prefix once per
(strategy, budget, chunk of problems) and each problem's own ~13 tokens over it (prefix caching, as a
serving engine does; ``engine.shared_prefix_min_tokens``), so FLOPs measure the search, not re-reading
the examples.

Every strategy at every budget is measured in this run, with the same seed, and the engine samples each
candidate from its own random stream (``frugal.inference.decoding.StreamSampling``), so the comparisons are paired:
early rejection's survivors are best-of-N's own candidates and particle filtering's first steps are
theirs. With 12 problems one problem is ~8 accuracy points, so the accuracy deltas are noisy: scale up
with --problems (and --budgets, --max-new-tokens) on a bigger machine.

Before / after per-candidate KV reuse (``--before``, default on): every strategy runs twice on the same
problems with the same seed, once with ``engine.kv_cache_tokens=0`` (each engine call re-encodes each
candidate's partial solution: the engine before the store) and once with the store; the lines print
prefill tokens per generated token before → after per strategy and N, the early-rejection / best-of-N
FLOPs ratio per N both ways, and how many chosen solutions differ (expected 0: the same seed writes the
same text). The headline numbers (BENCH) are those of the run with the store.

Prints one line per strategy and budget, the ratios, and last:

    BENCH search er_flops_ratio=<ER FLOPs ÷ BoN FLOPs> er_acc_delta=<ER − BoN, points>
                 pf_minus_bon=<PF − BoN, points> pf_minus_beam=<PF − beam, points>
                 er_flops_ratio_mean=<mean over N of the per-N ER ÷ BoN FLOPs ratios>

FLOPs are policy + PRM (``frugal.evaluator.flops``), ``er_flops_ratio`` of the sums over the budgets; accuracy deltas are means over
the budgets (same N, so about equal policy tokens for BoN, beam and PF — the generated-token ratios are
printed next to them). Outputs (summary.json, results.jsonl, accuracy_vs_flops.png) go to --out.

    python scripts/bench_search.py --prm outputs/train_prm/<date>/<time>/final
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prm", default=None, help="PRM folder (default: the newest outputs/train_prm/*/*/final)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="policy LoRA adapter folder (e.g. from frugal train)")
    ap.add_argument("--fewshot", type=int, default=3,
                    help="worked examples before each question (task.prompt.num_fewshot; 0 = the bare question)")
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("--first", type=int, default=0,
                    help="index of the first held-out problem: problems [first, first + problems); a development set "
                         "for choosing settings is one the report does not use (e.g. --first 48 next to --problems 48)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--ops", nargs="+", default=["+", "-"])
    ap.add_argument("--operands", type=int, default=3)
    ap.add_argument("--answer-format", default="boxed", choices=["boxed", "number"],
                    help="task.prompt.answer_format: boxed (the stated answer) | number (the reply's last number)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-step-tokens", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--tau", type=int, default=8)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--rejection-rate", type=float, default=0.875,
                    help="early rejection: share of candidates dropped at tau (search.rejection_rate; <0 = N // beam width kept)")
    ap.add_argument("--aggregation", default="last")
    ap.add_argument("--pf-weight-temperature", type=float, default=None,
                    help="particle filtering's weight temperature T (search.weight_temperature; default: the config's)")
    ap.add_argument("--pf-ess", type=float, default=None, help="particle filtering ESS threshold (default: the config's)")
    ap.add_argument("--pf-final", default=None, help="particle filtering final pick: best|weighted_majority")
    ap.add_argument("--strategies", nargs="+", default=["best_of_n", "early_rejection", "particle_filter", "beam", "greedy"])
    ap.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="engine.kv_cache_tokens of the measured run (default: the EngineConfig default)")
    ap.add_argument("--before", action=argparse.BooleanOptionalAction, default=True,
                    help="also run every strategy with engine.kv_cache_tokens=0 (every call re-encodes each "
                         "candidate's partial solution: the engine before per-candidate KV reuse) and print "
                         "prefill tokens per generated token before / after, same problems and seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared, busy machine; raise it on a free one)")
    ap.add_argument("--out", default=None, help="output folder (default outputs/bench/search/<time>)")
    return ap.parse_args(argv)


def find_prm(path):
    if path:
        return path
    found = sorted(glob.glob(str(ROOT / "outputs/train_prm/*/*/final/prm.json")), key=os.path.getmtime)
    if not found:
        sys.exit("bench_search: no PRM found; train one with `frugal train-prm` or pass --prm <folder>")
    return str(Path(found[-1]).parent)


def weighted_best_of_n(records, problems, budget, aggregation) -> float:
    """Accuracy of weighted best-of-N (answer = argmax_a of the summed solution scores) on the candidates
    best-of-N drew at ``budget``: the same samples, picked by particle filtering's default answer rule."""
    from frugal.evaluator.config import search_config
    from frugal.inference.engine import Candidate
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.evaluator.strategies.best_of_n import select
    from frugal.rewards.verify import is_correct

    cfg = search_config("best_of_n", weighted=True, aggregation=aggregation)
    row_of = {row["id"]: row for row in problems}
    right = []
    for rec in records:
        if rec["strategy"] != "best_of_n" or rec["budget"] != budget:
            continue
        row = row_of[rec["id"]]
        group = [Candidate(0, c["text"], c["tokens"], c["finished"], list(c["scores"])) for c in rec["candidates"]]
        chosen = select(group, [row], cfg).chosen
        right.append(is_correct(chosen.text, str(row["answer"]), row.get("answer_format", "boxed")))
    return sum(right) / max(1, len(right))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from frugal.evaluator.config import SEARCH_VARIANTS, search_config
    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.inference.engine import EngineConfig
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.evaluator.harness import run_strategy, write_outputs
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig
    from frugal.inference.models import ModelConfig, load_model
    from frugal.runtime.config import own_keys
    from frugal.train.prm import load_prm

    if args.threads:
        torch.set_num_threads(args.threads)
    prm_path = find_prm(args.prm)
    out = Path(args.out or ROOT / "outputs/bench/search" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = TaskConfig(name="arith", ops=list(args.ops), num_operands=args.operands, digits=1,
                      prompt=PromptConfig(answer_format=args.answer_format, num_fewshot=args.fewshot))
    problems = load_task(task).test[args.first:args.first + args.problems]
    if args.first < 0 or not problems:
        sys.exit(f"bench_search: --first {args.first} --problems {args.problems} selects no held-out problem "
                 f"(the test split has {len(load_task(task).test)})")
    model, tok = load_model(ModelConfig(name_or_path=args.model, adapter=args.adapter), device)
    ecfg = dict(max_new_tokens=args.max_new_tokens, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                temperature=args.temperature)
    if args.kv_cache_tokens is not None:
        ecfg["kv_cache_tokens"] = args.kv_cache_tokens
    engine = HFEngine(model, tok, HFEngineConfig(**ecfg))
    before_engine = HFEngine(model, tok, HFEngineConfig(**{**ecfg, "kv_cache_tokens": 0})) if args.before else None
    prm = CountingPRM(load_prm(prm_path, device))
    print(f"policy={args.model} prm={prm_path} problems={len(problems)} budgets={args.budgets} "
          f"max_new_tokens={args.max_new_tokens} tau={args.tau} beam_width={args.beam_width} "
          f"rejection_rate={args.rejection_rate}", flush=True)

    pf_overrides = {k: v for k, v in (("weight_temperature", args.pf_weight_temperature), ("ess_threshold", args.pf_ess),
                                      ("final", args.pf_final)) if v is not None}
    pf = search_config("particle_filter", **pf_overrides)
    print(f"task=arith problems {args.first}-{args.first + len(problems) - 1} of the test split, operands={args.operands} ops={args.ops} (one digit) fewshot={args.fewshot} answer_format={args.answer_format} particle_filter: T={pf.weight_temperature} "
          f"ess_threshold={pf.ess_threshold} resampling={pf.resampling} final={pf.final}", flush=True)
    rows, records, before_rows, changed = [], [], [], {}

    def per_token(row):
        return row.policy_prefill_tokens / max(1, row.policy_generated_tokens)

    knobs = {"budgets": list(args.budgets), "aggregation": args.aggregation, "tau": args.tau,
             "beam_width": args.beam_width, "rejection_rate": args.rejection_rate if args.rejection_rate >= 0 else None,
             **pf_overrides}
    for name in args.strategies:  # each strategy takes the flags it reads (its own keys)
        cfg = search_config(name, **{k: v for k, v in knobs.items() if k in own_keys(SEARCH_VARIANTS[name])})
        budgets = [1] if name == "greedy" else list(args.budgets)
        r, rec = run_strategy(name, problems, budgets, engine, prm if name != "greedy" else None, cfg,
                              seed=args.seed, progress=False)
        rows += r
        records += rec
        old_rows = {}
        if before_engine is not None:
            b_rows, b_rec = run_strategy(name, problems, budgets, before_engine, prm if name != "greedy" else None,
                                         cfg, seed=args.seed, progress=False)
            old_rows = {x.budget: x for x in b_rows}
            before_rows.extend(b_rows)
            changed[name] = sum(a["chosen"] != b["chosen"] for a, b in zip(rec, b_rec))
        for x in r:
            print(f"{name:16s} N={x.budget:<3d} acc={100 * x.accuracy:5.1f}  generated={x.policy_generated_tokens:7d} "
                  f"prefill={x.policy_prefill_tokens:7d} prm_tokens={x.prm_tokens:7d} "
                  f"flops_policy={x.flops_policy:.3g} flops_prm={x.flops_prm:.3g} wall={x.wall_s:.0f}s", flush=True)
            if x.budget in old_rows:
                o = old_rows[x.budget]
                print(f"{'':16s}       prefill per generated token: before {per_token(o):.3f} -> after {per_token(x):.3f} "
                      f"(re-prefilled after eviction: {x.models['policy']['reprefill']}; policy FLOPs "
                      f"{x.flops_policy / max(1.0, o.flops_policy):.3f}x; wall {o.wall_s:.0f}s -> {x.wall_s:.0f}s)",
                      flush=True)
    write_outputs(out, rows, records)

    def at(name, budget):
        return next(x for x in rows if x.strategy == name and x.budget == budget)

    budgets = list(args.budgets)
    have = {x.strategy for x in rows}
    metrics = {}
    if {"best_of_n", "early_rejection"} <= have:
        er = sum(at("early_rejection", b).flops_total for b in budgets)
        bon = sum(at("best_of_n", b).flops_total for b in budgets)
        metrics["er_flops_ratio"] = er / bon
        metrics["er_acc_delta"] = sum(100 * (at("early_rejection", b).accuracy - at("best_of_n", b).accuracy)
                                      for b in budgets) / len(budgets)
        print(f"early rejection vs best-of-N: FLOPs ratio {er / bon:.3f} ({bon / er:.2f}x fewer), "
              f"accuracy delta {metrics['er_acc_delta']:+.1f} points (mean over N={budgets})")
        ratios = [at("early_rejection", b).flops_total / at("best_of_n", b).flops_total for b in budgets]
        metrics["er_flops_ratio_mean"] = sum(ratios) / len(ratios)
        print("early rejection / best-of-N FLOPs per N: " + " ".join(f"N={b}: {x:.3f}" for b, x in zip(budgets, ratios))
              + f"  (mean of the per-N ratios {metrics['er_flops_ratio_mean']:.3f})")
        if before_rows:
            old = {(x.strategy, x.budget): x for x in before_rows}
            olds = [old[("early_rejection", b)].flops_total / old[("best_of_n", b)].flops_total for b in budgets]
            print("  the same without per-candidate KV (kv_cache_tokens=0): "
                  + " ".join(f"N={b}: {x:.3f}" for b, x in zip(budgets, olds)))
    for peer, key in (("best_of_n", "pf_minus_bon"), ("beam", "pf_minus_beam")):
        if {"particle_filter", peer} <= have:
            deltas = [100 * (at("particle_filter", b).accuracy - at(peer, b).accuracy) for b in budgets]
            tokens = [at("particle_filter", b).policy_generated_tokens / max(1, at(peer, b).policy_generated_tokens)
                      for b in budgets]
            metrics[key] = sum(deltas) / len(deltas)
            print(f"particle filtering vs {peer}: accuracy delta per N {[round(d, 1) for d in deltas]} points, "
                  f"generated-token ratio per N {[round(t, 2) for t in tokens]}")
    if "best_of_n" in have:  # the answer rule of particle filtering's default, applied to best-of-N's pool
        weighted = [weighted_best_of_n(records, problems, b, args.aggregation) for b in budgets]
        print("weighted best-of-N (search.weighted=true, re-picked from the same candidates; not in the BENCH line): "
              + " ".join(f"N={b}: {100 * a:.1f}%" for b, a in zip(budgets, weighted)))
    print("per budget: N | accuracy % (" + " ".join(s for s in args.strategies if s != "greedy")
          + ") | ER/BoN FLOPs | PF/BoN, PF/beam generated tokens")
    for b in budgets:
        accs = " ".join(f"{100 * at(s, b).accuracy:5.1f}" for s in args.strategies if s != "greedy" and s in have)
        er = (f"{at('early_rejection', b).flops_total / at('best_of_n', b).flops_total:.3f}"
              if {"best_of_n", "early_rejection"} <= have else "-")
        toks = " ".join(f"{at('particle_filter', b).policy_generated_tokens / max(1, at(p, b).policy_generated_tokens):.2f}"
                        for p in ("best_of_n", "beam") if {"particle_filter", p} <= have)
        print(f"  N={b:<3d} | {accs} | {er} | {toks or '-'}")
    if before_rows:
        old = {(x.strategy, x.budget): x for x in before_rows}
        print("prefill tokens per generated token, before (kv_cache_tokens=0) -> after, per strategy and N:")
        for x in rows:
            o = old[(x.strategy, x.budget)]
            print(f"  {x.strategy:16s} N={x.budget:<3d} {per_token(o):7.3f} -> {per_token(x):7.3f}")
        print("chosen solutions that differ between before and after (same seed; expected 0): "
              + " ".join(f"{k}={v}" for k, v in changed.items()))
    print(f"outputs in {out} (accuracy_vs_flops.png, summary.json, results.jsonl)")
    fmt = lambda k: f"{round(metrics[k], 3) + 0.0:.3f}" if k in metrics else "nan"  # noqa: E731 (+0.0: no "-0.000")
    print(f"BENCH search er_flops_ratio={fmt('er_flops_ratio')} er_acc_delta={fmt('er_acc_delta')} "
          f"pf_minus_bon={fmt('pf_minus_bon')} pf_minus_beam={fmt('pf_minus_beam')} "
          f"er_flops_ratio_mean={fmt('er_flops_ratio_mean')}")


if __name__ == "__main__":
    main()

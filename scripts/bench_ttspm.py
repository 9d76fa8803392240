"""Benchmark: does the TTSPM (evaluator/ttspm.py) predict test-time scaling from 4 pilots, and does
``budget=auto`` save samples?

Default run (≈ 12 min of sampling on a quiet 2-core machine, 40+ min with the cores shared at load ≈ 8;
``--problems 80`` halves it): the embedded SmolLM2-135M-Instruct on the held-out (test) split of generated
arithmetic, single-digit operands with ops +, − and × (the reply's last number is the answer): all 160
held-out problems of that space. Why this task: two-digit addition is almost never solved (per-sample
accuracy ≈ 2%, coverage@8 ≈ 12%: a flat curve), while single-digit problems give per-sample accuracy
≈ 10–15% with coverage@8 ≈ 50–70%, far from saturated, so all of N ∈ {8, 16, 32} are informative. Why 160
problems: the forecast's own sampling error (4 pilots per problem) shrinks as 1/√problems; at 80 problems
its bootstrap spread was larger than the 3-point target.

Honest protocol: the forecast form (the default ``beta``) was fixed on a development set — the train
split of the same space (``--split train``: 140 other problems) — before this held-out run was analysed.
1. One engine call draws 4 + 32 solutions per problem (evaluator engine, temperature 1.0, 12 new tokens);
   each is graded by the training verifier. Columns 0–3 are the pilots, columns 4–35 the measurement pool
   (independent draws).
2. Predicted accuracy at N ∈ {8, 16, 32} from the pilots only (a Beta prior over problems fitted by
   beta-binomial maximum likelihood, the default; the zero-inflated Beta mixture, the pooled MLE and the
   paper's plug-in forms are printed too) against the measured coverage (pass@N: is any of N
   samples correct — what F(N) models, i.e. best-of-N with an oracle verifier), measured on the pool with
   the unbiased estimator 1 − C(32 − c, N)/C(32, N) (the mean over all N-subsets of the 32 samples).
3. ``budget=auto``: each problem starts from its 4 pilots and draws more samples one at a time from its
   pool until a verified success (the oracle verifier, matching the metric), until the predicted gain of
   one more sample a/(a + b + n) < eps (plain Beta prior fitted on the pilots), or until the fixed best budget
   (the N in {8, 16, 32} with the highest measured accuracy; the smallest such N on a tie) — pilots count
   as samples. Compared with that fixed budget's accuracy and samples.

Last line: ``BENCH ttspm max_abs_err=<points> auto_acc_delta=<points> auto_sample_ratio=<x>``.
Scale up with ``--problems 200 --samples 64``; ``--load samples.json`` re-analyses a saved run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluator.ttspm import FORMS, TTSPM, AutoBudget, adaptive_sampling, pass_at_n, sample_correctness  # noqa: E402
from train.checkpoint import atomic_write_text  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--problems", type=int, default=160)
    ap.add_argument("--pilots", type=int, default=4)
    ap.add_argument("--samples", type=int, default=32, help="measurement samples per problem (max budget)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples of the problems")
    ap.add_argument("--form", default="beta", choices=list(FORMS), help="the headline forecast form")
    ap.add_argument("--eps", type=float, default=0.01, help="auto budget: smallest worthwhile gain per sample")
    ap.add_argument("--ops", nargs="+", default=["+", "-", "*"])
    ap.add_argument("--digits", type=int, default=1)
    ap.add_argument("--operands", type=int, default=2, help="operands per problem")
    ap.add_argument("--fewshot", type=int, default=0,
                    help="worked examples before each question (task.prompt.num_fewshot; 0 = the bare question)")
    ap.add_argument("--split", default="test", choices=["test", "train"],
                    help="problems: the held-out (test) split, or the train split as a development set")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run dir (default outputs/bench_ttspm/<time>)")
    ap.add_argument("--load", default=None, help="samples.json of an earlier run: skip sampling")
    return ap.parse_args(argv)


def draw_samples(args) -> tuple[np.ndarray, dict]:
    import torch

    from evaluator.engine import Engine, EngineConfig
    from tasks import load_task
    from tasks.config import PromptConfig, TaskConfig
    from train.models import ModelConfig, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    task = TaskConfig(name="arith", ops=list(args.ops), digits=args.digits, num_operands=args.operands,
                      test_fraction=0.5, n_test=1000,
                      prompt=PromptConfig(answer_format="number", num_fewshot=args.fewshot))
    data = load_task(task)
    problems = (data.test if args.split == "test" else data.train)[:args.problems]
    model, tok = load_model(ModelConfig(name_or_path=args.model, adapter=args.adapter), torch.device("cpu"))
    engine = Engine(model, tok, EngineConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                             batch_size=args.batch_size))
    torch.manual_seed(args.seed)
    t0 = time.time()
    correct = sample_correctness(problems, engine, args.pilots + args.samples, progress=True)
    info = {"problems": len(problems), "minutes_sampling": (time.time() - t0) / 60,
            "generated_tokens": engine.counts.decode, "prefill_tokens": engine.counts.prefill,
            "task": {"ops": list(args.ops), "digits": args.digits,
                                                                "operands": args.operands, "fewshot": args.fewshot, "split": args.split}, "ids": [p["id"] for p in problems]}
    return correct, info


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or ROOT / "outputs/bench_ttspm" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    if args.load:
        saved = json.loads(Path(args.load).read_text())
        correct, info = np.array(saved["correct"], dtype=bool), saved["info"]
        args.pilots = saved["pilots"]
    else:
        correct, info = draw_samples(args)
        atomic_write_text(out / "samples.json", json.dumps(
            {"pilots": args.pilots, "correct": correct.astype(int).tolist(), "info": info}))
    k = args.pilots
    pilots, pool = correct[:, :k], correct[:, k:]
    n_pool = pool.shape[1]
    budgets = [b for b in args.budgets if b <= n_pool]
    P = correct.shape[0]

    # ---- prediction vs measurement
    fit = TTSPM.fit(pilots.sum(1), k)
    c_pool = pool.sum(1)
    measured = {n: float(np.mean([pass_at_n(n_pool, int(c), n) for c in c_pool])) for n in budgets}
    predicted = {f: {n: float(fit.predict(n, f)) for n in budgets} for f in FORMS}
    print(f"problems={P} pilots={k} pool={n_pool} pilot accuracy={pilots.mean():.3f} pool accuracy={pool.mean():.3f} "
          f"ZI-Beta(F_max={fit.mixture.f_max:.3f}, a={fit.mixture.a:.3f}, b={fit.mixture.b:.3f}) pooled F_max={fit.pooled.f_max:.3f} p={fit.pooled.p:.3f}")
    print(f"{'N':>4} {'measured':>9} " + " ".join(f"{f:>9}" for f in FORMS) + "   (coverage %, predicted from pilots)")
    for n in budgets:
        print(f"{n:>4} {100 * measured[n]:8.1f}% " + " ".join(f"{100 * predicted[f][n]:8.1f}%" for f in FORMS))
    errors = {f: max(abs(predicted[f][n] - measured[n]) for n in budgets) * 100 for f in FORMS}
    # Problem-resampling noise of the headline error (bootstrap over problems, pilots and pool together).
    rng = np.random.default_rng(args.seed)
    boot = []
    for _ in range(args.bootstrap):
        idx = rng.integers(0, P, P)
        fb = TTSPM.fit(pilots[idx].sum(1), k)
        boot.append(max(abs(float(fb.predict(n, args.form)) - float(np.mean([pass_at_n(n_pool, int(c), n) for c in c_pool[idx]])))
                        for n in budgets) * 100)
    print("max |predicted - measured| (points): " + ", ".join(f"{f}={e:.2f}" for f, e in errors.items())
          + (f"; bootstrap over problems ({args.form}): median {np.median(boot):.2f}, 90% {np.percentile(boot, 90):.2f}"
             if boot else ""))
    # What the target can be judged to: the spread of this forecast's error from sampling alone, simulated
    # with the model form assumed right (evaluator.ttspm.TTSPM.forecast_error), at this problem count.
    sim = np.abs(fit.forecast_error(budgets, args.form, reps=args.bootstrap * 4, pool=n_pool, seed=args.seed)).max(1) * 100
    print(f"{args.form}: sampling error of a {k}-pilot forecast over {P} problems (parametric bootstrap, "
          f"{len(sim)} draws, {n_pool}-sample measurement): median max error {np.median(sim):.2f}, "
          f"90% {np.percentile(sim, 90):.2f}, share within 3 points {np.mean(sim <= 3):.2f}")
    # Pilot noise on these same problems: every disjoint set of k columns as the pilots, the others as the pool.
    repeats = []
    for start in range(0, correct.shape[1] - k + 1, k):
        cols = np.r_[start:start + k]
        rest = np.setdiff1d(np.arange(correct.shape[1]), cols)
        if len(rest) < max(budgets):
            continue
        fr = TTSPM.fit(correct[:, cols].sum(1), k)
        cr = correct[:, rest].sum(1)
        repeats.append(max(abs(float(fr.predict(n, args.form)) - float(np.mean([pass_at_n(len(rest), int(c), n) for c in cr])))
                           for n in budgets) * 100)
    if repeats:
        print(f"{args.form}: max error with each of the {len(repeats)} disjoint {k}-sample pilot sets as the pilots: "
              + " ".join(f"{e:.1f}" for e in repeats) + f" (median {np.median(repeats):.2f}, "
              f"within 3 points: {sum(e <= 3 for e in repeats)}/{len(repeats)})")

    # ---- budget=auto vs the fixed best budget
    best_n = max(budgets, key=lambda n: (round(measured[n], 9), -n))
    rule = AutoBudget(fit.beta, args.eps, max_n=best_n, min_n=k)  # the conservative prior (see AutoBudget)

    used = [0] * P  # pool samples taken so far, per problem

    def draw(group, n):  # the next n samples of each problem's pool, in order
        flags = []
        for i in group:
            flags.append([bool(x) for x in pool[i, used[i]:used[i] + n]])
            used[i] += n
        return flags

    drawn, wins = adaptive_sampling(draw, rule, [k] * P, [int(x) for x in pilots.sum(1)], chunk=1)
    used = [0] * P  # the same with the zero-inflated prior, for comparison
    zi_rule = AutoBudget(fit.mixture, args.eps, max_n=best_n, min_n=k)
    zi_drawn, zi_wins = adaptive_sampling(draw, zi_rule, [k] * P, [int(x) for x in pilots.sum(1)], chunk=1)
    print(f"(auto with the zero-inflated prior instead: accuracy {100 * np.mean([w > 0 for w in zi_wins]):.1f}% "
          f"with {sum(zi_drawn)} samples; failing problems stop after {zi_rule.budget_without_success()})")
    acc_auto = float(np.mean([w > 0 for w in wins]))
    acc_fixed = measured[best_n]
    samples_auto, samples_fixed = int(sum(drawn)), best_n * P
    print(f"fixed best budget N={best_n}: accuracy {100 * acc_fixed:.1f}% with {samples_fixed} samples; "
          f"auto (eps={args.eps:g}, cap {best_n}, fails stop after {rule.budget_without_success()}): accuracy "
          f"{100 * acc_auto:.1f}% with {samples_auto} samples (pilots included)")
    result = {"measured": measured, "predicted": predicted, "max_abs_err": errors, "bootstrap_err_median":
              float(np.median(boot)) if boot else None, "pilot_set_errors": repeats, "form": args.form,
              "simulated_err_median": float(np.median(sim)), "simulated_within_3": float(np.mean(sim <= 3)),
              "fit": fit.summary(), "best_n": best_n, "acc_fixed": acc_fixed,
              "acc_auto": acc_auto, "samples_auto": samples_auto, "samples_fixed": samples_fixed,
              "eps": args.eps, "info": info}
    atomic_write_text(out / "result.json", json.dumps(result, indent=2, default=float))
    print(f"results in {out}")
    print(f"headline form: {args.form}")
    print(f"BENCH ttspm max_abs_err={errors[args.form]:.2f} auto_acc_delta={100 * (acc_auto - acc_fixed):.2f} "
          f"auto_sample_ratio={samples_auto / samples_fixed:.3f}")
    return result


if __name__ == "__main__":
    main()

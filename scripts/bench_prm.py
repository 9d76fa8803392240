"""Benchmark for lightweight PRMs (issue 4).

What the default run measures (≈ 15–20 minutes on a 2-core CPU; longer when the machine is shared):

1. **Training + step AUROC.** ``frugal train-prm`` with its default config (embedded SmolLM2-135M cut to
   12 layers, LoRA on all of them, the log-probability features and the next-token loss, exact labels on
   generated arithmetic chains plus equation drills;
   ``max_minutes`` caps the run), then step accuracy, step AUROC and first-error F1 on all 400 held-out
   solutions of generated problems never trained on (``--eval-examples``).
2. **Partial-reward validity** (the premise of early rejection). The embedded policy samples solutions
   to held-out problems of the same task, prompted with 3 worked solutions (``--fewshot``, chat turns) so
   that it writes one equation per step as the PRM's data does (bare questions get prose the PRM never
   saw: Kendall ≈ 0.1 at τ = 64); for τ ∈ {16, 32, 64} the PRM scores the first τ completion
   tokens with ``score_partial`` (aggregated with the PRM's configured aggregation) and we report Pearson
   and Kendall τ-b between that score and whether the *finished* solution is correct.
3. **Scoring throughput** (steps/s) of batched ``PRM.score`` against the peer measured in the same run:
   the same solutions scored one at a time.

Flags scale it: ``--max-minutes``/``--max-steps`` (training), ``--prm DIR`` (skip training and use a PRM
folder; ``train_minutes`` is read from its run's ``summary.json``), ``--problems``/``--samples`` (partial
validity), ``--answer-format`` (how the policy's answers are graded; default ``number``: the last number,
since the 135M policy rarely writes ``\boxed{}``), ``--throughput-solutions``.
Ends with one line: ``BENCH prm step_auroc=<x> partial_kendall_tau64=<x> train_minutes=<m> steps_per_s=<x>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from frugal.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
TAUS = (16, 32, 64)


def kendall_tau_b(x, y) -> float:
    """Kendall's τ-b (ties in either variable handled), O(n²): fine for a few hundred samples."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
        prod = dx * dy
        concordant += int((prod > 0).sum())
        discordant += int((prod < 0).sum())
        ties_x += int(((dx == 0) & (dy != 0)).sum())
        ties_y += int(((dy == 0) & (dx != 0)).sum())
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def eval_overrides(args) -> list[str]:
    """The held-out size: the recipe's own ``data.max_eval_examples`` unless ``--eval-examples`` is given."""
    return [] if args.eval_examples is None else [f"data.max_eval_examples={args.eval_examples}"]


def train(args) -> tuple[Path, dict]:
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train_prm import run

    out = Path(args.workdir) / "train_prm"
    overrides = [f"output_dir={out}", *eval_overrides(args), "save_every=0",
                 f"num_threads={args.threads}"]
    if args.max_minutes is not None:
        overrides.append(f"max_minutes={args.max_minutes}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_prm", overrides=overrides + list(args.override))
    summary = run(cfg)
    return Path(summary["prm"]), summary


def recipe_config(args):
    """The default train-prm config (plus the bench's overrides): its task is the bench's task."""
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train_prm import TrainPRMConfig, to_config

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose("train_prm", overrides=[*eval_overrides(args),
                                                        *args.override]), TrainPRMConfig)


def held_out_metrics(prm, args) -> dict:
    """Step metrics of a given PRM folder on the default recipe's held-out generated problems."""
    from frugal.recipes.train_prm import evaluate, load_examples

    _, held, _ = load_examples(recipe_config(args))
    return evaluate(prm, held)


def partial_validity(prm, args) -> dict:
    from frugal.rewards.verify import is_correct
    from frugal.tasks import load_task
    from frugal.inference.models import ModelConfig, load_model
    from frugal.train.prm_steps import aggregate
    from frugal.train.rollout import GenerationConfig, generate

    from frugal.tasks.config import PromptConfig

    # The 135M policy rarely writes \boxed{}; grading the last number ("number" format, no instruction)
    # makes its solutions sometimes right, which is what a correlation needs. With --fewshot k the policy
    # sees k worked solutions first and writes its own in the PRM's step format (one equation per step).
    task = dataclasses.replace(recipe_config(args).task, n_train=args.fewshot, n_test=args.problems,
                               prompt=PromptConfig(answer_format=args.answer_format, num_fewshot=args.fewshot))
    rows = load_task(task).test[:args.problems]
    policy, tok = load_model(ModelConfig(name_or_path=args.policy))
    torch.manual_seed(0)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.8, batch_size=64)
    t0 = time.time()
    rollout = generate(policy, tok, [r["prompt"] for r in rows], gen, num_samples=args.samples)
    gen_s = time.time() - t0
    gold = [r for r in rows for _ in range(args.samples)]
    correct = [float(is_correct(t, r["answer"], r["answer_format"])) for t, r in zip(rollout.texts, gold)]
    out = {"samples": len(correct), "policy_accuracy": float(np.mean(correct)), "generate_s": gen_s}
    prompts = [r["question"] for r in gold]
    for tau in TAUS:
        texts = [tok.decode(ids[m.bool()][:tau], skip_special_tokens=True)
                 for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]
        scores = [aggregate(s, prm.cfg.aggregation) for s in prm.score_partial(prompts, texts)]
        out[f"pearson_tau{tau}"] = pearson(scores, correct)
        out[f"kendall_tau{tau}"] = kendall_tau_b(scores, correct)
    full = [aggregate(s, prm.cfg.aggregation) for s in prm.score_partial(prompts, rollout.texts)]
    out["pearson_full"], out["kendall_full"] = pearson(full, correct), kendall_tau_b(full, correct)
    out["example_completion"] = rollout.texts[0][:200]
    return out


def throughput(prm, args, n: int, peer_n: int) -> dict:
    from frugal.tasks import load_task
    from frugal.train.prm_data import generated_examples

    rows = load_task(dataclasses.replace(recipe_config(args).task, n_train=n, n_test=0)).train
    ex = generated_examples(rows[:max(n // 2, 1)], errors_per_row=1, seed=7)[:n]
    prompts, steps = [e["prompt"] for e in ex], [e["completions"] for e in ex]
    prm.score(prompts[:4], steps[:4])  # warm-up
    t0 = time.time()
    prm.score(prompts, steps)
    batched_s = time.time() - t0
    n_steps = sum(len(s) for s in steps)
    t0 = time.time()
    for p, s in zip(prompts[:peer_n], steps[:peer_n]):
        prm.score([p], [s])
    single_s = time.time() - t0
    single_steps = sum(len(s) for s in steps[:peer_n])
    return {"steps_per_s": n_steps / batched_s,
            "steps_per_s_unbatched": single_steps / single_s, "solutions": len(ex), "steps": n_steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prm", help="an existing PRM folder (skip training)")
    ap.add_argument("--max-minutes", type=float, default=None, help="training wall-time cap (default: the recipe's)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--eval-examples", type=int, default=None,
                    help="held-out solutions for step metrics (default: the recipe's data.max_eval_examples, "
                         "400 = all of the default recipe's: 200 problems x 2)")
    ap.add_argument("--problems", type=int, default=32, help="held-out problems for partial validity")
    ap.add_argument("--samples", type=int, default=4, help="policy samples per problem")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--answer-format", default="number", help="how policy answers are read (boxed|answer_line|number)")
    ap.add_argument("--policy", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--fewshot", type=int, default=3, help="worked examples in the policy's prompt (0 = bare question)")
    ap.add_argument("--throughput-solutions", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("override", nargs="*", help="extra train-prm Hydra overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_prm_")
    from frugal.train.prm import load_prm

    if args.prm:
        prm_dir, train_minutes = Path(args.prm), float("nan")
        summary_file = prm_dir.parent / "summary.json"  # the train-prm run that wrote this folder
        if summary_file.exists():
            train_minutes = json.loads(summary_file.read_text())["train_minutes"]
            print(f"using {prm_dir}; train_minutes from {summary_file}")
        prm = load_prm(prm_dir)
        held = held_out_metrics(prm, args)
    else:
        prm_dir, summary = train(args)
        train_minutes = summary["train_minutes"]
        prm = load_prm(prm_dir)
        held = {k[5:]: v for k, v in summary.items() if k.startswith("eval_")}
        print(f"training: {summary['steps']} steps, {train_minutes:.2f} min in the loop "
              f"({summary['minutes']:.2f} min with data/eval/save); loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
    print(f"held-out generated steps ({held['steps']}): step_accuracy={held['step_accuracy']:.4f} "
          f"step_auroc={held['step_auroc']:.4f} first_error_f1={held['first_error_f1']:.4f} "
          f"(acc on erroneous={held['first_error_acc_error']:.3f}, on correct={held['first_error_acc_correct']:.3f})")

    kinds = {k[len("step_auroc_"):]: v for k, v in held.items() if k.startswith("step_auroc_")}
    if kinds:
        print("  step AUROC by slip kind and by position (correct solutions' steps vs those wrong steps): "
              + " ".join(f"{k}={v:.4f}" for k, v in kinds.items()))
    pv = partial_validity(prm, args)
    print(f"partial validity: {pv['samples']} policy samples ({args.fewshot}-shot), policy accuracy {pv['policy_accuracy']:.3f} "
          f"(generation {pv['generate_s']:.0f} s); aggregation={prm.cfg.aggregation}")
    for tau in TAUS:
        print(f"  tau={tau:>2}: pearson={pv[f'pearson_tau{tau}']:.4f} kendall={pv[f'kendall_tau{tau}']:.4f}")
    print(f"  full : pearson={pv['pearson_full']:.4f} kendall={pv['kendall_full']:.4f}")
    print(f"  example completion: {json.dumps(pv['example_completion'])}")

    tp = throughput(prm, args, args.throughput_solutions, peer_n=min(32, args.throughput_solutions))
    print(f"throughput: batched {tp['steps_per_s']:.1f} steps/s vs one-at-a-time {tp['steps_per_s_unbatched']:.1f} "
          f"steps/s (x{tp['steps_per_s'] / tp['steps_per_s_unbatched']:.2f}); backbone {prm.num_parameters / 1e6:.1f}M params "
          f"({prm.cfg.num_layers or 'all'} layers)")
    print(f"BENCH prm step_auroc={held['step_auroc']:.4f} partial_kendall_tau64={pv['kendall_tau64']:.4f} "
          f"train_minutes={train_minutes:.2f} steps_per_s={tp['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()

"""The evaluation harness: run strategies at several budgets, grade, account, write and plot.

For each (strategy, budget) the harness runs the strategy over the problems (in chunks of
``problems_per_call``; torch's generator, which resampling uses, is seeded by (seed, budget, chunk), and
the engine samples each candidate from a random stream keyed by (seed, its prompt, its stream number):
``Engine`` "Sampling"), so any run is reproducible, independent of which other strategies ran, and
every strategy draws the same first samples of a problem (common random numbers); it grades the chosen
solution with ``frugal.rewards.verify.is_correct`` (the training reward's verifier), and records the tokens
each model processed and their FLOPs (:mod:`frugal.evaluator.flops`).

Every model a strategy runs is counted (``strategies.prepare`` names them: policy, or SSR's target and
draft, and the PRM): ``flops_total`` sums all of them, and ``summary.json`` lists each model's tokens and
FLOPs under ``models`` (:class:`ModelUse`). Counts are differences of snapshots taken around each budget,
and extra models (SSR's draft) are built per ``run_strategy``, so nothing carries over between runs.

Outputs in the run dir: ``results.jsonl`` (one row per problem, strategy and budget: chosen solution,
predicted answer, correct, every candidate with its step scores and tokens), ``summary.json`` (one row per
strategy and budget: accuracy, policy tokens (prefill / generated), PRM tokens, FLOPs per model, wall
time), ``accuracy_vs_flops.png`` and ``accuracy_vs_budget.png``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from frugal.evaluator import strategies
from frugal.inference.engine import Counts, Engine
from frugal.evaluator.prm_counts import CountingPRM
from frugal.evaluator.flops import ModelShape, policy_shape, prm_shape
from frugal.evaluator.strategies.common import answer_of, solution_score
from frugal.rewards.verify import is_correct
from frugal.runtime.io import atomic_write_text

log = logging.getLogger("frugal.eval")


@dataclass
class ModelUse:
    """What one model of a row processed (``frugal.inference.engine.Counts``) and its FLOPs."""

    prefill: int
    cached: int
    generated: int
    scored: int
    reprefill: int
    calls: int
    flops: float

    @classmethod
    def of(cls, counts: Counts, shape: ModelShape) -> "ModelUse":
        return cls(counts.prefill, counts.cached, counts.decode, counts.scored, counts.reprefill, counts.calls,
                   shape.flops(counts))


@dataclass
class Row:
    """summary.json: one strategy at one budget."""

    strategy: str
    budget: int
    problems: int
    accuracy: float
    policy_prefill_tokens: int
    policy_generated_tokens: int
    prm_tokens: int
    flops_policy: float
    flops_prm: float
    flops_total: float
    wall_s: float
    policy_calls: int
    prm_calls: int
    models: dict = field(default_factory=dict)  # role -> ModelUse as a dict (policy / target, draft, prm)


def run_strategy(name: str, problems: Sequence[dict], budgets: Sequence[int], engine: Engine,
                 prm: Optional[CountingPRM], search_cfg, seed: int = 0, problems_per_call: int = 32,
                 label: Optional[str] = None, progress: bool = True) -> tuple[list[Row], list[dict]]:
    """Run strategy ``name`` at every budget; return the summary rows and the per-problem records.
    ``search_cfg``: the strategy's config (``frugal.evaluator.config.SEARCH_VARIANTS[name]``)."""
    from tqdm.auto import tqdm

    from frugal.evaluator.config import PRMSearchConfig

    label = label or name
    # a PRM-guided strategy's aggregation scores the chosen solution in results.jsonl (others have no PRM scores)
    how = search_cfg.aggregation if isinstance(search_cfg, PRMSearchConfig) else None
    run, models = strategies.prepare(name, engine, prm, search_cfg)
    shapes = {role: shape_of(m) for role, m in models.items()}
    policy_role = "target" if "target" in models else "policy"
    for m in models.values():
        if isinstance(m, Engine):
            m.seed = seed  # keys the candidates' random streams (engine.StreamSampling)
    rows, records = [], []
    bar = tqdm(total=len(budgets) * len(problems), desc=f"eval {label}", disable=None if progress else True,
               dynamic_ncols=True)
    for budget in budgets:
        before = {role: m.counts.snapshot() for role, m in models.items()}
        started, correct = time.time(), 0
        for start in range(0, len(problems), problems_per_call):
            chunk = list(problems[start:start + problems_per_call])
            torch.manual_seed(seed * 1_000_003 + budget * 1_009 + start)
            for m in models.values():  # every (strategy, budget, chunk) pays its own prompt prefills
                if isinstance(m, Engine):
                    m.clear_cache()
            results = run(chunk, budget, engine, prm, search_cfg)
            for row, res in zip(chunk, results):
                ok = is_correct(res.chosen.text, str(row["answer"]), row.get("answer_format", "boxed"))
                correct += ok
                records.append(_record(label, budget, row, res, ok, chunk, how))
            bar.update(len(chunk))
            bar.set_postfix(budget=budget, acc=round(correct / min(start + len(chunk), len(problems)), 3))
        use = {role: ModelUse.of(m.counts.since(before[role]), shapes[role]) for role, m in models.items()}
        policy, scored = use[policy_role], use.get("prm")
        fr = scored.flops if scored is not None else 0.0
        total = sum(u.flops for u in use.values())
        rows.append(Row(label, budget, len(problems), correct / len(problems), policy.prefill, policy.generated,
                        scored.prefill if scored is not None else 0, policy.flops, fr, total, time.time() - started,
                        policy.calls, scored.calls if scored is not None else 0,
                        {role: asdict(u) for role, u in use.items()}))
        log.info("%s N=%d: accuracy %.3f, %s, %.3g FLOPs", label, budget, rows[-1].accuracy,
                 ", ".join(f"{role} {u.prefill}+{u.generated} tokens" for role, u in use.items()), total)
    bar.close()
    return rows, records


def shape_of(model) -> ModelShape:
    """The FLOPs shape of an engine's model or a counted PRM's (zero for a PRM without a model)."""
    if isinstance(model, CountingPRM):
        return prm_shape(model.prm) if hasattr(model.prm, "model") else ModelShape(0, 0, 0)
    return policy_shape(model.model)


def _record(label, budget, row, res, ok, chunk, how) -> dict:
    def cand(c):
        return {"text": c.text, "scores": c.scores, "tokens": c.tokens, "finished": c.finished}

    return {"strategy": label, "budget": budget, "id": row.get("id"), "question": row.get("question"),
            "answer": row["answer"], "chosen": res.chosen.text, "predicted": answer_of(res.chosen, chunk),
            "chosen_score": solution_score(res.chosen, how) if how and res.chosen.scores else None,
            "correct": bool(ok), "candidates": [cand(c) for c in res.candidates], "info": res.info}


def write_outputs(run_dir: Path, rows: Sequence[Row], records: Sequence[dict], plots: bool = True) -> dict:
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    summary = {"rows": [asdict(r) for r in rows]}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    if plots:
        plot(rows, run_dir)
    return summary


def plot(rows: Sequence[Row], run_dir: Path) -> list[Path]:
    """accuracy_vs_flops.png (log x, total FLOPs of every model) and accuracy_vs_budget.png, one line per
    strategy. Written to a temporary name and renamed (atomic)."""
    import os

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    by_strategy: dict[str, list[Row]] = {}
    for r in rows:
        by_strategy.setdefault(r.strategy, []).append(r)
    paths = []
    for x_key, name, xlabel, logx in (("flops_total", "accuracy_vs_flops.png", "FLOPs (all models)", True),
                                      ("budget", "accuracy_vs_budget.png", "budget N", True)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy, points in by_strategy.items():
            points = sorted(points, key=lambda r: getattr(r, x_key))
            ax.plot([getattr(r, x_key) for r in points], [100 * r.accuracy for r in points], marker="o", label=strategy)
        if logx:
            ax.set_xscale("log", base=10 if x_key == "flops_total" else 2)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # overlapping minor labels
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(run_dir) / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- the `frugal eval` entry

def load_problems(cfg) -> list[dict]:
    from frugal.rewards.verify import validate_gold_answers
    from frugal.tasks import load_task

    data = load_task(cfg.task)
    problems = data.test if cfg.split == "test" else data.train
    problems = problems[:cfg.limit] if cfg.limit else problems
    if not problems:
        hint = (" (an evaluation-only dataset: its problems are the test split; set split=test)"
                if cfg.split == "train" and data.info.get("eval_only") else "")
        raise ValueError(f"task={cfg.task.name} split={cfg.split}: no problems to evaluate{hint}")
    validate_gold_answers(problems, source=f"task={cfg.task.name}")
    return problems


def prepare(cfg, run_dir: Path):
    """What ``frugal eval`` and ``frugal plan`` share: the run dir, threads, device, a ``config.yaml`` with
    secrets removed, the problems and the policy's engine (``engine.backend``:
    :func:`frugal.inference.backends.make_engine`). Returns (run_dir, device, config, problems, engine)."""
    from omegaconf import OmegaConf

    from frugal.inference.backends import make_engine
    from frugal.runtime.secrets import scrub_secrets
    from frugal.runtime.system import device_from

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = device_from(cfg.device)
    config_dict = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))
    problems = load_problems(cfg)
    return run_dir, device, config_dict, problems, make_engine(cfg.model, cfg.engine, device, vllm=cfg.vllm)


def evaluate(cfg, run_dir: Path) -> dict:
    """Everything ``frugal eval`` does, given a validated :class:`frugal.evaluator.config.EvalConfig`."""
    from frugal.evaluator.config import GreedyConfig, check_prm_separator
    from frugal.train.tracking import Tracker

    check_prm_separator(cfg)  # before any model loads: reads prm.json only
    run_dir, device, config_dict, problems, engine = prepare(cfg, run_dir)
    prm = None
    if cfg.prm_path:
        from frugal.evaluator.hub_prm import load_any_prm

        prm = CountingPRM(load_any_prm(cfg.prm_path, cfg.prm_family, device, separator=cfg.engine.step_delimiter))
    budgets = [1] if isinstance(cfg.search, GreedyConfig) else list(cfg.search.budgets)
    rows, records = run_strategy(cfg.search.name, problems, budgets, engine, prm, cfg.search, cfg.seed,
                                 cfg.problems_per_call, progress=cfg.progress)
    summary = write_outputs(run_dir, rows, records, cfg.plots)
    tracker = Tracker(run_dir, cfg.logger, config_dict)
    for i, r in enumerate(rows):
        metrics = {f"eval/{k}": v for k, v in asdict(r).items() if k not in ("strategy", "models")}
        metrics.update({f"eval/{role}/{k}": v for role, use in r.models.items() for k, v in use.items()})
        tracker.log(metrics, step=i)
    tracker.summary({f"accuracy_N{r.budget}": r.accuracy for r in rows})
    tracker.finish()
    summary["run_dir"] = str(run_dir)
    return summary

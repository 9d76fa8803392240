"""Early rejection with partial reward modelling: judge candidates on their first τ tokens and finish
only the promising ones (Sun et al. 2024, "Fast Best-of-N Decoding via Speculative Rejection"; the
partial-reward premise — a PRM's score of a prefix predicts the final solution's correctness — is what
``scripts/bench_prm.py`` measures).

Early-rejection best-of-N (``search.er_search=best_of_n``), budget N, beam width M:

    1. sample N prefixes y_i[:τ] ~ p_θ(·|x)  (τ = search.tau tokens; a solution may finish earlier);
    2. partial scores s_i = agg(PRM(x, y_i[:τ]))  (the unfinished last step counts as a step);
    3. keep S = top max(1, N // M) prefixes by s_i — or top max(1, round(N·(1 − α))) with a rejection
       rate α (``search.rejection_rate``; Sun et al. reject a fixed share the same way), or
       {i : s_i ≥ threshold} (at least the best one) when search.threshold is set; drop the rest;
    4. complete the survivors, score them in full, answer ŷ = argmax_{i∈S} agg(PRM(x, y_i)). A problem
       left with one survivor has nothing to choose between: its completion is not scored (its
       ``scores`` stay those of its prefix).

Policy cost falls from N·L generated tokens to N·τ + |S|·(L − τ); PRM cost from N full solutions to N
prefixes + (|S| solutions where |S| > 1). The saving therefore grows with L/τ and with α: with short
replies (τ a third of L) it takes a high rejection rate to halve best-of-N's compute.

Early-rejection beam search (``search.er_search=beam``): step-level beam search
(:mod:`frugal.evaluator.strategies.beam`) where each child generates only τ tokens of its next step, the
children are ranked on that partial step, and only the kept beams complete it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from frugal.evaluator.strategies.beam import BeamConfig, beam_search
from frugal.evaluator.strategies.common import Result, best, by_problem, fresh, solution_score
from frugal.runtime.registry import register


@register("search")
@dataclass
class EarlyRejectionConfig(BeamConfig):
    name: str = "early_rejection"
    tau: int = 64  # tokens generated before the partial PRM score decides
    threshold: Optional[float] = None  # keep partials scoring >= threshold (>= 1 kept)
    # Share of the N candidates dropped at τ; keeps max(1, round(N·(1 − rate))). null: keep N // beam_width
    # (rate 1 − 1/beam_width).
    rejection_rate: Optional[float] = None
    er_search: str = "best_of_n"  # early rejection on top of: best_of_n | beam

    def __post_init__(self):
        super().__post_init__()
        if self.tau < 1:
            raise ValueError(f"search.tau must be >= 1, got {self.tau}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"search.threshold must be in [0, 1] or null, got {self.threshold}")
        if self.rejection_rate is not None and not 0.0 <= self.rejection_rate < 1.0:
            raise ValueError(f"search.rejection_rate must be in [0, 1) or null, got {self.rejection_rate}")
        if self.er_search not in ("best_of_n", "beam"):
            raise ValueError(f"search.er_search must be best_of_n|beam, got {self.er_search!r}")


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    if cfg.er_search == "beam":
        return beam_search(problems, budget, engine, prm, cfg, tau=cfg.tau)
    prefixes = engine.extend(problems, fresh(len(problems), budget), max_tokens=cfg.tau, stop_at_step=False)
    prm.score_candidates(problems, prefixes)
    survivors = [c for group in by_problem(prefixes, len(problems)) for c in reject(group, budget, cfg)]
    unfinished = [c for c in survivors if not c.finished]
    completed = engine.extend(problems, unfinished, stop_at_step=False)
    survivors_of = Counter(c.problem for c in survivors)
    prm.score_candidates(problems, [c for c in completed if survivors_of[c.problem] > 1])
    full = iter(completed)
    survivors = [c if c.finished else next(full) for c in survivors]
    results = []
    for group, kept in zip(by_problem(prefixes, len(problems)), by_problem(survivors, len(problems))):
        results.append(Result(best(kept, cfg.aggregation, problems), kept, {"rejected": len(group) - len(kept)}))
    return results


def reject(group, budget: int, cfg) -> list:
    """The candidates of one problem that survive: top ``budget // beam_width`` (or
    ``round(budget · (1 − rejection_rate))``, at least 1) by partial score (the earlier candidate wins a
    tie), or all scoring ≥ ``threshold`` (at least the best one)."""
    ranked = sorted(range(len(group)), key=lambda i: (-solution_score(group[i], cfg.aggregation), i))
    if cfg.threshold is not None:
        kept = [i for i in ranked if solution_score(group[i], cfg.aggregation) >= cfg.threshold] or ranked[:1]
    elif cfg.rejection_rate is not None:
        kept = ranked[:max(1, round(budget * (1 - cfg.rejection_rate)))]
    else:
        kept = ranked[:max(1, budget // cfg.beam_width)]
    return [group[i] for i in sorted(kept)]

"""Best-of-N with a process reward model (Lightman et al. 2023, "Let's Verify Step by Step"; weighted
best-of-N: Li et al. 2023, "Making Language Models Better Reasoners with Step-Aware Verifier", and
Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally…").

Sample N complete solutions y_1..y_N ~ p_θ(·|x); the PRM gives step scores r_i = (r_i1..r_iT); a solution
score is s_i = agg(r_i) with agg ∈ {last, min, prod, mean}.

    vanilla:   ŷ = y_{argmax_i s_i}
    weighted:  â = argmax_a Σ_i s_i · 1[ans(y_i) = a]    (search.weighted=true)
"""

from __future__ import annotations

from dataclasses import dataclass

from frugal.evaluator.config import PRMSearchConfig
from frugal.evaluator.strategies.common import Result, best, by_problem, fresh, solution_score, vote
from frugal.runtime.registry import register


@register("search")
@dataclass
class BestOfNConfig(PRMSearchConfig):
    name: str = "best_of_n"
    weighted: bool = False  # weighted majority (sum of solution scores per answer)
    # TTSPM (evaluator/ttspm.py): budget=auto stops sampling a problem once the predicted gain of one more
    # sample is below auto_eps (N in `budgets` is then the cap).
    budget: str = "fixed"  # fixed | auto
    # Smaller: more samples before a failing problem is written off; chosen with scripts/bench_ttspm.py,
    # which prints the trade-off over eps (docs/benchmarks.md).
    auto_eps: float = 0.005
    auto_threshold: float = 0.5  # a solution whose PRM score reaches this ends a problem's sampling
    auto_pilots: int = 4  # first-round samples per problem that fit the prior
    auto_chunk: int = 2  # samples added per problem per round

    def __post_init__(self):
        super().__post_init__()
        if self.budget not in ("fixed", "auto"):
            raise ValueError(f"search.budget must be fixed|auto, got {self.budget!r}")
        if not 0 < self.auto_eps < 1 or self.auto_pilots < 1 or self.auto_chunk < 1:
            raise ValueError("search.auto_eps must be in (0, 1); search.auto_pilots and search.auto_chunk >= 1")
        if not 0.0 <= self.auto_threshold <= 1.0:
            raise ValueError(f"search.auto_threshold must be in [0, 1], got {self.auto_threshold}")


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    if cfg.budget == "auto":  # search.budget=auto: N is the cap (evaluator/ttspm.py)
        from frugal.evaluator.ttspm import auto_best_of_n

        return [select(group, problems, cfg) for group in auto_best_of_n(problems, budget, engine, prm, cfg)]
    cands = engine.extend(problems, fresh(len(problems), budget), stop_at_step=False)
    prm.score_candidates(problems, cands)
    return [select(group, problems, cfg) for group in by_problem(cands, len(problems))]


def select(group, problems, cfg) -> Result:
    if cfg.weighted:
        chosen = vote(group, problems, [solution_score(c, cfg.aggregation) for c in group])
    else:
        chosen = best(group, cfg.aggregation, problems)
    return Result(chosen, group)

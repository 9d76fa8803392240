"""Best-of-N with a process reward model (Lightman et al. 2023, "Let's Verify Step by Step"; weighted
best-of-N: Li et al. 2023, "Making Language Models Better Reasoners with Step-Aware Verifier", and
Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally…").

Sample N complete solutions y_1..y_N ~ p_θ(·|x); the PRM gives step scores r_i = (r_i1..r_iT); a solution
score is s_i = agg(r_i) with agg ∈ {last, min, prod, mean}.

    vanilla:   ŷ = y_{argmax_i s_i}
    weighted:  â = argmax_a Σ_i s_i · 1[ans(y_i) = a]    (search.weighted=true)
"""

from __future__ import annotations

from frugal.evaluator.strategies.common import Result, best, by_problem, fresh, solution_score, vote


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

"""PRM-guided step-level beam search (Snell et al. 2024, "Scaling LLM Test-Time Compute Optimally can be
More Effective than Scaling Model Parameters", §5; the search-and-learn recipe of Beeching et al. 2024).

With budget N and beam width M, keep K = max(1, N // M) beams:

    1. start from N independent first steps;
    2. score every partial solution with the PRM, s = agg(r_1..r_t) (default agg = last);
    3. finished solutions leave the search into a done pool; of the unfinished ones keep the top K by s;
    4. each kept beam is copied into N // K children, and every child generates its next step;
    5. repeat until N solutions are done, nothing is left, or max_steps; answer = best s in the done pool
       (the best surviving beam if none finished).

The step generation of all children of all problems is one engine call per step. With ``tau`` set (used
by :mod:`frugal.evaluator.strategies.early_rejection`), children generate only ``tau`` tokens of their step,
are ranked on that partial step, and only the K survivors finish the step (early-rejection beam search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from frugal.evaluator.config import PRMSearchConfig
from frugal.evaluator.strategies.common import Result, best, by_problem, fresh, solution_score
from frugal.runtime.registry import register


@register("search")
@dataclass
class BeamConfig(PRMSearchConfig):
    name: str = "beam"
    beam_width: int = 4  # keep N / beam_width beams, each expands beam_width children

    def __post_init__(self):
        super().__post_init__()
        if self.beam_width < 1:
            raise ValueError(f"search.beam_width must be >= 1, got {self.beam_width}")


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    return beam_search(problems, budget, engine, prm, cfg)


def beam_search(problems, budget, engine, prm, cfg, tau: Optional[int] = None) -> list[Result]:
    n_problems, delim = len(problems), engine.cfg.step_delimiter
    keep = max(1, budget // cfg.beam_width)
    children = max(1, budget // keep)
    done: list[list] = [[] for _ in range(n_problems)]
    survivors: list[list] = [[] for _ in range(n_problems)]
    active = fresh(n_problems, budget)
    for _ in range(engine.cfg.max_steps + 1):
        if not active:
            break
        active = engine.extend(problems, active, max_tokens=tau)
        prm.score_candidates(problems, active)
        next_active = []
        for p, group in enumerate(by_problem(active, n_problems)):
            done[p] += [c for c in group if c.finished]
            alive = sorted((c for c in group if not c.finished), key=lambda c: -solution_score(c, cfg.aggregation))
            survivors[p] = alive[:keep] if alive else survivors[p]
            if len(done[p]) >= budget or not alive:
                continue
            next_active += alive[:keep]
        if tau is not None:  # early rejection: only the survivors finish their step
            open_step = [c for c in next_active if not c.text.endswith(delim)]
            completed = engine.extend(problems, open_step)
            prm.score_candidates(problems, completed)
            closed = iter(completed)
            next_active = [next(closed) if not c.text.endswith(delim) else c for c in next_active]
            for c in next_active:
                if c.finished:
                    done[c.problem].append(c)
            next_active = [c for c in next_active if not c.finished]
        active = [child for c in next_active for child in [c] + [c.fork(j) for j in range(1, children)]]
    results = []
    for p in range(n_problems):
        pool = done[p] or survivors[p]
        results.append(Result(best(pool, cfg.aggregation, problems), pool))
    return results

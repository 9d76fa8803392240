"""Diverse verifier tree search (DVTS; Beeching, Tunstall and Rush 2024, "Scaling test-time compute with
open models", Hugging Face blog, and its code, search-and-learn's ``sal/search/diverse_verifier_tree_search.py``).

Beam search (:mod:`frugal.evaluator.strategies.beam`) keeps the top N/M partial solutions of one shared
pool at every step, so at large N the pool collapses onto a few prefixes that the PRM likes. DVTS splits
the budget into independent subtrees instead, each searched on its own:

    S = max(1, ⌊N / M⌋) subtrees; subtree s expands m_s = ⌊N / S⌋ (+1 for s < N mod S) children per step
    (M children when M divides N: the N / M subtrees of width M of the paper), Σ_s m_s = N;

    1. subtree s starts from m_s of the N independent first steps (fresh streams s·m .. , as every
       strategy starts);
    2. every child of every open subtree is scored by the PRM, v = agg(r_1..r_t) (default agg = last);
    3. each subtree keeps its best child  c*_s = argmax_{c ∈ children(s)} v(c)  (ties: the earliest);
       if c*_s is finished (or max_steps is reached) the subtree is done, else c*_s is copied into m_s
       children (itself and m_s − 1 forks, each on its own random stream) that generate the next step;
    4. the answer is the best leaf overall:  argmax over the subtrees' last children of v
       (:func:`frugal.evaluator.strategies.common.best`: a candidate that states an answer first).

As in search-and-learn, the pool the answer is chosen from is every subtree's last expansion (its m_s
scored children), not only its kept child. Each step is one engine call and one PRM call for all
children of all subtrees of all problems; a subtree costs what beam search costs per kept beam, so DVTS
at budget N generates the same tokens per step as beam search at N.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugal.evaluator.strategies.beam import BeamConfig
from frugal.evaluator.strategies.common import Result, best, fresh, solution_score
from frugal.runtime.registry import register


@register("search")
@dataclass
class DVTSConfig(BeamConfig):
    """Diverse verifier tree search (evaluator/strategies/dvts.py): N / beam_width independent subtrees,
    each keeping its best of beam_width children per step."""

    name: str = "dvts"


def widths(budget: int, beam_width: int) -> list[int]:
    """Children per subtree: ``max(1, budget // beam_width)`` subtrees sharing ``budget`` as evenly as
    possible (each ``beam_width`` when it divides ``budget``)."""
    subtrees = max(1, budget // beam_width)
    return [budget // subtrees + (s < budget % subtrees) for s in range(subtrees)]


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    n_problems, sizes = len(problems), widths(budget, cfg.beam_width)
    starts = fresh(n_problems, budget)  # problem-major, N per problem
    # open subtrees: (problem, subtree index, its children this step)
    open_trees = []
    for p in range(n_problems):
        offset = 0
        for s, m in enumerate(sizes):
            open_trees.append((p, s, starts[p * budget + offset:p * budget + offset + m]))
            offset += m
    last: dict[tuple[int, int], list] = {}  # (problem, subtree) -> its last scored children
    for _ in range(engine.cfg.max_steps + 1):
        if not open_trees:
            break
        flat = engine.extend(problems, [c for _, _, kids in open_trees for c in kids])
        prm.score_candidates(problems, flat)
        next_trees, at = [], 0
        for p, s, kids in open_trees:
            children = flat[at:at + len(kids)]
            at += len(kids)
            last[(p, s)] = children
            kept = max(enumerate(children), key=lambda ic: (solution_score(ic[1], cfg.aggregation), -ic[0]))[1]
            if kept.finished:
                continue
            next_trees.append((p, s, [kept] + [kept.fork(j) for j in range(1, len(kids))]))
        open_trees = next_trees
    results = []
    for p in range(n_problems):
        pool = [c for s in range(len(sizes)) for c in last.get((p, s), [])]
        results.append(Result(best(pool, cfg.aggregation, problems), pool, {"subtrees": len(sizes)}))
    return results

"""Greedy decoding: one solution per problem, argmax token at every position (the budget is ignored).

    y_t = argmax_v p_θ(v | x, y_<t)

The zero-search baseline every other strategy is compared with.
"""

from __future__ import annotations

from frugal.evaluator.strategies.common import Result, fresh


def run(problems, budget, engine, prm=None, cfg=None) -> list[Result]:
    cands = engine.extend(problems, fresh(len(problems), 1), stop_at_step=False, greedy=True)
    return [Result(c, [c]) for c in cands]

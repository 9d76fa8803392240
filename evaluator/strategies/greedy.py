"""Greedy decoding: one solution per problem, argmax token at every position (the budget is ignored).

    y_t = argmax_v p_θ(v | x, y_<t)

The zero-search baseline every other strategy is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugal.evaluator.config import SearchConfig
from frugal.evaluator.strategies.common import Result, fresh
from frugal.runtime.registry import register


@register("search")
@dataclass
class GreedyConfig(SearchConfig):
    """Greedy decoding: one solution per problem (no budget, no PRM)."""

    name: str = "greedy"


def run(problems, budget, engine, prm=None, cfg=None) -> list[Result]:
    cands = engine.extend(problems, fresh(len(problems), 1), stop_at_step=False, greedy=True)
    return [Result(c, [c]) for c in cands]

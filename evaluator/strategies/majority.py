"""Majority voting / self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought
Reasoning in Language Models"): sample N solutions, answer with the most frequent final answer.

    â = argmax_a Σ_{i=1..N} 1[ans(y_i) = a],   y_i ~ p_θ(· | x)

No PRM is used. Ties go to the answer seen first.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugal.evaluator.config import BudgetedConfig
from frugal.evaluator.strategies.common import Result, by_problem, fresh, vote
from frugal.runtime.registry import register


@register("search")
@dataclass
class MajorityConfig(BudgetedConfig):
    """Self-consistency: majority vote over N samples (no PRM)."""

    name: str = "majority"


def run(problems, budget, engine, prm=None, cfg=None) -> list[Result]:
    cands = engine.extend(problems, fresh(len(problems), budget), stop_at_step=False)
    return [Result(vote(group, problems), group) for group in by_problem(cands, len(problems))]

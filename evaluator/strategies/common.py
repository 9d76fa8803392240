"""Pieces shared by the strategies: results, solution scores, answer voting, per-problem grouping."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from frugal.inference.engine import Candidate
from frugal.rewards.verify import answers_match, extract_answer
from frugal.train.prm_steps import aggregate

EPS = 1e-6


@dataclass
class Result:
    """What a strategy returns for one problem: the chosen solution and the final pool it chose from."""

    chosen: Candidate
    candidates: list[Candidate]
    info: dict = field(default_factory=dict)


def fresh(num_problems: int, n: int) -> list[Candidate]:
    """``n`` empty candidates per problem, problem-major; the i-th of each problem samples from stream i
    (the same in every strategy: ``Engine`` "Sampling")."""
    return [Candidate(p, stream=i) for p in range(num_problems) for i in range(n)]


def by_problem(cands: Sequence[Candidate], num_problems: int) -> list[list[Candidate]]:
    groups: list[list[Candidate]] = [[] for _ in range(num_problems)]
    for c in cands:
        groups[c.problem].append(c)
    return groups


def solution_score(cand: Candidate, how: str) -> float:
    """Aggregated PRM score (``frugal.train.prm_steps.aggregate``: last | min | prod | mean)."""
    return aggregate(cand.scores, how)


def logit(p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return math.log(p / (1 - p))


def best(cands: Sequence[Candidate], how: str, problems: Sequence[dict]) -> Candidate:
    """Highest aggregated score among the candidates that state an answer (as :func:`vote` counts only
    those); the earliest candidate wins a tie (deterministic).

    Why answers first: a PRM scores each step's correctness *so far*, so a reply that stops after a
    correct first equation without ever stating an answer keeps that step's high score, while a complete
    reply is judged on its answer step, which is wrong whenever any earlier step is (its score carries
    that doubt). Compared on score alone the unfinished reply wins and is graded wrong; a reply with no
    answer can never be graded right, so it only wins when no candidate states one."""
    return max(enumerate(cands), key=lambda ic: (has_answer(ic[1], problems), solution_score(ic[1], how), -ic[0]))[1]


def answer_of(cand: Candidate, problems: Sequence[dict]) -> Optional[str]:
    return extract_answer(cand.text, problems[cand.problem].get("answer_format", "boxed"))


def has_answer(cand: Candidate, problems: Sequence[dict]) -> bool:
    return answer_of(cand, problems) is not None


def vote(cands: Sequence[Candidate], problems: Sequence[dict], weights: Optional[Sequence[float]] = None) -> Candidate:
    """Majority (or weighted-majority) vote over extracted answers; returns the first candidate holding
    the winning answer. Answers are merged with ``answers_match`` (so "6" and "6.0" are one vote).
    Candidates without an answer only win when no candidate has one."""
    weights = [1.0] * len(cands) if weights is None else list(weights)
    answers = [answer_of(c, problems) for c in cands]
    totals: dict[int, float] = defaultdict(float)  # representative index -> total weight
    reps: list[int] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        rep = next((r for r in reps if answers_match(a, answers[r])), None)
        if rep is None:
            reps.append(i)
            rep = i
        totals[rep] += weights[i]
    if not reps:
        return cands[0]
    winner = max(reps, key=lambda r: (totals[r], -r))
    return cands[winner]

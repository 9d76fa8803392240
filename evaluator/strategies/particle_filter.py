"""Particle filtering over reasoning steps (Puri et al. 2025, "A Probabilistic Inference Approach to
Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods", Alg. 1).

State-space view: the partial solution x_t (t steps) is the latent state, the policy p_θ(x_t | x_{t-1})
the transition, and the PRM score r_t = agg(PRM(x_t)) (default agg = last) the observation. With N
particles per problem, at each step:

    1. propagate: every unfinished particle generates one step, x_t^i ~ p_θ(· | x_{t-1}^i);
    2. weight:    log w^i += logit(r_t^i) / T  (T = search.weight_temperature)        (finished particles re-use their final score;
                  one that finished without stating an answer gets r = 0);
                  w̄^i = softmax(log w)^i,   ESS = 1 / Σ_i (w̄^i)²;
    3. resample:  if ESS < ess_threshold·N (every step when ess_threshold ≥ 1): draw N ancestors
                  a^i ~ Categorical(w̄) (multinomial or systematic), x^i ← x^{a^i}, log w ← 0.

Finished particles stay in the pool with their final score (they can be resampled, never extended).
Stop when every particle is finished (or after max_steps). Answer (``search.final``): the weighted-majority
answer, â = argmax_a Σ_i r_final^i · 1[ans(x^i) = a] over the final particles (default), or the finished
particle with the best final score among those stating an answer (``best``). Why the vote by default: the
final pool approximates the posterior over solutions, and a small PRM ranks complete solutions poorly, so
summing its scores over the particles that agree is more robust than trusting its single highest score
(docs/benchmarks.md).

The SMC loop :func:`smc` also runs conditional SMC for :mod:`frugal.evaluator.strategies.particle_gibbs`: a
reference trajectory per problem keeps slot 0 at every step and is never resampled away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from frugal.inference.engine import Candidate
from frugal.evaluator.config import PRMSearchConfig
from frugal.evaluator.strategies.common import Result, best, has_answer, logit, solution_score, vote
from frugal.runtime.registry import register


@register("search")
@dataclass
class ParticleFilterConfig(PRMSearchConfig):
    name: str = "particle_filter"
    # Particle weights ∝ exp(logit(r) / weight_temperature). Not the sampling temperature (engine.temperature).
    weight_temperature: float = 1.0
    resampling: str = "systematic"  # multinomial | systematic
    # Resample when ESS < ess_threshold·N (>= 1: every step, as Puri et al.). 0.5 is the usual adaptive
    # rule (Doucet & Johansen 2009, §3.5): resample once the weights have degenerated, not while they are
    # near-uniform, where resampling only throws away distinct particles (diversity) for nothing.
    ess_threshold: float = 0.5
    # The answer: weighted_majority (sum of final PRM scores per answer, over the final particles) | best
    # (the highest final score). Weighted majority is the default because a small PRM ranks complete
    # solutions poorly (docs/benchmarks.md).
    final: str = "weighted_majority"

    def __post_init__(self):
        super().__post_init__()
        if self.weight_temperature <= 0:
            raise ValueError(f"search.weight_temperature must be > 0, got {self.weight_temperature}")
        if self.resampling not in ("multinomial", "systematic"):
            raise ValueError(f"search.resampling must be multinomial|systematic, got {self.resampling!r}")
        if self.ess_threshold < 0:
            raise ValueError(f"search.ess_threshold must be >= 0, got {self.ess_threshold}")
        if self.final not in ("best", "weighted_majority"):
            raise ValueError(f"search.final must be best|weighted_majority, got {self.final!r}")


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    swarms = smc(problems, budget, engine, prm, cfg)
    return [Result(choose(s.particles, problems, cfg), s.particles, {"resamples": s.resamples}) for s in swarms]


def choose(particles: Sequence[Candidate], problems, cfg) -> Candidate:
    pool = [c for c in particles if c.finished] or list(particles)
    if cfg.final == "weighted_majority":
        return vote(pool, problems, [solution_score(c, cfg.aggregation) for c in pool])
    return best(pool, cfg.aggregation, problems)


# ---------------------------------------------------------------------- resampling

def multinomial_resample(weights: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n i.i.d. ancestor indices a ~ Categorical(weights)."""
    return torch.multinomial(weights.double(), n, replacement=True, generator=generator)


def systematic_resample(weights: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Systematic resampling (Kitagawa 1996): one u ~ U[0, 1/n), points u + k/n, ancestor = the index whose
    cumulative-weight interval holds the point. Unbiased (E[#copies of i] = n·w_i) and each count is
    ⌊n·w_i⌋ or ⌈n·w_i⌉, so far less resampling noise than multinomial."""
    w = weights.double() / weights.double().sum()
    u = torch.rand((), generator=generator, dtype=torch.float64) / n
    points = u + torch.arange(n, dtype=torch.float64) / n
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0  # guard against round-off leaving the last point outside
    return torch.searchsorted(cdf, points, right=True).clamp(max=len(w) - 1)


RESAMPLERS = {"multinomial": multinomial_resample, "systematic": systematic_resample}


def normalized(log_weights: torch.Tensor) -> torch.Tensor:
    return torch.softmax(log_weights.double(), 0)


def ess(weights: torch.Tensor) -> float:
    """Effective sample size 1 / Σ w² of normalised weights."""
    return float(1.0 / (weights.double() ** 2).sum())


# ---------------------------------------------------------------------- the SMC loop

@dataclass
class Swarm:
    """One problem's particles, their log-weights and per-step histories (for particle Gibbs)."""

    particles: list[Candidate]
    log_weights: torch.Tensor
    histories: list[list[Candidate]]  # histories[i][t] = particle i after t+1 steps
    resamples: int = 0


def smc(problems, n: int, engine, prm, cfg, references: Optional[list[Optional[list[Candidate]]]] = None,
        generator: Optional[torch.Generator] = None, first_stream: int = 0) -> list[Swarm]:
    """Run (conditional) SMC with ``n`` particles per problem. ``references[p]``, when given, is a
    trajectory (the states after steps 1, 2, …) that occupies slot 0 of problem p throughout. Particle i
    starts on random stream ``first_stream + i`` (particle 0..n−1: best-of-N's candidates' streams)."""
    references = references or [None] * len(problems)
    resample = RESAMPLERS[cfg.resampling]
    swarms = [Swarm([Candidate(p, stream=first_stream + i) for i in range(n)], torch.zeros(n, dtype=torch.float64),
                    [[] for _ in range(n)]) for p in range(len(problems))]
    for t in range(engine.cfg.max_steps + 1):
        # 1. propagate every unfinished non-reference particle (one engine call for all problems)
        slots = [(p, i) for p, s in enumerate(swarms) for i, c in enumerate(s.particles)
                 if not c.finished and not (references[p] is not None and i == 0)]
        if not slots and all(_reference_done(references[p], t) for p in range(len(swarms))):
            break
        moved = engine.extend(problems, [swarms[p].particles[i] for p, i in slots])
        prm.score_candidates(problems, moved)
        for (p, i), c in zip(slots, moved):
            swarms[p].particles[i] = c
        for p, s in enumerate(swarms):
            if references[p] is not None:
                s.particles[0] = _reference_at(references[p], t)
            for i, c in enumerate(s.particles):
                s.histories[i].append(c)
            # 2. weight by the (final or current) PRM score; a particle that finished without stating an
            #    answer is a dead end (it can never be graded right), so it weighs nothing and resampling
            #    replaces it (its last step's score says only that the steps so far are right)
            scores = [solution_score(c, cfg.aggregation) if not c.finished or has_answer(c, problems) else 0.0
                      for c in s.particles]
            s.log_weights += torch.tensor([logit(r) / cfg.weight_temperature for r in scores], dtype=torch.float64)
            if all(c.finished for c in s.particles):
                continue
            # 3. resample when the weights have degenerated (or every step)
            w = normalized(s.log_weights)
            if cfg.ess_threshold >= 1 or ess(w) < cfg.ess_threshold * n:
                fixed = 1 if references[p] is not None else 0
                ancestors = [0] * fixed + resample(w, n - fixed, generator).tolist()
                # an ancestor's first copy carries on as it was; its duplicates fork (else they would
                # write the same next steps: every candidate samples from its own stream)
                seen, particles = set(), []
                for i, a in enumerate(ancestors):
                    particles.append(s.particles[a].fork(i) if a in seen else s.particles[a].copy())
                    seen.add(a)
                s.particles = particles
                s.histories = [list(s.histories[a]) for a in ancestors]
                s.log_weights = torch.zeros(n, dtype=torch.float64)
                s.resamples += 1
    return swarms


def _reference_at(reference: list[Candidate], t: int) -> Candidate:
    return reference[min(t, len(reference) - 1)].copy()


def _reference_done(reference: Optional[list[Candidate]], t: int) -> bool:
    return reference is None or t >= len(reference) - 1

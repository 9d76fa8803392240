"""Particle Gibbs: iterated conditional SMC (Andrieu, Doucet & Holenstein 2010, "Particle Markov chain
Monte Carlo methods"; applied to reasoning steps by Puri et al. 2025, Alg. 2).

Sweep k runs particle filtering (:func:`frugal.evaluator.strategies.particle_filter.smc`) with N' = max(2,
budget // sweeps) particles per problem, where slot 0 holds the reference trajectory x*^(k−1) at every
step and is never resampled away (the other N'−1 particles resample from all N', reference included).
After the sweep a new reference is drawn from the final particles with probability ∝ exp(logit(r)/T) (T = search.weight_temperature):

    x*^(k) ~ Σ_i w̄_i δ(x_i^(k)),   w̄ = softmax(logit(r_i)/T)

The first sweep has no reference (plain particle filtering). The answer is chosen (best or weighted
majority, ``search.final``) from the final particles of all sweeps. The total budget is split over
sweeps so particle Gibbs at budget N spends about as many policy tokens as particle filtering at N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugal.evaluator.strategies.common import Result, logit, solution_score
from frugal.evaluator.strategies.particle_filter import ParticleFilterConfig, choose, smc
from frugal.runtime.registry import register


@register("search")
@dataclass
class ParticleGibbsConfig(ParticleFilterConfig):
    name: str = "particle_gibbs"
    ess_threshold: float = 1.0  # every step, as Puri et al.'s particle Gibbs
    sweeps: int = 2  # conditional SMC sweeps; each uses budget // sweeps particles

    def __post_init__(self):
        super().__post_init__()
        if self.sweeps < 1:
            raise ValueError(f"search.sweeps must be >= 1, got {self.sweeps}")


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    n = max(2, budget // cfg.sweeps)
    references = [None] * len(problems)
    pools = [[] for _ in problems]
    for sweep in range(cfg.sweeps):  # each sweep's particles sample from streams of their own
        swarms = smc(problems, n, engine, prm, cfg, references, first_stream=sweep * n)
        for p, s in enumerate(swarms):
            pools[p] += s.particles
            final = torch.tensor([logit(solution_score(c, cfg.aggregation)) / cfg.weight_temperature for c in s.particles])
            pick = int(torch.multinomial(torch.softmax(final.double(), 0), 1))
            references[p] = s.histories[pick]
    return [Result(choose(pool, problems, cfg), pool) for pool in pools]

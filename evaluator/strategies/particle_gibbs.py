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

import torch

from frugal.evaluator.strategies.common import Result, logit, solution_score
from frugal.evaluator.strategies.particle_filter import choose, smc


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

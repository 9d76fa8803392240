"""Search strategies, one module each, all with ``run(problems, budget, engine, prm, cfg) -> list[Result]``.

``problems`` are task rows (``prompt``, ``answer_format``…), ``budget`` is N (samples, beams or
particles), ``engine`` an :class:`frugal.evaluator.engine.Engine`, ``prm`` an
:class:`frugal.evaluator.engine.CountingPRM` (None for greedy and majority), ``cfg`` the ``search``
config. Results are graded by the harness.

The registry below is a plain mapping so that ``search=particle_filter`` can be followed to its module
by a reader or a static tool.
"""

from __future__ import annotations

from frugal.evaluator.strategies import (beam, best_of_n, dvts, early_rejection, greedy, majority, particle_filter,
                                         particle_gibbs, ssr)

RUNNERS = {
    "greedy": greedy.run,
    "majority": majority.run,
    "best_of_n": best_of_n.run,
    "beam": beam.run,
    "dvts": dvts.run,
    "early_rejection": early_rejection.run,
    "particle_filter": particle_filter.run,
    "particle_gibbs": particle_gibbs.run,
    "ssr": ssr.run,
}


def get(name: str):
    """The ``run`` function of strategy ``name``."""
    if name not in RUNNERS:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {'|'.join(RUNNERS)}")
    return RUNNERS[name]

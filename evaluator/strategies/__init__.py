"""Search strategies, one module each, all with ``run(problems, budget, engine, prm, cfg) -> list[Result]``.

Every model a strategy runs is reported (:func:`prepare`): the harness sums all of them into
``flops_total`` and lists each in ``summary.json``. A strategy that needs a model of its own (SSR's draft)
gets it from :func:`prepare`, built fresh for each ``run_strategy`` (no module-level engine holds counts
from one run to the next).

``problems`` are task rows (``prompt``, ``answer_format``…), ``budget`` is N (samples, beams or
particles), ``engine`` an :class:`frugal.inference.engine.Engine`, ``prm`` an
:class:`frugal.inference.engine.CountingPRM` (None for greedy and majority), ``cfg`` the ``search``
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


def prepare(name: str, engine, prm, cfg) -> tuple:
    """``(run, models)`` for strategy ``name``: its run function (extra models bound) and every model it
    runs, by role — ``policy`` (``target`` for SSR, whose draft writes and the evaluated policy checks),
    ``draft`` (SSR) and ``prm`` when given — each with ``counts`` (an ``Engine`` or a ``CountingPRM``)."""
    import functools

    run = get(name)
    if name == "ssr":
        draft = ssr.draft_engine(cfg.ssr, engine)
        models = {"target": engine, "draft": draft}
        run = functools.partial(ssr.run, draft=draft)
    else:
        models = {"policy": engine}
    if prm is not None:
        models["prm"] = prm
    return run, models


def get(name: str):
    """The ``run`` function of strategy ``name``."""
    if name not in RUNNERS:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {'|'.join(RUNNERS)}")
    return RUNNERS[name]

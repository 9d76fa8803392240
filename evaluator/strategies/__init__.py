"""Search strategies, one module each, all with ``run(problems, budget, engine, prm, cfg) -> list[Result]``.

``problems`` are task rows (``prompt``, ``answer_format``…), ``budget`` is N (samples, beams or
particles), ``engine`` an :class:`evaluator.engine.Engine`, ``prm`` an :class:`evaluator.engine.CountingPRM`
(None for greedy and majority), ``cfg`` the ``search`` config. Results are graded by the harness.
"""

from __future__ import annotations

import importlib

from evaluator.config import STRATEGIES


def get(name: str):
    """The ``run`` function of strategy ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown search strategy {name!r}; choose one of {'|'.join(STRATEGIES)}")
    return importlib.import_module(f"evaluator.strategies.{name}").run

"""Search strategies, one module each, all with ``run(problems, budget, engine, prm, cfg) -> list[Result]``.

Every model a strategy runs is reported (:func:`prepare`): the harness sums all of them into
``flops_total`` and lists each in ``summary.json``. A strategy that needs a model of its own (SSR's draft)
gets it from :func:`prepare`, built fresh for each ``run_strategy`` (no module-level engine holds counts
from one run to the next).

``problems`` are task rows (``prompt``, ``answer_format``…), ``budget`` is N (samples, beams or
particles), ``engine`` an :class:`frugal.inference.engine.Engine`, ``prm`` an
:class:`frugal.evaluator.prm_counts.CountingPRM` (None for greedy and majority), ``cfg`` the ``search``
config. Results are graded by the harness.

A strategy is one module of this package: its config dataclass, registered with ``@register("search")``
(:mod:`frugal.runtime.registry`), and its ``run``; ``search=<name>`` then needs only
``conf/search/<name>.yaml`` (``defaults: [<name>_schema]``). Importing this package imports every module
in it (alphabetically, which is the order ``search=`` lists its choices in), so a new module registers
itself; :data:`RUNNERS` and :func:`get` look strategies up in the registry (``search=particle_filter`` is
``ParticleFilterConfig`` in ``particle_filter.py``, its ``run`` beside it).
"""

from __future__ import annotations

import importlib
import pkgutil

from frugal.runtime import registry

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

RUNNERS = registry.view("search", lambda cls: cls.runner())  # name -> run function, live over the registry


def prepare(name: str, engine, prm, cfg) -> tuple:
    """``(run, models)`` for strategy ``name``: its run function (extra models bound) and every model it
    runs, by role — ``policy`` (``target`` for SSR, whose draft writes and the evaluated policy checks),
    ``draft`` (SSR) and ``prm`` when given — each with ``counts`` (an ``Engine`` or a ``CountingPRM``).
    The strategy's config class decides (``SearchConfig.prepare``; SSR's builds its draft)."""
    return registry.get("search", name).prepare(cfg, engine, prm)


def get(name: str):
    """The ``run`` function of strategy ``name`` (an unknown name is refused, listing the choices)."""
    return registry.get("search", name).runner()

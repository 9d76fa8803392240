"""A weighted sum of reward functions chosen by config.

``reward.functions`` lists ``{name, weight, kwargs}``; ``name`` is a built-in (:data:`rewards.functions.
BUILTIN`) or an import path ``package.module:function`` (``package.module.function`` works too), so TRL
reward functions plug in unchanged. Like TRL, a function may return None for samples it does not apply to:
those count as NaN in its own metric and as 0 in the weighted total.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from frugal.rewards.functions import BUILTIN, completion_text


@dataclass
class RewardFunctionConfig:
    name: str = "correctness"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=lambda: [RewardFunctionConfig()])

    def __post_init__(self):
        if not self.functions:
            raise ValueError("reward.functions is empty: name at least one reward function")


@dataclass
class Rewards:
    total: list[float]
    per_function: dict[str, list[float | None]]


def resolve_reward_function(name: str) -> Callable:
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward function {name!r}: not a built-in ({', '.join(BUILTIN)}) "
                         "and not an import path like 'my_pkg.rewards:my_reward'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward function {name!r} could not be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn


class RewardModel:
    def __init__(self, functions: list[tuple[str, Callable, float, dict]]):
        self.functions = functions

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> Rewards:
        n = len(completions)
        total = [0.0] * n
        per_function = {}
        for name, fn, weight, kwargs in self.functions:
            values = self._call_one(name, fn, prompts, completions, columns, kwargs)
            per_function[name] = values
            for i, v in enumerate(values):
                if v is not None and not math.isnan(v):
                    total[i] += weight * v
        return Rewards(total, per_function)

    @staticmethod
    def _call_one(name, fn, prompts, completions, columns, kwargs) -> list[float | None]:
        try:
            values = fn(prompts=prompts, completions=completions, **columns, **kwargs)
        except Exception as err:
            sample = _first_failing_sample(fn, prompts, completions, columns, kwargs)
            raise RuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}{sample}") from err
        values = list(values)
        if len(values) != len(completions):
            raise RuntimeError(f"reward function {name!r} returned {len(values)} values for {len(completions)} completions")
        bad = [i for i, v in enumerate(values) if v is not None and not isinstance(v, (int, float))]
        if bad:
            raise RuntimeError(f"reward function {name!r} returned a non-number for sample {bad[0]}: {values[bad[0]]!r}")
        return [None if v is None else float(v) for v in values]


def _first_failing_sample(fn, prompts, completions, columns, kwargs) -> str:
    """Re-run one sample at a time to name the sample that makes a reward function fail."""
    for i in range(len(completions)):
        one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in columns.items()}
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **one, **kwargs)
        except Exception:
            text = completion_text(completions[i])
            return f"\n  first failing sample {i}: completion {text[:200]!r}" + (
                f", id {one['id'][0]!r}" if "id" in one else "")
    return ""


def build_reward_model(cfg: RewardConfig) -> RewardModel:
    return RewardModel([(f.name, resolve_reward_function(f.name), float(f.weight), dict(f.kwargs)) for f in cfg.functions])

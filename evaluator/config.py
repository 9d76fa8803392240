"""Structured configs of ``frugal eval`` (registered in Hydra's ConfigStore like ``train/config.py``).

A search strategy is one module, ``evaluator/strategies/<name>.py``: its config dataclass (derived from
:class:`SearchConfig`, :class:`BudgetedConfig` or :class:`PRMSearchConfig` here, registered with
``@register("search")``) and its ``run(problems, budget, engine, prm, cfg)``; plus
``conf/search/<name>.yaml`` (``defaults: [<name>_schema]``). ``frugal.evaluator.strategies`` imports every
module of its folder, so the new strategy is a choice of ``search=`` with nothing else edited. The
strategies' configs stay importable from here (``from frugal.evaluator.config import BeamConfig``: a lazy
re-export, since the strategy modules import this one)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from hydra.core.config_store import ConfigStore

from frugal.inference.vllm_setup import RENAMED as VLLM_RENAMED, VLLMConfig
from frugal.tasks.config import TaskConfig
from frugal.runtime.config import (LoggerConfig, SeededRunConfig, Variant, make_variant, fill_variants, register_variants, store_open_choice, variant_field)
from frugal.runtime import registry
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRM_CONFIG_FILE, PRMConfig
from frugal.train.prm_steps import AGGREGATIONS


# ---------------------------------------------------------------------- search=<strategy>
# One dataclass per strategy, holding only the knobs that strategy reads, in the strategy's module (the
# module docstring of runtime/config.py says how `to_config` refuses another strategy's knob, naming the
# strategy it belongs to). The bases every strategy derives from are here.

@dataclass
class SearchConfig(Variant):
    """Base of the strategies' configs (``search.name`` picks one: :data:`SEARCH_VARIANTS`).

    The behaviour goes with the config: :meth:`runner` is the strategy's run function — ``RUN`` when a
    class sets it, otherwise the ``run`` of the module that defines the class (one module per strategy) —
    and :meth:`prepare` builds what a run needs besides the policy (SSR's draft overrides it)."""

    GROUP: ClassVar[str] = "search"
    RUN: ClassVar[Optional[Callable]] = None  # None: `run` of the module defining the config class
    name: str

    @classmethod
    def runner(cls) -> Callable:
        """``run(problems, budget, engine, prm, cfg) -> list[Result]`` of this strategy."""
        if cls.RUN is not None:
            return cls.RUN
        run = getattr(sys.modules[cls.__module__], "run", None)
        if run is None:
            raise TypeError(f"search={cls.name}: {cls.__module__} defines no run(problems, budget, engine, prm, "
                            f"cfg), and {cls.__name__}.RUN is not set")
        return run

    def prepare(self, engine, prm) -> tuple:
        """``(run, models)``: the run function (extra models bound) and every model it runs, by role
        (:func:`frugal.evaluator.strategies.prepare`)."""
        models = {"policy": engine}
        if prm is not None:
            models["prm"] = prm
        return self.runner(), models

    def needs_prm(self) -> Optional[str]:
        """Why this config needs ``prm_path`` (a sentence), or None when it does not."""
        return None


registry.discover("search", "frugal.evaluator.strategies")  # imports every strategy module: they register
registry.discover("prm_family", "frugal.evaluator.hub_prm")


@dataclass
class BudgetedConfig(SearchConfig):
    """A strategy run at several budgets N."""

    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # N: samples / beams / particles / paths

    def __post_init__(self):
        super().__post_init__()
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"search.budgets must be a non-empty list of integers >= 1, got {list(self.budgets)}")


@dataclass
class PRMSearchConfig(BudgetedConfig):
    """A PRM-guided strategy (``prm_path`` required)."""

    aggregation: str = "last"  # PRM step scores -> solution score: last | min | prod | mean

    def __post_init__(self):
        super().__post_init__()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"search.aggregation must be one of {'|'.join(AGGREGATIONS)}, got {self.aggregation!r}")

    def needs_prm(self) -> Optional[str]:
        return f"search={self.name} is PRM-guided"


SEARCH_VARIANTS = registry.view("search")  # name -> config class, live over the registry
# Where the strategies' configs live now (re-exported lazily by __getattr__ below).
MOVED = {"GreedyConfig": "greedy", "MajorityConfig": "majority", "BestOfNConfig": "best_of_n",
         "BeamConfig": "beam", "DVTSConfig": "dvts", "EarlyRejectionConfig": "early_rejection",
         "ParticleFilterConfig": "particle_filter", "ParticleGibbsConfig": "particle_gibbs",
         "SSRSearchConfig": "ssr", "SSRConfig": "ssr", "DEFAULT_HINTS": "ssr"}


def __getattr__(name: str):
    """``STRATEGIES`` (the registered strategies' names), ``NEEDS_PRM`` (the PRM-guided ones) and the
    configs of the strategies, which their own modules define (:data:`MOVED`)."""
    if name == "STRATEGIES":
        return registry.names("search")
    if name == "NEEDS_PRM":
        return tuple(n for n, c in registry.variants("search").items() if issubclass(c, PRMSearchConfig))
    if name in MOVED:
        import importlib

        return getattr(importlib.import_module(f"frugal.evaluator.strategies.{MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SEARCH_RENAMED = {"temperature": (
    "search.temperature was renamed search.weight_temperature (the particle weights' temperature, "
    "search=particle_filter|particle_gibbs); the sampling temperature is engine.temperature")}


def search_config(name: str, **knobs) -> SearchConfig:
    """The config of strategy ``name`` from Python (scripts, tests), refusing another strategy's knob as
    ``frugal eval`` does: ``search_config("beam", beam_width=2)``."""
    return make_variant("search", name, SEARCH_RENAMED, **knobs)


@dataclass
class EvalConfig(SeededRunConfig):
    RENAMED: ClassVar[dict[str, str]] = VLLM_RENAMED  # former keys, refused with their new names
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    engine: Any = variant_field("engine", "hf")  # a registered backend's config, by engine.backend
    # the one vllm block (shared with frugal train; its training-only keys are refused here)
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig(max_model_len=2048, gpu_memory_utilization=0.9))
    search: Any = variant_field("search", "best_of_n", SEARCH_RENAMED)  # a registered strategy's config, by search.name
    # A PRM: a folder from `frugal train-prm`, or a Hub checkpoint (an id or its downloaded folder; see
    # evaluator/hub_prm.py); PRM-guided strategies need one. Not called `prm`: that name is the PRM recipe's
    # config group, and Hydra would read `prm=<path>` as a choice in that group.
    prm_path: Optional[str] = None
    # frugal | qwen2_math_prm | math_shepherd | rlhflow; None = detected (prm.json, config.json architectures)
    prm_family: Optional[str] = None
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    split: str = "test"  # test | train
    limit: Optional[int] = None  # first `limit` problems of the split (None = all)
    problems_per_call: int = 32  # problems whose candidates share engine calls (progress granularity)
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        fill_variants(self)
        if self.split not in ("test", "train"):
            raise ValueError(f"split must be test|train, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        if self.problems_per_call < 1:
            raise ValueError(f"problems_per_call must be >= 1, got {self.problems_per_call}")
        check_vllm_block(self.vllm, self.engine.backend)
        why = self.search.needs_prm()  # PRM-guided, or SSR judging drafted steps with a PRM
        if why and not self.prm_path:
            raise ValueError(f"{why}: set prm_path=<PRM folder or Hub id> "
                             "(a folder written by `frugal train-prm`, or e.g. Qwen/Qwen2.5-Math-PRM-7B)")
        families = registry.names("prm_family")  # evaluator/hub_prm.py registers them
        if self.prm_family is not None and self.prm_family not in families:
            raise ValueError(f"prm_family must be one of {'|'.join(families)} or null, got {self.prm_family!r}")


def check_prm_separator(cfg: EvalConfig) -> None:
    """The step separator is one concept with three keys: ``task.prompt.step_separator`` (how few-shot
    solutions are written), ``engine.step_delimiter`` (where the engine ends a step) and the PRM's
    ``separator`` (how it splits a solution into steps, saved in the PRM folder's prm.json by
    ``frugal train-prm``). With a ``prm_path``, refuse a config whose keys disagree with the PRM, saying
    which key to set to what. Reads prm.json only: nothing is loaded. A Hub PRM (``prm_family`` other than
    frugal, or a path without prm.json that is no Frugal folder) splits steps on ``engine.step_delimiter``:
    nothing to check."""
    if not cfg.prm_path or cfg.prm_family not in (None, "frugal"):
        return
    meta_path = Path(cfg.prm_path) / PRM_CONFIG_FILE
    local = Path(cfg.prm_path)
    if cfg.prm_family is None and not meta_path.is_file() and (not local.is_dir() or (local / "config.json").is_file()):
        return  # a Hub id or checkpoint folder (hub_prm.detect_family decides at load time)
    if not meta_path.is_file():
        raise FileNotFoundError(f"prm_path={cfg.prm_path} is not a PRM folder (no {PRM_CONFIG_FILE}) nor a Hub "
                                "checkpoint (no config.json); train one with `frugal train-prm` or name a Hub PRM")
    saved = json.loads(meta_path.read_text()).get("separator", PRMConfig.separator)
    wrong = [(key, value) for key, value in (("engine.step_delimiter", cfg.engine.step_delimiter),
                                             ("task.prompt.step_separator", cfg.task.prompt.step_separator))
             if value != saved]
    if wrong:
        fixes = "; ".join(f"{key} is {value!r}: set {key}={saved!r}" for key, value in wrong)
        hint = (" (Hydra's command line keeps a backslash as typed: '\\n' there is a backslash and an n; quote a "
                "real newline, e.g. bash $'\\n', or set the key in a YAML file, where \"\\n\" is a newline)"
                if any("\\" in value and "\\" not in saved for _, value in wrong) else "")
        raise ValueError(f"the PRM at prm_path={cfg.prm_path} splits steps on {saved!r} (its {PRM_CONFIG_FILE} "
                         f"separator), but {fixes}: one step separator for the task's prompts, the engine and "
                         f"the PRM{hint}")


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    register_variants("search")
    store_open_choice("engine", "hf")


def check_vllm_block(vllm: VLLMConfig, backend: str) -> None:
    """The ``vllm`` block of an evaluation recipe: its training-only keys are refused, and its keys apply
    with ``engine.backend=vllm`` only."""
    default = VLLMConfig(max_model_len=2048, gpu_memory_utilization=0.9)
    training = vllm.changed(default, VLLMConfig.TRAINING_ONLY)
    if training:
        raise ValueError(f"{', '.join('vllm.' + k for k in training)}: frugal train's (its rollouts); an evaluation "
                         "reaches a server with engine.backend=openai engine.base_url=<url>/v1")
    if backend != "vllm":
        changed = vllm.changed(default, [k for k in ("dtype", "max_model_len", "gpu_memory_utilization", "kv_cache_gib")])
        if changed:
            raise ValueError(f"{', '.join('vllm.' + k for k in changed)}: the vllm block applies with "
                             f"engine.backend=vllm, not engine.backend={backend}")

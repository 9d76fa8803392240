"""``engine.backend=hf|vllm|openai``: :func:`make_engine`, which every recipe and script that runs a policy
builds its engine with, and the discovery of backends.

A backend is one module ``frugal/inference/<name>_engine.py`` that defines its config (an
:class:`~frugal.inference.engine.EngineConfig` subclass registered with
``@frugal.runtime.registry.register("engine")``, its ``backend`` default being the name users choose) with
a ``build`` method that returns an object implementing :class:`~frugal.inference.engine.Engine`. This
module imports every ``*_engine`` module of the package, so a new backend needs no edit elsewhere; a
backend outside Frugal registers itself when its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

import torch

from frugal import inference
from frugal.inference.engine import Engine, EngineConfig
from frugal.runtime import registry

# The built-ins first, in the order messages list the choices (hf|vllm|openai), then any other backend module.
BUILT_IN = ("hf_engine", "vllm_engine", "openai_engine")
for _name in BUILT_IN + tuple(sorted(m.name for m in pkgutil.iter_modules(inference.__path__)
                                     if m.name.endswith("_engine") and m.name not in BUILT_IN)):
    importlib.import_module(f"{inference.__name__}.{_name}")


def engine_config(backend: str = "hf", **knobs) -> EngineConfig:
    """The config of ``backend`` from Python (scripts, tests), refusing another backend's knob as
    ``frugal eval`` does: ``engine_config("openai", base_url="http://127.0.0.1:8000/v1")``."""
    from frugal.inference.vllm_setup import RENAMED
    from frugal.runtime.config import make_variant

    renamed = {old.split(".", 1)[1]: f"{old} is now {new}" for old, new in RENAMED.items() if old.startswith("engine.")}
    return make_variant("engine", backend, renamed, **knobs)


def make_engine(model_cfg, cfg: EngineConfig, device: Optional[torch.device] = None, name: str = "policy",
                seed: int = 0, vllm: Any = None) -> Engine:
    """The policy's engine for ``cfg.backend`` (``model_cfg``: a ``frugal.inference.models.ModelConfig``;
    ``vllm``: the ``vllm`` config block, read by ``engine.backend=vllm``)."""
    registry.get("engine", cfg.backend)  # an unknown backend is named with the choices
    return cfg.build(model_cfg, device=device, name=name, seed=seed, vllm=vllm)

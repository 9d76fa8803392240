"""The one registry (runtime/registry.py): a search strategy is one module + one YAML file, an algorithm is one
registered config class whose methods the train recipe calls, and every lookup names the choices.

Every toy here is registered inside ``registry.scope()``, which undoes it (and its ConfigStore schema), so no
other test sees it."""

import importlib.util
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import TINY, tiny_lora
from frugal.conf import CONF_DIR
from frugal.runtime import registry
from frugal.runtime.config import Variant, make_variant, register_variants, to_config, variant_field
from frugal.runtime.registry import register

TOY_STRATEGY = '''
"""A toy strategy: N samples, the answer is sample number `pick` (a user's module, outside Frugal)."""
from dataclasses import dataclass

from frugal.evaluator.config import BudgetedConfig
from frugal.evaluator.strategies.common import Result, by_problem, fresh
from frugal.runtime.registry import register


@register("search")
@dataclass
class PickConfig(BudgetedConfig):
    name: str = "pick"
    pick: int = 1  # which of the N samples answers


def run(problems, budget, engine, prm, cfg):
    cands = engine.extend(problems, fresh(len(problems), budget), stop_at_step=False)
    return [Result(group[cfg.pick % len(group)], group) for group in by_problem(cands, len(problems))]
'''


def _yaml(folder, group, name, schema):
    (folder / group).mkdir(parents=True, exist_ok=True)
    (folder / group / f"{name}.yaml").write_text(f"defaults:\n  - {schema}_schema\n  - _self_\n\nname: {name}\n")


def _compose(config_name, overrides, searchpath):
    import frugal.recipes.eval  # noqa: F401  (registers the schemas)
    import frugal.recipes.train  # noqa: F401

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides + [f"hydra.searchpath=[file://{searchpath}]"])


def _import_file(path, name, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # removed again after the test
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------- search: one module + one YAML file

def test_a_strategy_is_one_module_and_one_yaml_file(tmp_path, monkeypatch):
    from frugal.evaluator import strategies
    from frugal.evaluator.config import EvalConfig
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig

    (tmp_path / "toy_pick_strategy.py").write_text(textwrap.dedent(TOY_STRATEGY))
    conf = tmp_path / "conf"
    _yaml(conf, "search", "pick", "pick")
    with registry.scope():
        toy = _import_file(tmp_path / "toy_pick_strategy.py", "toy_pick_strategy", monkeypatch)
        register_variants("search")  # what register_configs() did for the built-ins: pick_schema for Hydra
        assert "pick" in registry.names("search") and "pick" in strategies.RUNNERS

        # to_config takes search=pick with its own knob, and refuses another strategy's knob naming its owner
        cfg = to_config(_compose("eval", ["search=pick", "search.pick=2", "search.budgets=[3]"], conf), EvalConfig)
        assert type(cfg.search) is toy.PickConfig and (cfg.search.pick, cfg.search.budgets) == (2, [3])
        assert cfg.prm_path is None  # not PRM-guided: no prm_path needed
        with pytest.raises(ValueError) as err:
            to_config(_compose("eval", ["search=pick", "search.beam_width=2"], conf), EvalConfig)
        assert str(err.value) == "search.beam_width belongs to search=beam|dvts|early_rejection, not search=pick"
        with pytest.raises(ValueError) as err:  # and the toy's knob is its own
            to_config(_compose("eval", ["search=beam", "search.pick=2", "prm_path=/nonexistent"], conf), EvalConfig)
        assert str(err.value) == "search.pick belongs to search=pick, not search=beam"
        from frugal.evaluator.config import search_config

        assert search_config("pick", pick=0) == toy.PickConfig(pick=0)

        # looked up by name, it runs on the real engine like a built-in strategy
        assert strategies.get("pick") is toy.run
        model, tok = tiny_lora(1.0)  # varied samples
        problems = [{"prompt": [{"role": "user", "content": f"What is {a} + {a}?"}], "answer": str(2 * a),
                     "answer_format": "number"} for a in (1, 2)]
        engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=8), seed=3)
        run, models = strategies.prepare("pick", engine, None, cfg.search)
        assert models == {"policy": engine}
        results = run(problems, 3, engine, None, cfg.search)
        majority = strategies.get("majority")(problems, 3, engine, None, search_config("majority"))
        for res, maj in zip(results, majority):
            assert [c.text for c in res.candidates] == [c.text for c in maj.candidates]  # the same 3 samples
            assert res.chosen is res.candidates[2]
    # undone: the registry, the strategies' lookups and Hydra's ConfigStore no longer know it
    assert "pick" not in registry.names("search") and "pick" not in strategies.RUNNERS
    from hydra.core.config_store import ConfigStore

    assert "pick_schema.yaml" not in ConfigStore.instance().repo["search"]
    assert "beam_schema.yaml" in ConfigStore.instance().repo["search"]


def test_unknown_names_list_the_choices():
    import frugal.train.config  # noqa: F401  (registers the algorithms)
    from frugal.evaluator import strategies

    with pytest.raises(ValueError) as err:
        registry.get("search", "nope")
    assert str(err.value) == ("search.name must be one of beam|best_of_n|dvts|early_rejection|greedy|majority|"
                              "particle_filter|particle_gibbs|ssr, got 'nope'")
    with pytest.raises(ValueError, match=r"search\.name must be one of beam\|.*\|ssr, got 'nope'"):
        strategies.get("nope")
    with pytest.raises(ValueError, match=r"^prm_family must be one of frugal\|qwen2_math_prm\|math_shepherd\|rlhflow, "
                                         r"got 'nope'$"):
        registry.get("prm_family", "nope")
    with pytest.raises(ValueError, match=r"algo\.name must be one of sgrpo\|grpo\|tspmo, got 'ppo'"):
        make_variant("algo", "ppo")


def test_views_and_old_names_follow_the_registry():
    from frugal.evaluator import config as ec
    from frugal.evaluator.strategies.beam import BeamConfig
    from frugal.train.config import ALGO_VARIANTS

    assert ec.BeamConfig is BeamConfig and ec.SEARCH_VARIANTS["beam"] is BeamConfig
    assert ec.STRATEGIES == registry.names("search")
    assert set(ec.NEEDS_PRM) == {"beam", "best_of_n", "dvts", "early_rejection", "particle_filter", "particle_gibbs"}
    assert list(ALGO_VARIANTS) == ["sgrpo", "grpo", "tspmo"]


def test_a_taken_name_is_refused_and_a_base_cannot_register():
    from frugal.evaluator.config import BudgetedConfig, SearchConfig

    with registry.scope():
        with pytest.raises(ValueError, match=r"search=beam is already registered by frugal\.evaluator\.strategies\.beam"):
            @register("search")
            @dataclass
            class Beam2(BudgetedConfig):
                name: str = "beam"
        with pytest.raises(TypeError, match="no default 'name'"):
            register("search")(SearchConfig)
    assert registry.get("search", "beam").__module__ == "frugal.evaluator.strategies.beam"


# ---------------------------------------------------------------------- a discriminator other than `name`

@dataclass
class ToyEngineConfig(Variant):
    GROUP: ClassVar[str] = "toy_engine"
    KEY: ClassVar[str] = "backend"
    backend: str = ""
    temperature: float = 1.0


@dataclass
class ToyHF(ToyEngineConfig):
    backend: str = "hf"
    kv_cache_tokens: int = 100


@dataclass
class ToyVLLM(ToyEngineConfig):
    backend: str = "vllm"
    gpu_memory_utilization: float = 0.9


@dataclass
class ToyRecipeConfig:
    engine: Any = variant_field("toy_engine", default="hf")

    def __post_init__(self):
        from frugal.runtime.config import fill_variants

        fill_variants(self)


def test_a_group_chosen_by_another_key_names_it_in_messages():
    with registry.scope():
        register("toy_engine")(ToyHF)
        register("toy_engine")(ToyVLLM)
        assert registry.key("toy_engine") == "backend" and registry.names("toy_engine") == ("hf", "vllm")
        cfg = to_config(OmegaConf.create({"engine": {"backend": "vllm", "temperature": 0.5}}), ToyRecipeConfig)
        assert cfg.engine == ToyVLLM(temperature=0.5)
        assert ToyRecipeConfig().engine == ToyHF()  # absent: the default variant
        with pytest.raises(ValueError) as err:
            to_config(OmegaConf.create({"engine": {"backend": "vllm", "kv_cache_tokens": 5}}), ToyRecipeConfig)
        assert str(err.value) == "engine.kv_cache_tokens belongs to engine.backend=hf, not engine.backend=vllm"
        with pytest.raises(ValueError, match=r"engine\.backend must be one of hf\|vllm, got 'sglang'"):
            to_config(OmegaConf.create({"engine": {"backend": "sglang"}}), ToyRecipeConfig)
        with pytest.raises(ValueError) as err:
            make_variant("toy_engine", "hf", gpu_memory_utilization=0.5)
        assert str(err.value) == ("toy_engine.gpu_memory_utilization belongs to toy_engine.backend=vllm, "
                                  "not toy_engine.backend=hf")
        with pytest.raises(ValueError, match=r"toy_engine\.backend must be 'hf' in ToyHF, got 'vllm' \(choose the "
                                             r"variant with toy_engine\.backend=vllm\)"):
            ToyHF(backend="vllm")
        with pytest.raises(ValueError, match=r"toy_engine\.backend must be one of hf\|vllm, got 'x'"):
            registry.get("toy_engine", "x")
    assert registry.names("toy_engine") == ()


# ---------------------------------------------------------------------- algo: the recipe calls the config's methods

def test_a_new_algorithm_runs_in_the_train_recipe_unedited(tmp_path):
    from frugal.recipes.train import run
    from frugal.train.advantages import group_advantages
    from frugal.train.config import AlgoConfig
    from frugal.train.token_selection import Selection
    from frugal.train.tracking import read_jsonl

    calls = []
    conf = tmp_path / "conf"
    _yaml(conf, "algo", "first_tokens", "first_tokens")
    with registry.scope():
        @register("algo")
        @dataclass
        class FirstTokensConfig(AlgoConfig):
            """A toy: the first ``k`` completion tokens of each row, unscaled group advantages."""

            name: str = "first_tokens"
            k: int = 3

            def advantages(self, rewards, group_size):
                calls.append(("advantages", group_size))
                return group_advantages(torch.tensor(rewards), group_size, self.adv_eps, scale_by_std=False)

            def select(self, rollout, rewards, advantages):
                mask = rollout.completion_mask.bool()
                keep = mask & (torch.arange(mask.shape[1]) < self.k) & (advantages != 0).unsqueeze(1)
                rows, positions = keep.nonzero(as_tuple=True)
                calls.append(("select", len(rows)))
                return Selection(rows, positions, advantages[rows])

        register_variants("algo")
        overrides = TINY + ["algo=first_tokens", "algo.k=2", "max_steps=2", "eval_before=false", "eval_limit=1"]
        raw = _compose("train", overrides, conf)
        cfg = to_config(raw)  # the schema is the composed config's type (TrainConfig)
        assert type(cfg.algo) is FirstTokensConfig and cfg.algo.k == 2 and not cfg.algo.replays
        with pytest.raises(ValueError, match=r"algo\.p_keep belongs to algo=sgrpo, not algo=first_tokens"):
            to_config(_compose("train", ["algo=first_tokens", "algo.p_keep=0.1"], conf))
        run(raw, run_dir=tmp_path / "run")
    assert [c[0] for c in calls] == ["advantages", "select"] * 2
    assert all(g == 4 for name, g in calls if name == "advantages")  # algo.group_size=4 (TINY)
    selected = [r["tokens/selected"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert selected == [n for name, n in calls if name == "select"]
    assert all(0 < n <= 2 * 2 * 4 for n in selected)  # k=2 tokens x 2 prompts x 4 completions at most
    assert "first_tokens" not in registry.names("algo")

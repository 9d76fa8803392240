"""Fault drills for secrets (issue 21, items 7-9): a token on the command line or inside a longer value
reaches no file that Frugal, Hydra or W&B writes. Each test fails on the code before the fix."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TINY, compose_train

HF = "hf_" + "Q7x" * 10  # token-shaped, not a real token
WANDB_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 hex digits: a W&B API key's shape
OPENAI = "sk-" + "Zz9" * 10
ENV_SECRET = "my-env-secret-1234"  # the current value of HF_TOKEN: found inside any string


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                WANDB_SILENT="true", **extra)


def leaks(folder: Path, secrets: list[str]) -> list[str]:
    """Every (file, secret) where the secret's bytes appear, binary files included."""
    found = []
    for path in Path(folder).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_secret_overrides_do_not_reach_hydra_files(tmp_path):
    # Before: the refused override was already in .hydra/overrides.yaml, config.yaml and hydra.yaml.
    proc = subprocess.run([sys.executable, "-m", "frugal.recipes.train", *TINY, f"+hf_token={HF}",
                           f"+logger.api_key={WANDB_KEY}", f"logger.name=x-{OPENAI}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "hf_token" in proc.stderr  # refused, naming the key
    (hydra_dir,) = tmp_path.glob("outputs/train/*/*/.hydra")
    assert sorted(p.name for p in hydra_dir.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "+hf_token=***" in (hydra_dir / "overrides.yaml").read_text()
    assert leaks(tmp_path, [HF, WANDB_KEY, OPENAI]) == []


def test_wandb_run_files_hold_no_token_not_even_the_command_line(tmp_path):
    # Before: the full command line, token included, was in the W&B run file that `wandb sync` uploads.
    run_dir = tmp_path / "run"
    args = [*TINY, "max_steps=1", "eval_before=false", "logger=wandb", "logger.mode=offline",
            f"logger.name=run-{HF}", f"logger.tags=[t-{ENV_SECRET}]", f"output_dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "frugal.recipes.train", *args], cwd=tmp_path,
                          env=_env(HF_TOKEN=ENV_SECRET, WANDB_API_KEY=WANDB_KEY, WANDB_MODE="offline"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # the command line is recorded (scrubbed), so the grep below looks where the token used to be
    assert b"logger.name=run-***" in run_file.read_bytes()
    assert leaks(tmp_path, [HF, ENV_SECRET, WANDB_KEY]) == []
    assert HF not in proc.stdout + proc.stderr and ENV_SECRET not in proc.stdout + proc.stderr


def test_token_inside_a_longer_value_is_scrubbed_from_config_and_export(tmp_path, monkeypatch):
    # Before: logger.name=run-hf_… reached config.yaml and the exported frugal_config.yaml unchanged.
    from frugal.recipes.train import run
    from frugal.runtime.secrets import scrub_secrets
    from frugal.train.export import ExportConfig, export

    monkeypatch.setenv("OPENAI_API_KEY", "openai-env-value-42")
    run(compose_train(TINY + ["max_steps=1", "eval_before=false", f"logger.name=run-{HF}-x",
                              "logger.tags=[a-openai-env-value-42,b]"]), run_dir=tmp_path / "run")
    assert "name: run-***-x" in (tmp_path / "run" / "config.yaml").read_text()
    export(ExportConfig(source=str(tmp_path / "run"), output_dir=str(tmp_path / "out")))
    assert leaks(tmp_path, [HF, "openai-env-value-42"]) == []
    # every shape, inside longer strings; a revision pin (40 hex, like a W&B key) is kept under its key
    assert scrub_secrets({"a": f"x {WANDB_KEY} y", "b": [f"k={OPENAI}"], "model": {"revision": WANDB_KEY},
                          "c": "+hf_token=abc", "d": "plain"}) == {
        "a": "x *** y", "b": ["k=***"], "model": {"revision": WANDB_KEY}, "c": "+hf_token=***", "d": "plain"}

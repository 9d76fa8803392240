"""What a training run logs to Weights & Biases, read back from the offline run's own files.

The ``.wandb`` transaction log is decoded with wandb's own reader (``wandb leet inspect --json``, one
record per line); tables and images are the files wandb writes under ``<run>/wandb/offline-run-*/files``.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, compose_train

FAKE_SECRET = "hf_FakeTokenForWandbTest0123456789abcdefgh"
REWARDS = 'reward.functions=[{name:correctness,weight:1.0},{name:format,weight:0.5},{name:"reward_fixtures:share_of_letter_e",weight:1.0}]'


def read_records(run_dir: Path) -> list[dict]:
    (log_file,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    from frugal.recipes.train import run

    path = tmp_path_factory.mktemp("wandb_run")
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_SECRET
    try:
        run(compose_train(TINY + ["max_steps=2", "logger=wandb", "logger.mode=offline", "logger.completions_every=1",
                                  f"logger.name={FAKE_SECRET}", REWARDS]), run_dir=path)
    finally:
        os.environ.pop("HF_TOKEN") if old is None else os.environ.__setitem__("HF_TOKEN", old)
    return path, read_records(path)


def _of_type(records, kind):
    return [r[kind] for r in records if r.get("type") == kind]


def test_per_reward_function_metrics_each_step(wandb_run):
    run_dir, records = wandb_run
    history = [h["item"] for h in _of_type(records, "history")]
    train_steps = [h for h in history if "loss" in h]
    assert [h["_step"] for h in train_steps] == [1, 2]
    local = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    for h in train_steps:
        for name in ("reward/correctness", "reward/format", "reward/reward_fixtures:share_of_letter_e",
                     "reward/mean", "tokens/selected", "loss", "grad_norm"):
            assert name in h, f"{name} missing from the W&B history at step {h['_step']}"
        # the same numbers as the local metrics.jsonl
        assert h["reward/mean"] == pytest.approx(local[h["_step"]]["reward/mean"])
        assert h["reward/format"] == pytest.approx(local[h["_step"]]["reward/format"])
    assert any("eval/accuracy" in h for h in history)


def test_completions_table(wandb_run):
    run_dir, records = wandb_run
    logged = [h["item"] for h in _of_type(records, "history") if "completions._type" in h["item"]]
    assert [h["_step"] for h in logged] == [1, 2] and logged[0]["completions._type"] == "table-file"
    tables = sorted(run_dir.glob("wandb/offline-run-*/files/media/table/completions_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["question", "answer", "completion", "reward"]
    assert len(table["data"]) == 2 * 4  # prompts_per_step x group_size
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {row[0] for row in table["data"]} <= {s["question"] for s in samples}


def test_config_logged_without_secrets(wandb_run):
    run_dir, records = wandb_run
    (run,) = _of_type(records, "run")
    config = run["config"]["update"]
    assert config["algo"]["name"] == "sgrpo" and config["algo"]["group_size"] == 4
    assert config["model"]["name_or_path"] == "builtin:tiny-random"
    assert config["logger"]["name"] == "***"  # a secret value pasted into the config is scrubbed
    assert run.get("display_name") == "***"  # the run name passed to wandb.init too
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET.encode() not in path.read_bytes(), f"{path} holds the secret"


def test_final_adapter_logged_as_artifact(wandb_run):
    run_dir, records = wandb_run
    models = [a for a in _of_type(records, "artifact") if a["type"] == "model"]
    assert [a["name"] for a in models] == ["adapter-sgrpo-arith"]
    (artifact,) = models
    assert "latest" in artifact["aliases"]
    contents = {c["path"]: c["digest"] for c in artifact["manifest"]["contents"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(contents)
    # the artifact holds exactly the final adapter's bytes (wandb digests are base64 md5)
    weights = (run_dir / "final" / "adapter_model.safetensors").read_bytes()
    assert contents["adapter_model.safetensors"] == base64.b64encode(hashlib.md5(weights).digest()).decode()
    assert json.loads(artifact["metadata"])["steps"] == 2


def test_eval_summary_and_plots(tmp_path):
    """What ``frugal eval`` hands to the tracker: nested summary numbers and its plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from frugal.runtime.config import LoggerConfig
    from frugal.train.tracking import Tracker

    plot = tmp_path / "accuracy_vs_flops.png"
    plt.plot([1, 2], [0.2, 0.4])
    plt.savefig(plot)
    plt.close()
    tracker = Tracker(tmp_path, LoggerConfig(backend="wandb", mode="offline"), {"recipe": "eval"})
    rows = [{"strategy": "best_of_n", "budget": n, "problems": 8, "accuracy": acc, "flops_total": 1e12 * n}
            for n, acc in ((4, 0.625), (8, 0.75))]
    tracker.log_eval({"rows": rows, "run_dir": "x", "timing": {"wall_s": 3.5}}, plots=(plot,), step=0)
    tracker.finish()
    records = read_records(tmp_path)
    summary = {}
    for s in _of_type(records, "summary"):
        summary.update(s["update"])
    assert summary["eval/best_of_n/N4/accuracy"] == 0.625 and summary["eval/best_of_n/N8/accuracy"] == 0.75
    assert summary["eval/best_of_n/N8/flops_total"] == 8e12 and summary["eval/timing/wall_s"] == 3.5
    (logged,) = [h["item"] for h in _of_type(records, "history")]
    assert logged["eval/accuracy_vs_flops._type"] == "image-file" and logged["eval/summary._type"] == "table-file"
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/eval/accuracy_vs_flops*.png"))
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/eval/summary*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["strategy", "budget", "problems", "accuracy"] and len(table["data"]) == 2

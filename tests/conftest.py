import os
from pathlib import Path

import pytest
from frugal.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fast settings for the tiny random model: a full training step takes well under a second.
TINY = [
    "model=tiny_random", "logger=none", "task.n_train=32", "task.n_test=8",
    "prompts_per_step=2", "algo.group_size=4", "generation.max_new_tokens=12", "eval_limit=4",
    "save_every=0", "optim.micro_batch_size=4",
    'reward.functions=[{name:"reward_fixtures:share_of_letter_e",weight:1.0}]',
]


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import frugal.recipes.train  # noqa: F401  (registers the structured config schema)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def regraded_accuracy(path: Path, ids: list[str], answer_format: str) -> float:
    """The share of correct records in an eval_*.jsonl, each re-graded from its completion; the records
    must be exactly the problems ``ids``, in order."""
    from frugal.rewards.verify import is_correct
    from frugal.train.tracking import read_jsonl

    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert r["correct"] == is_correct(r["completion"], r["answer"], answer_format), r
    return sum(r["correct"] for r in rows) / len(rows)


@pytest.fixture
def tiny_overrides():
    return list(TINY)

import importlib.util
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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` skip, with the reason, where vLLM is not installed (``make test``);
    ``make test-vllm`` runs them in .venv-vllm."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed (make test-vllm runs these)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


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


def tiny_lora(scale: float = 0.02):
    """builtin:tiny-random with a LoRA adapter (r=4) whose B matrices are drawn from N(0, scale): LoRA B
    starts at zero, so without this the adapter would change nothing. With ``scale=1.0`` greedy outputs
    vary (the random tiny model alone repeats one token). Seeded: the same weights every call."""
    import torch

    from frugal.train.lora import LoraConfig, apply_lora
    from frugal.inference.models import ModelConfig, load_model

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    return model, tok

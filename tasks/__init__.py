"""Tasks: datasets and generators that yield chat-prompt rows with a gold answer.

Every task returns :class:`TaskData` with ``train`` and ``test`` lists of rows::

    {"id": "arith:3+4", "prompt": [{"role": "user", "content": ...}], "question": "What is 3 + 4?",
     "answer": "7", "steps": ["3 + 4 = 7"], "answer_format": "boxed"}

``steps`` is a reference step-by-step solution where the task has one (generated tasks, GSM8K), else [].
``answer_format`` travels with each row, so reward functions receive it as a column (TRL convention).
Held-out splits are fixed: generated and file tasks assign a problem to the test split by a hash of its
text, so the split does not move with the seed, ``n_train`` or the file's order.
"""

from __future__ import annotations

from frugal.tasks.config import TaskConfig
from frugal.tasks.rows import BadRow, TaskData, add_fewshot, check_prompt_lengths


def load_task(cfg: TaskConfig) -> TaskData:
    from frugal.tasks import benchmarks, files, generated

    loaders = {
        "arith": generated.arith, "multiply": generated.multiply, "svamp": files.svamp,
        "gsm8k": files.gsm8k, "jsonl": files.jsonl, "hf": files.hf,
        "math500": benchmarks.benchmark, "aime24": benchmarks.benchmark, "aime25": benchmarks.benchmark,
    }
    data = loaders[cfg.name](cfg)
    if cfg.prompt.num_fewshot:
        data = add_fewshot(data, cfg.prompt, cfg.name)
    if cfg.max_train is not None:
        data.train = data.train[: cfg.max_train]
    if cfg.max_test is not None:
        data.test = data.test[: cfg.max_test]
    return data


def require_train(data: TaskData, cfg: TaskConfig, recipe: str) -> None:
    """Refuse a task without training rows for a recipe that trains on them, saying why."""
    if data.train:
        return
    if data.info.get("eval_only"):
        raise ValueError(f"task={cfg.name} is an evaluation-only dataset (no train split), and {recipe} trains on "
                         f"the train split: train on another task (e.g. task=gsm8k) and evaluate with "
                         f"`frugal eval task={cfg.name}`")
    source = f" ({cfg.path})" if cfg.path else ""
    raise ValueError(f"task={cfg.name}{source}: the training split is empty ({len(data.test)} held-out rows, "
                     f"{data.skipped} bad rows skipped)")


__all__ = ["BadRow", "TaskConfig", "TaskData", "check_prompt_lengths", "load_task", "require_train"]

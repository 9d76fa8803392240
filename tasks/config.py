"""Task configuration (one structured config for every task; each task reads the keys it needs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TASKS = ("arith", "multiply", "svamp", "gsm8k", "jsonl", "hf", "math500", "aime24", "aime25")
ANSWER_FORMATS = ("boxed", "answer_line", "number")


@dataclass
class PromptConfig:
    # How the model is asked to give its answer, and how the reward reads it back:
    #   boxed       -> "\boxed{42}"      answer_line -> "Answer: 42"
    #   number      -> the last number in the reply (for small models that cannot follow a format yet)
    answer_format: str = "boxed"
    system: Optional[str] = None  # system message; None = none
    instruction: Optional[str] = None  # appended to the question; None = the default for answer_format
    # Worked examples before the question, as earlier chat turns: the first `num_fewshot` training rows
    # with a reference solution (steps joined by `step_separator`, then the answer in answer_format).
    # They show a small model the step format a PRM reads; those rows leave the training split.
    num_fewshot: int = 0
    step_separator: str = "\n\n"

    def __post_init__(self):
        if self.num_fewshot < 0:
            raise ValueError(f"task.prompt.num_fewshot must be >= 0, got {self.num_fewshot}")
        if not self.step_separator:
            raise ValueError("task.prompt.step_separator must not be empty")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"task.prompt.answer_format must be one of {'|'.join(ANSWER_FORMATS)}, "
                             f"got {self.answer_format!r}")


@dataclass
class TaskConfig:
    name: str = "arith"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    seed: int = 0  # generator seed (generated tasks) / shuffle seed for random splits
    on_bad_row: str = "error"  # error | skip (skipped rows are counted and reported)
    max_train: Optional[int] = None  # cap on loaded rows (after the split)
    max_test: Optional[int] = None
    # prompts longer than this many tokens (chat template included) are bad rows; the model's context less
    # generation.max_new_tokens always applies (checked when the tokenizer is loaded)
    max_prompt_tokens: Optional[int] = None
    # generated tasks (arith, multiply)
    ops: list[str] = field(default_factory=lambda: ["+"])
    digits: int = 1  # arith: digits per operand; multiply: digits of the first factor
    digits_b: int = 2  # multiply: digits of the second factor
    num_operands: int = 2
    n_train: int = 2000
    n_test: int = 200
    # file tasks (svamp, gsm8k, jsonl) and Hugging Face datasets (hf)
    path: Optional[str] = None
    test_path: Optional[str] = None
    test_fraction: float = 0.2  # held-out share when there is no separate test file / split
    question_field: str = "question"
    answer_field: str = "answer"
    answer_regex: Optional[str] = None  # one capture group that extracts the gold answer from answer_field
    train_split: str = "train"
    test_split: str = "test"
    config_name: Optional[str] = None  # hf (and the Hub benchmarks): the dataset's config (subset) name
    source: str = "auto"  # gsm8k: local (the JSONL file) | hub (openai/gsm8k, main) | auto (local file if found)

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"task.name must be one of {'|'.join(TASKS)}, got {self.name!r}")
        if self.source not in ("auto", "local", "hub"):
            raise ValueError(f"task.source must be auto|local|hub, got {self.source!r}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"task.on_bad_row must be error|skip, got {self.on_bad_row!r}")
        bad_ops = [op for op in self.ops if op not in ("+", "-", "*")]
        if bad_ops or not self.ops:
            raise ValueError(f"task.ops must be a non-empty list of '+', '-', '*', got {list(self.ops)}")
        if not 1 <= self.digits <= 12 or not 1 <= self.digits_b <= 12:
            raise ValueError("task.digits and task.digits_b must be in [1, 12]")
        if self.num_operands < 2:
            raise ValueError(f"task.num_operands must be >= 2, got {self.num_operands}")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError("task.n_train and task.n_test must be >= 0")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"task.test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"task.max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")
        for key in ("max_train", "max_test"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"task.{key} must be >= 0")

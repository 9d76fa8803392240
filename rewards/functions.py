"""Built-in reward functions, in TRL's convention ``fn(prompts, completions, **columns) -> list[float|None]``.

``completions`` are TRL-style: a list of chat messages per sample (``[{"role": "assistant", "content":
…}]``) or plain strings. Dataset columns (``answer``, ``answer_format``…) arrive as keyword lists, one
value per sample; a scalar keyword applies to every sample. Any TRL reward function can be used the same
way (see :mod:`frugal.rewards.combine`).
"""

from __future__ import annotations

from typing import Any

from frugal.rewards.verify import extract_answer, is_correct


def completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _per_sample(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"column {name!r} has {len(value)} values for {n} completions")
        return list(value)
    return [value] * n


def correctness(prompts, completions, answer, answer_format="boxed", **_) -> list[float]:
    """1.0 when the answer read from the completion (per ``answer_format``) equals the gold ``answer``."""
    n = len(completions)
    golds, formats = _per_sample(answer, n, "answer"), _per_sample(answer_format, n, "answer_format")
    return [float(is_correct(completion_text(c), str(g), f)) for c, g, f in zip(completions, golds, formats)]


def format(prompts, completions, answer_format="boxed", **_) -> list[float]:  # noqa: A001 (TRL-style name)
    """1.0 when an answer can be read in the requested format (a ``\\boxed{}``, an ``Answer:`` line…)."""
    formats = _per_sample(answer_format, len(completions), "answer_format")
    return [float(extract_answer(completion_text(c), f) is not None) for c, f in zip(completions, formats)]


def length_penalty(prompts, completions, target_chars: int = 400, **_) -> list[float]:
    """0 up to ``target_chars`` characters, then falling linearly to −1 at twice the target."""
    if target_chars <= 0:
        raise ValueError(f"length_penalty: target_chars must be > 0, got {target_chars}")
    return [-min(1.0, max(0, len(completion_text(c)) - target_chars) / target_chars) for c in completions]


BUILTIN = {"correctness": correctness, "format": format, "length_penalty": length_penalty}

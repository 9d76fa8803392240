"""A PRM's view of a solution: steps, their token layout, and how step scores become a solution score.

Token layout (fixed, so that training and scoring agree token for token): the prompt text plus
``PROMPT_SUFFIX`` is tokenized once, each step and the separator are tokenized on their own and
concatenated; each step is scored at the last token of the separator that follows it (TRL's
``PRMTrainer`` layout). The separator is any string: ``"\\n\\n"`` (default), ``"\\n"``, or a special token
already in the tokenizer's vocabulary (e.g. ``"<|im_end|>"``), so no embedding is ever resized.

    split_steps("4 * 5 = 20\\n\\n3 + 20 = 2", "\\n\\n")      # ["4 * 5 = 20", "3 + 20 = 2"] (partial step kept)
    encode(tokenizer, prompt, steps, "\\n\\n")                # Encoded(ids, positions, start)
    collate([...], pad_id)                                    # right-padded batch + flat step indices
    aggregate([0.97, 0.95], "min")                            # 0.95

The model that reads this layout is :mod:`frugal.train.prm`; its metrics are :mod:`frugal.train.prm_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

AGGREGATIONS = ("last", "min", "prod", "mean")
PROMPT_SUFFIX = "\n"  # between the prompt and the first step


# ---------------------------------------------------------------------- aggregation (the one place)

def aggregate(scores: Sequence[float], how: str = "min") -> float:
    """A solution score from its step scores.

    ``last``: the final step's score (the PRM has seen the whole solution); ``min``: the weakest step
    (Lightman et al. 2023; Math-Shepherd); ``prod``: P(all steps correct) under independence;
    ``mean``: average step score. No steps at all give 1.0 (no step has been judged wrong), which is
    what ``min`` and ``prod`` give for an empty product too.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {'|'.join(AGGREGATIONS)}, got {how!r}")
    scores = [float(s) for s in scores]
    if not scores:
        return 1.0
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------- steps and token layout

def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: a string as is, chat messages (task rows' ``prompt``) as the content of the
    last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1].get("content", ""))
    raise TypeError(f"a PRM prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


@dataclass
class Encoded:
    """One sequence: token ids and the index of the scored token (separator end) of each step."""

    ids: list[int]
    positions: list[int]
    start: int = 0  # index of the first step token (the prompt's token count)


def encode(tokenizer, prompt: Any, steps: Sequence[str], separator: str,
           max_length: Optional[int] = None) -> Encoded:
    """Token ids of ``prompt + PROMPT_SUFFIX + step_1 + sep + … + step_n + sep`` and, for each step, the
    position of the last token of the separator that follows it. With ``max_length``, steps that would
    not fit are dropped (their positions are absent), never cut in the middle."""
    ids = tokenizer(prompt_text(prompt) + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
    sep = separator_ids(tokenizer, separator)
    step_ids = tokenizer(list(steps), add_special_tokens=False)["input_ids"] if steps else []
    positions, start = [], len(ids)
    for piece in step_ids:
        if max_length is not None and len(ids) + len(piece) + len(sep) > max_length:
            break
        ids = ids + piece + sep
        positions.append(len(ids) - 1)
    return Encoded(list(ids), positions, start)


def separator_ids(tokenizer, separator: str) -> list[int]:
    """The separator's token ids (as :func:`encode` appends them after each step)."""
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prm.separator {separator!r} encodes to no tokens")
    return ids


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and, flat over every step, its row, the position of
    its scored token (``positions``) and of its first token (``starts``)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, positions, starts = [], [], []
    for r, e in enumerate(batch):
        ids[r, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[r, :len(e.ids)] = 1
        rows += [r] * len(e.positions)
        positions += e.positions
        starts += step_starts(e)
    return {"input_ids": ids, "attention_mask": mask, "rows": torch.tensor(rows, dtype=torch.long),
            "positions": torch.tensor(positions, dtype=torch.long), "starts": torch.tensor(starts, dtype=torch.long)}


def step_starts(e: Encoded) -> list[int]:
    """Index of the first token of each step of ``e`` (a step runs from there to its separator's end)."""
    return [e.start] + [p + 1 for p in e.positions[:-1]] if e.positions else []


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows × longest) stays under ``max_tokens``; sorted
    by length so that padding is small. A single longer sequence gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches

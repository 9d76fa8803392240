"""Row construction shared by every task: chat prompt, answer normalisation, bad-row policy, splits."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from frugal.tasks.config import PromptConfig

log = logging.getLogger(__name__)

INSTRUCTIONS = {
    "boxed": "Put your final answer within \\boxed{}.",
    "answer_line": "End your reply with a line 'Answer: <number>'.",
    "number": "",
}


# How a reference solution states its answer (few-shot examples; the PRM's generated data).
ANSWER_STEPS = {
    "boxed": "The answer is \\boxed{{{value}}}.",
    "answer_line": "Answer: {value}",
    "number": "The answer is \\boxed{{{value}}}.",  # graded by its last number
}


class BadRow(ValueError):
    """A data row that cannot be used; the message names the file (or task) and the row."""


@dataclass
class TaskData:
    train: list[dict]
    test: list[dict]
    skipped: int = 0  # rows dropped under on_bad_row=skip
    info: dict[str, Any] = field(default_factory=dict)


def chat_prompt(question: str, cfg: PromptConfig) -> list[dict]:
    instruction = INSTRUCTIONS[cfg.answer_format] if cfg.instruction is None else cfg.instruction
    content = f"{question}\n{instruction}".strip() if instruction else question
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    return messages + [{"role": "user", "content": content}]


def reference_solution(row: dict, separator: str = "\n\n") -> str:
    """A row's reference steps and its answer step (in the row's answer format), one step per piece."""
    answer = ANSWER_STEPS[row.get("answer_format", "boxed")].format(value=row["answer"])
    return separator.join([*row["steps"], answer])


def add_fewshot(data: TaskData, cfg: PromptConfig, source: str) -> TaskData:
    """Prepend ``cfg.num_fewshot`` worked examples (user question, assistant reference solution) to every
    row's chat prompt, taken from the first training rows that have reference steps; those rows are
    removed from the training split, so no prompt contains its own answer."""
    shots = [row for row in data.train if row.get("steps")][:cfg.num_fewshot]
    if len(shots) < cfg.num_fewshot:
        raise ValueError(f"task.prompt.num_fewshot={cfg.num_fewshot}: {source} has only {len(shots)} training "
                         "rows with reference steps (few-shot examples need worked solutions: arith, multiply, gsm8k)")
    turns = []
    for shot in shots:
        user = [m for m in shot["prompt"] if m["role"] == "user"]
        turns += [user[-1], {"role": "assistant", "content": reference_solution(shot, cfg.step_separator)}]

    def with_shots(row: dict) -> dict:
        system = [m for m in row["prompt"] if m["role"] == "system"]
        rest = [m for m in row["prompt"] if m["role"] != "system"]
        return {**row, "prompt": system + turns + rest}

    used = {id(row) for row in shots}
    return TaskData([with_shots(r) for r in data.train if id(r) not in used], [with_shots(r) for r in data.test],
                    data.skipped, {**data.info, "fewshot_ids": [row["id"] for row in shots]})


_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalize_answer(value: Any) -> str:
    """Gold answers as clean strings: 51.0 -> "51", "1,234" -> "1234", " $7. " -> "7"."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not an answer: {value!r}")
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip().rstrip(".").replace("$", "").strip()
    plain = text.replace(",", "")
    if _NUMBER.match(plain):
        number = float(plain)
        return str(int(number)) if number.is_integer() and abs(number) < 1e15 else plain
    return text


def make_row(row_id: str, question: Any, answer: Any, prompt_cfg: PromptConfig,
             steps: Iterable[str] = (), **extra) -> dict:
    """One task row; raises :class:`BadRow` naming ``row_id`` if the question or answer is unusable."""
    if not isinstance(question, str) or not question.strip():
        raise BadRow(f"{row_id}: the question is missing or empty")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise BadRow(f"{row_id}: the answer is missing or empty")
    try:
        gold = normalize_answer(answer)
    except ValueError as err:
        raise BadRow(f"{row_id}: unparseable answer {answer!r}") from err
    if not gold:
        raise BadRow(f"{row_id}: unparseable answer {answer!r}")
    return {"id": row_id, "prompt": chat_prompt(question.strip(), prompt_cfg), "question": question.strip(),
            "answer": gold, "steps": list(steps), "answer_format": prompt_cfg.answer_format, **extra}


def collect(records: Iterable[tuple[str, Callable[[], dict]]], on_bad_row: str, source: str) -> tuple[list[dict], int]:
    """Build rows from ``(where, build)`` pairs (``where`` names the file and row) under the bad-row policy: ``error`` raises the first
    :class:`BadRow`; ``skip`` drops it, counts it and logs the count (never a silent default)."""
    rows, skipped, first = [], 0, None
    for where, build in records:
        try:
            rows.append(build())
        except BadRow as err:
            message = str(err) if where in str(err) else f"{where}: {err}"
            if on_bad_row == "error":
                raise BadRow(f"{message} (set task.on_bad_row=skip to drop bad rows and count them)") from None
            skipped += 1
            first = first or message
    if skipped:
        log.warning("%s: skipped %d bad row(s) (task.on_bad_row=skip); first: %s", source, skipped, first)
    return rows, skipped


def in_test_split(text: str, test_fraction: float) -> bool:
    """A fixed split: a problem is held out iff a hash of its text falls below ``test_fraction``."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return digest / 2**64 < test_fraction


def hash_split(rows: list[dict], test_fraction: float) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for row in rows:
        (test if in_test_split(row["question"], test_fraction) else train).append(row)
    return train, test

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
# Names a grader reads as math when written without a backslash (sqrt(2), pi/2, log 8); any other run of
# two or more letters outside a LaTeX command or \text{...} is a word, and math-verify would read a word
# as a product of symbols (so the right answer scores 0 and nonsense can score 1).
MATH_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "inf", "infty", "oo",
              "mod", "gcd", "lcm", "max", "min", "arcsin", "arccos", "arctan", "deg", "frac", "i", "e"}
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


def word_in_answer(answer: str) -> str | None:
    """The first word in a gold answer (a run of letters that is neither a LaTeX command, nor inside
    ``\\text{...}``, nor a math name such as ``sqrt``), or None. ``"seven"`` and ``"12 apples"`` have one;
    ``"\\frac{1}{2}"``, ``"x^2+1"``, ``"\\text{(C)}"`` and ``"2\\sqrt{3}"`` do not."""
    bare = _LATEX_COMMAND.sub(" ", _LATEX_TEXT.sub(" ", answer))
    for word in _WORD.findall(bare):
        if word.lower() not in MATH_NAMES:
            return word
    return None


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


def record_field(record: Any, key: str, where: str) -> Any:
    """``record[key]`` of a dict record; a :class:`BadRow` naming ``where`` otherwise (an unreadable line,
    a record that is not a JSON object, a missing key)."""
    if isinstance(record, BadRow):  # an unreadable line (files.read_jsonl_records)
        raise record
    if not isinstance(record, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise BadRow(f"{where}: missing key {key!r} (has {sorted(record)[:8]})")
    return record[key]


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
    word = word_in_answer(gold)
    if word is not None:
        raise BadRow(f"{row_id}: the gold answer {gold[:80]!r} is not a number or a math expression (it has the "
                     f"word {word!r}; a grader would read it as a product of symbols)")
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


def check_prompt_lengths(data: TaskData, tokenizer, limit: int, cfg) -> TaskData:
    """Apply the bad-row policy to prompts longer than ``limit`` tokens (chat template included): the
    model's context less the completion's room, or ``task.max_prompt_tokens``. One batched tokenizer
    call per split. ``error`` raises naming the first long row; ``skip`` drops and counts them."""
    for split in ("train", "test"):
        rows = getattr(data, split)
        if not rows:
            continue
        texts = tokenizer.apply_chat_template([r["prompt"] for r in rows], add_generation_prompt=True, tokenize=False)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

        def build(row, n):
            def check():
                if n > limit:
                    raise BadRow(f"{row['id']}: the prompt is {n} tokens, more than the {limit} allowed (the model's "
                                 "context less generation.max_new_tokens, or task.max_prompt_tokens)")
                return row
            return check

        kept, skipped = collect(((row["id"], build(row, n)) for row, n in zip(rows, lengths)), cfg.on_bad_row,
                                f"task={cfg.name} ({split})")
        setattr(data, split, kept)
        data.skipped += skipped
    return data


def require_rows(rows: list, skipped: int, source: str) -> None:
    """Refuse a data file that gave no rows, naming it (and how many bad rows were skipped)."""
    if rows:
        return
    if skipped:
        raise ValueError(f"{source}: every row was bad ({skipped} skipped under on_bad_row=skip); nothing to use")
    raise ValueError(f"{source}: the data file is empty (no rows)")


def in_test_split(text: str, test_fraction: float) -> bool:
    """A fixed split: a problem is held out iff a hash of its text falls below ``test_fraction``."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return digest / 2**64 < test_fraction


def hash_split(rows: list[dict], test_fraction: float) -> tuple[list[dict], list[dict]]:
    train, test = [], []
    for row in rows:
        (test if in_test_split(row["question"], test_fraction) else train).append(row)
    return train, test

"""PRM training data in one stepwise format (TRL's stepwise supervision)::

    {"prompt": "What is 3 + 4 * 5?", "completions": ["4 * 5 = 20", "3 + 20 = 23"], "labels": [true, true]}

``labels`` are booleans or floats in [0, 1] (soft Monte-Carlo labels stay floats). Three sources:

* :func:`load_stepwise` — a local JSONL file or a Hugging Face dataset (id or ``save_to_disk`` folder) in
  this format (e.g. Math-Shepherd or PRM800K converted); malformed rows raise :class:`frugal.tasks.BadRow`
  naming the file and row, or are skipped and counted (``on_bad_row=skip``).
* :func:`generated_examples` — exact labels for the generated tasks (``arith``, ``multiply``): each
  reference solution, plus copies with one injected error (a wrong result or a wrongly copied operand)
  whose consequences are carried forward; the first wrong step and every step after it are labelled 0
  (the labelling convention of PRM800K / ProcessBench: a step after an error is not a correct step).
* Monte-Carlo labels (``recipes/label_prm.py``, Math-Shepherd, Wang et al. 2024) written as stepwise JSONL.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Iterable

from frugal.tasks.rows import ANSWER_STEPS, BadRow

log = logging.getLogger(__name__)

ANSWER_STEP = ANSWER_STEPS["boxed"]  # the final step appended to generated solutions


# ---------------------------------------------------------------------- validation / loading

def validate_example(record: Any, where: str) -> dict:
    """A clean stepwise example from a raw record, or :class:`BadRow` naming ``where`` and the problem."""
    if isinstance(record, BadRow):  # a line that is not UTF-8 or not JSON (tasks.files.read_jsonl_records)
        raise record
    if not isinstance(record, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("prompt", "completions", "labels"):
        if key not in record:
            raise BadRow(f"{where}: missing key {key!r} (has {sorted(record)[:8]})")
    prompt, steps, labels = record["prompt"], record["completions"], record["labels"]
    if isinstance(prompt, list):  # chat messages: keep the user text (train.prm_steps.prompt_text)
        from frugal.train.prm_steps import prompt_text

        prompt = prompt_text(prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRow(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(steps, list) or not steps:
        raise BadRow(f"{where}: 'completions' must be a non-empty list of step strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        n = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise BadRow(f"{where}: {len(steps)} steps but {n} labels (one label per step)")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise BadRow(f"{where}: step {i} is empty or not a string")
    clean = []
    for i, label in enumerate(labels):
        if isinstance(label, bool):
            clean.append(1.0 if label else 0.0)
        elif isinstance(label, (int, float)) and 0.0 <= float(label) <= 1.0:
            clean.append(float(label))
        else:
            raise BadRow(f"{where}: label {i} is {label!r}; labels must be booleans or numbers in [0, 1]")
    return {"prompt": prompt.strip(), "completions": [s.strip() for s in steps], "labels": clean}


def validate_examples(records: Iterable[tuple[str, Any]], on_bad_row: str = "error", source: str = "") -> tuple[list[dict], int]:
    """Validate ``(where, record)`` pairs; ``on_bad_row=error`` raises on the first bad one, ``skip`` drops
    and counts them (the count is logged and returned, never silent)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be error|skip, got {on_bad_row!r}")
    out, skipped, first = [], 0, None
    for where, record in records:
        try:
            out.append(validate_example(record, where))
        except BadRow as err:
            if on_bad_row == "error":
                raise BadRow(f"{err} (set on_bad_row=skip to drop bad rows and count them)") from None
            skipped += 1
            first = first or str(err)
    if skipped:
        log.warning("%s: skipped %d malformed stepwise row(s); first: %s", source, skipped, first)
    return out, skipped


def load_stepwise(path: str, on_bad_row: str = "error", split: str = "train") -> tuple[list[dict], int]:
    """Stepwise examples from a ``.jsonl`` file, a ``datasets.save_to_disk`` folder or a Hub dataset id.
    Returns ``(examples, skipped)``."""
    local = Path(path)
    if local.suffix == ".jsonl" or local.is_file():
        if not local.exists():
            raise FileNotFoundError(f"stepwise data: no such file: {local}")
        examples, skipped = validate_examples(_jsonl_records(local), on_bad_row, str(local))
        if not examples:
            log.warning("stepwise data %s: zero usable rows (%s)", local,
                        f"{skipped} bad rows skipped" if skipped else "the file is empty")
        return examples, skipped
    import datasets

    if local.is_dir():
        loaded = datasets.load_from_disk(str(local))
    elif local.exists() or path.startswith((".", "/")):
        raise FileNotFoundError(f"stepwise data: {path} is neither a .jsonl file nor a saved dataset folder")
    else:
        loaded = datasets.load_dataset(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"stepwise data: split {split!r} not in {path} (splits: {list(loaded)})")
        loaded = loaded[split]
    records = ((f"{path}[{split}] row {i}", rec) for i, rec in enumerate(loaded))
    return validate_examples(records, on_bad_row, path)


def _jsonl_records(path: Path):
    from frugal.tasks.files import read_jsonl_records

    for number, record in read_jsonl_records(path):  # unreadable lines come as BadRow: the policy decides
        yield f"{path} line {number}", record


# ---------------------------------------------------------------------- exact labels for generated tasks

_EQUATION = re.compile(r"^(?P<lhs>[\d\s+*-]+?)\s*=\s*(?P<rhs>-?\d+)$")
_INT = re.compile(r"(?<![\d])-?\d+")


def _evaluate(lhs: str) -> int:
    """Value of an integer expression of + - * (the only characters :data:`_EQUATION` lets through)."""
    if not re.fullmatch(r"[\d\s+*-]+", lhs):
        raise ValueError(f"not a +-* integer expression: {lhs!r}")
    return int(eval(lhs, {"__builtins__": {}}, {}))  # noqa: S307 (digits, spaces and + - * only)


def _wrong_value(value: int, rng: random.Random) -> int:
    """A plausible slip: off by a little, or one digit changed."""
    while True:
        if rng.random() < 0.5:
            new = value + rng.choice([-10, -2, -1, 1, 2, 10])
        else:
            digits = list(str(abs(value)))
            i = rng.randrange(len(digits))
            digits[i] = str(rng.choice([d for d in range(10) if str(d) != digits[i] and (d or i or len(digits) == 1)]))
            new = int("".join(digits)) * (-1 if value < 0 else 1)
        if new != value:
            return new


def _replace_first(text: str, old: int, new: int) -> str:
    """Replace the first whole-number occurrence of ``old`` in ``text``."""
    for m in _INT.finditer(text):
        if int(m.group()) == old:
            return text[:m.start()] + str(new) + text[m.end():]
    return text


def corrupt_solution(steps: list[str], index: int, rng: random.Random, kind: str = "result") -> list[str]:
    """A copy of ``steps`` (equations ``lhs = rhs`` plus a final answer step) with an error at ``index``:

    * ``result`` — step ``index`` gets a wrong right-hand side;
    * ``operand`` — one number on its left-hand side is miscopied, the result computed from it.

    Later steps carry the wrong value forward and stay locally consistent, as a model's solution would;
    an error on the final answer step writes a wrong number in the box.
    """
    out, changed = list(steps), {}
    for i, step in enumerate(steps):
        m = _EQUATION.match(step)
        if i < index:
            continue
        if m is None:  # the answer step (or any non-equation step): rewrite the carried numbers
            if i == index:
                numbers = [int(x) for x in _INT.findall(step)]
                if not numbers:
                    raise ValueError(f"cannot inject an error into step {step!r}: it has no number")
                out[i] = _replace_first(step, numbers[-1], _wrong_value(numbers[-1], rng))
            else:
                for old, new in changed.items():
                    out[i] = _replace_first(out[i], old, new)
            continue
        lhs, rhs = m.group("lhs").strip(), int(m.group("rhs"))
        if i == index and kind == "operand":
            numbers = [int(x) for x in _INT.findall(lhs)]
            target = rng.choice(numbers)
            lhs = _replace_first(lhs, target, _wrong_value(target, rng))
            new_rhs = _evaluate(lhs)
        elif i == index:
            new_rhs = _wrong_value(rhs, rng)
        else:
            for old, new in changed.items():
                lhs = _replace_first(lhs, old, new)
            new_rhs = _evaluate(lhs)
        if new_rhs != rhs:
            changed[rhs] = new_rhs
        out[i] = f"{lhs} = {new_rhs}"
    return out


def generated_examples(rows: list[dict], errors_per_row: int = 1, seed: int = 0,
                       operand_error_frac: float = 0.3) -> list[dict]:
    """Stepwise examples with exact labels from generated-task rows (``rows[i]["steps"]``): the reference
    solution (+ answer step) labelled all 1, and ``errors_per_row`` copies with one injected error each,
    labelled 1 before the error and 0 from it on. ``error_kind`` says which slip was injected (None,
    ``result``, ``operand``, ``answer``)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        if not row.get("steps"):
            raise BadRow(f"{row.get('id')}: no reference steps; exact PRM labels need a generated task (arith, multiply)")
        steps = list(row["steps"]) + [ANSWER_STEP.format(value=row["answer"])]
        out.append({"prompt": row["question"], "completions": steps, "labels": [1.0] * len(steps), "error_kind": None})
        for _ in range(errors_per_row):
            index = rng.randrange(len(steps))
            kind = "operand" if index < len(steps) - 1 and rng.random() < operand_error_frac else "result"
            bad = corrupt_solution(steps, index, rng, kind)
            labels = [1.0] * index + [0.0] * (len(steps) - index)
            # error_kind (for per-kind metrics): a wrong result is an arithmetic slip, a wrong operand a
            # copy slip; a wrong number in the answer step contradicts the last equation.
            out.append({"prompt": row["question"], "completions": bad, "labels": labels,
                        "error_kind": "answer" if index == len(steps) - 1 else kind})
    return out


def equation_drills(rows: list[dict], seed: int = 0, wrong_per_fact: int = 2) -> list[dict]:
    """Single-equation checks from generated rows' reference steps: for every distinct equation
    ``lhs = rhs`` of the rows, the prompt ``What is lhs?`` with ``wrong_per_fact`` different wrong
    right-hand sides (:func:`_wrong_value`, the same slip as a ``result`` error; label 0) and as many
    copies of the true step (label 1), so that the labels stay balanced.

    Why: a wrong *result* is only visible to a PRM that can do the arithmetic, and a full solution
    teaches at most one such fact per corrupted copy. A drill is about a third of a solution's tokens and
    is nothing but that fact, so a fixed training time shows the PRM several times more of them."""
    rng = random.Random(seed)
    seen, out = set(), []
    for row in rows:
        for step in row.get("steps") or []:
            m = _EQUATION.match(step)
            if m is None:
                continue
            lhs, rhs = m.group("lhs").strip(), int(m.group("rhs"))
            if lhs in seen:
                continue
            seen.add(lhs)
            prompt, wrong = f"What is {lhs}?", set()
            while len(wrong) < wrong_per_fact:
                wrong.add(_wrong_value(rhs, rng))
            for value in sorted(wrong):
                out.append({"prompt": prompt, "completions": [f"{lhs} = {rhs}"], "labels": [1.0], "error_kind": None})
                out.append({"prompt": prompt, "completions": [f"{lhs} = {value}"], "labels": [0.0],
                            "error_kind": "result"})
    return out


def write_jsonl(path: Path, examples: list[dict]) -> None:
    from frugal.runtime.io import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(e) + "\n" for e in examples))

"""Reading an answer out of a completion and checking it against the gold answer.

Extraction depends on the task's ``answer_format``:

* ``boxed``       the content of the last ``\\boxed{...}`` (nested braces allowed; ``\\fbox`` too);
* ``answer_line`` what follows the last ``Answer:`` on its line;
* ``number``      the last number in the text (``1,234``, ``-3``, ``2.5``, ``3/4``).

Checking uses math-verify (so ``\\frac{1}{2}`` equals ``0.5``), with a plain numeric comparison (relative
tolerance 1e-6) as the fallback when math-verify cannot parse one side. A gold answer that neither can
parse is an error when the data is loaded (:func:`validate_gold_answers`), never a silent reward of 1.
"""

from __future__ import annotations

import math
import re
import threading
from fractions import Fraction
from typing import Iterable, Optional

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:=]\s*([^\n]+)", re.IGNORECASE)


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{…}`` / ``\\fbox{…}`` with balanced braces, or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                content = text[start:i].strip()
                return content or None
    return None


def extract_last_number(text: str) -> Optional[str]:
    found = _NUMBER.findall(text)
    return found[-1].replace(" ", "") if found else None


def extract_answer(text: str, answer_format: str = "boxed") -> Optional[str]:
    if answer_format == "boxed":
        return extract_boxed(text)
    if answer_format == "answer_line":
        found = _ANSWER_LINE.findall(text)
        if not found:
            return None
        answer = found[-1].strip().rstrip(".").strip()
        return extract_boxed(answer) or answer or None
    if answer_format == "number":
        return extract_last_number(text)
    raise ValueError(f"unknown answer_format {answer_format!r} (boxed|answer_line|number)")


def to_number(text: str) -> Optional[float]:
    """``"1,234"`` → 1234.0, ``"-3/4"`` → -0.75, ``"$5."`` → 5.0; None when it is not a plain number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    cleaned = re.sub(r"^\\?\(?|\\?\)?$", "", cleaned) if cleaned.startswith(("\\(", "(")) else cleaned
    frac = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", cleaned)
    if frac:
        cleaned = f"{frac.group(1)}/{frac.group(2)}"
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return float(Fraction(num) / Fraction(den))
        value = float(cleaned)
        return value if math.isfinite(value) else None
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify_parse(text: str):
    from math_verify import parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None  # alarm() is main-thread only
    return parse(f"\\boxed{{{text}}}", parsing_timeout=timeout)


def answers_match(predicted: str, gold: str) -> bool:
    """True when ``predicted`` equals ``gold`` mathematically (math-verify, numeric fallback)."""
    p_num, g_num = to_number(predicted), to_number(gold)
    if p_num is not None and g_num is not None:
        # Both plain numbers: compare directly (faster than sympy and exact for integers).
        return math.isclose(p_num, g_num, rel_tol=1e-6, abs_tol=1e-9)
    from math_verify import verify

    gold_parsed, pred_parsed = _math_verify_parse(gold), _math_verify_parse(predicted)
    if gold_parsed and pred_parsed:
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    return False


def is_correct(completion: str, gold: str, answer_format: str = "boxed") -> bool:
    predicted = extract_answer(completion, answer_format)
    return predicted is not None and answers_match(predicted, gold)


def gold_is_parseable(gold: str) -> bool:
    """A number, or a math expression that is not a word (math-verify would read ``seven`` as the product
    s·e·v·e·n, so the right answer would score 0: see :func:`frugal.tasks.rows.word_in_answer`)."""
    from frugal.tasks.rows import word_in_answer

    if to_number(gold) is not None:
        return True
    return word_in_answer(gold) is None and bool(_math_verify_parse(gold))


def validate_gold_answers(rows: Iterable[dict], source: str) -> None:
    """Raise naming the source and row when a gold answer cannot be parsed (it could never be matched)."""
    for row in rows:
        if not gold_is_parseable(str(row["answer"])):
            raise ValueError(f"{source}: row {row.get('id')!r} has a gold answer that cannot be parsed: "
                             f"{row['answer']!r}")

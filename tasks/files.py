"""File-backed tasks: SVAMP, GSM8K, any JSONL with a field mapping, and Hugging Face datasets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from frugal.tasks.benchmarks import gsm8k_hub, gsm8k_record, load_splits
from frugal.tasks.config import TaskConfig
from frugal.tasks.rows import BadRow, TaskData, collect, hash_split, make_row, record_field, require_rows

SVAMP_TRAIN_ROWS = 700  # fixed split: rows 0-699 train, 700-999 test (the common SVAMP split)


def data_dir() -> Path:
    """``$FRUGAL_DATA_DIR``, else ``shared/data`` beside the repository (where the project keeps it)."""
    env = os.environ.get("FRUGAL_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _default_path(cfg: TaskConfig, filename: str) -> Path:
    path = Path(cfg.path) if cfg.path else data_dir() / filename
    if not path.exists():
        raise FileNotFoundError(f"task={cfg.name}: data file not found: {path} "
                                f"(set task.path=... or FRUGAL_DATA_DIR)")
    return path


def read_jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for every non-blank line; a line that is not UTF-8 or not JSON yields a
    :class:`BadRow` naming the file and line in place of its record, so that the caller's bad-row policy
    (raise, or skip and count) decides, and the lines after it are still read."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, BadRow(f"{path} line {number}: not UTF-8 text (byte {raw[err.start]:#04x} at "
                                     f"column {err.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                yield number, BadRow(f"{path} line {number}: not valid JSON ({err.msg})")


def _regex_answer(text: Any, pattern: Optional[str], where: str) -> Any:
    if pattern is None:
        return text
    match = re.search(pattern, str(text))
    if not match:
        raise BadRow(f"{where}: task.answer_regex {pattern!r} does not match the answer {str(text)[:80]!r}")
    return match.group(1)


def _read_json(path: Path) -> Any:
    """One JSON document; undecodable bytes or bad JSON raise naming the file and line (one document
    cannot be read around a bad part, so this is an error under either bad-row policy)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise BadRow(f"{path} line {line}: not UTF-8 text (byte {data[err.start]:#04x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRow(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None


def svamp(cfg: TaskConfig) -> TaskData:
    path = _default_path(cfg, "SVAMP.json")
    records = _read_json(path)

    def items(indices):
        for i in indices:
            where = f"{path} row {i}"

            def build(rec=records[i], where=where, i=i):
                question = f"{record_field(rec, 'Body', where).strip()} {record_field(rec, 'Question', where).strip()}"
                return make_row(f"svamp:{rec.get('ID', i)}", question, record_field(rec, "Answer", where), cfg.prompt,
                                equation=rec.get("Equation"))
            yield where, build

    split = min(SVAMP_TRAIN_ROWS, len(records))
    train, s1 = collect(items(range(split)), cfg.on_bad_row, str(path))
    test, s2 = collect(items(range(split, len(records))), cfg.on_bad_row, str(path))
    return TaskData(train, test, skipped=s1 + s2)


def _gsm8k_rows(path: Path, cfg: TaskConfig) -> tuple[list[dict], int]:
    def records():
        for number, rec in read_jsonl_records(path):
            where = f"{path} line {number}"
            yield where, lambda rec=rec, where=where, number=number: gsm8k_record(
                rec, where, f"gsm8k:{path.name}:{number}", cfg)
    return collect(records(), cfg.on_bad_row, str(path))


def gsm8k(cfg: TaskConfig) -> TaskData:
    """``task.source``: local = a JSONL file (task.path, else $FRUGAL_DATA_DIR or shared/data
    gsm8k_train.jsonl, hash-split unless task.test_path); hub = ``openai/gsm8k`` config ``main`` with
    its own train / test splits (:func:`frugal.tasks.benchmarks.gsm8k_hub`; task.path may name a local
    copy in the Hub's layout); auto = the local file when there is one, else the Hub."""
    local = Path(cfg.path) if cfg.path else data_dir() / "gsm8k_train.jsonl"
    if cfg.source == "hub" or (cfg.source == "auto" and not cfg.path and not local.exists()):
        return gsm8k_hub(cfg)
    path = _default_path(cfg, "gsm8k_train.jsonl")
    rows, skipped = _gsm8k_rows(path, cfg)
    require_rows(rows, skipped, str(path))
    if cfg.test_path:
        test, s2 = _gsm8k_rows(Path(cfg.test_path), cfg)
        return TaskData(rows, test, skipped=skipped + s2)
    train, test = hash_split(rows, cfg.test_fraction)
    return TaskData(train, test, skipped=skipped)


def _mapped_rows(records, cfg: TaskConfig, source: str) -> tuple[list[dict], int]:
    """Rows from dict records through question_field / answer_field / answer_regex."""
    def items():
        for where, rec in records:
            def build(rec=rec, where=where):
                answer = _regex_answer(record_field(rec, cfg.answer_field, where), cfg.answer_regex, where)
                return make_row(f"{cfg.name}:{where}", record_field(rec, cfg.question_field, where), answer, cfg.prompt)
            yield where, build
    return collect(items(), cfg.on_bad_row, source)


def jsonl(cfg: TaskConfig) -> TaskData:
    if not cfg.path:
        raise ValueError("task=jsonl needs task.path=<file.jsonl>")
    path = _default_path(cfg, "")
    rows, skipped = _mapped_rows(((f"{path} line {n}", r) for n, r in read_jsonl_records(path)), cfg, str(path))
    require_rows(rows, skipped, f"task.path={path}")
    if cfg.test_path:
        test_path = Path(cfg.test_path)
        if not test_path.exists():
            raise FileNotFoundError(f"task.test_path: no such file: {test_path}")
        test, s2 = _mapped_rows(((f"{test_path} line {n}", r) for n, r in read_jsonl_records(test_path)), cfg, str(test_path))
        return TaskData(rows, test, skipped=skipped + s2)
    train, test = hash_split(rows, cfg.test_fraction)
    return TaskData(train, test, skipped=skipped)


def hf(cfg: TaskConfig) -> TaskData:
    """A Hugging Face dataset id (Hub, honours HF_HUB_OFFLINE; ``task.config_name`` picks its config), a
    folder saved with ``save_to_disk``, or a local copy in the Hub's layout. A dataset with a test split
    and no train split is evaluation-only: its rows are the test rows and there are no train rows."""
    if not cfg.path:
        raise ValueError("task=hf needs task.path=<dataset id or saved folder>")
    loaded = load_splits(cfg.path, cfg.config_name, single_split=cfg.train_split)

    def records(split):
        return ((f"{cfg.path}[{split}] row {i}", rec) for i, rec in enumerate(loaded[split]))

    if cfg.train_split not in loaded:
        if cfg.test_split not in loaded:
            raise ValueError(f"task.train_split={cfg.train_split!r} and task.test_split={cfg.test_split!r} are "
                             f"not in {cfg.path} (splits: {list(loaded)})")
        # an evaluation-only dataset: its test split, no train rows (training recipes refuse it)
        test, skipped = _mapped_rows(records(cfg.test_split), cfg, cfg.path)
        return TaskData([], test, skipped=skipped, info={"eval_only": True})
    rows, skipped = _mapped_rows(records(cfg.train_split), cfg, cfg.path)
    if cfg.test_split in loaded:
        test, s2 = _mapped_rows(records(cfg.test_split), cfg, cfg.path)
        return TaskData(rows, test, skipped=skipped + s2)
    train, test = hash_split(rows, cfg.test_fraction)
    return TaskData(train, test, skipped=skipped)

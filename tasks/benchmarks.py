"""Standard math benchmarks from the Hugging Face Hub: MATH-500, AIME 2024, AIME 2025, GSM8K.

Each one is read with ``datasets.load_dataset`` from its Hub id, or from ``task.path`` when set: a local
folder or file in the dataset's own on-disk format (the Hub repository's files, e.g. MATH-500's
``test.jsonl`` or aime_2024's ``data/train-00000-of-00001.parquet``), through the same code path.
``HF_HUB_OFFLINE=1`` reads the local Hub cache only.

================  ==========================  =========  ==========================  ==============
task              Hub dataset (config)        split      fields                      rows
================  ==========================  =========  ==========================  ==============
``math500``       ``HuggingFaceH4/MATH-500``  test       problem, answer (LaTeX)     500
``aime24``        ``HuggingFaceH4/aime_2024`` train      problem, answer             30
``aime25``        ``math-ai/aime25``          test       problem, answer             30
``gsm8k``         ``openai/gsm8k`` (main)     train/test question, answer (#### n)   7,473 / 1,319
================  ==========================  =========  ==========================  ==============

MATH-500 and AIME are evaluation sets: their rows are the task's **test** split (AIME 2024's only Hub
split is called ``train``) and the train split is empty, so ``frugal eval`` runs on them and a training
recipe refuses them (:func:`frugal.tasks.require_train`). Gold answers are LaTeX (``\\frac{1}{2}``,
``\\sqrt{2}``, ``[-2, 7]``, ``90^\\circ``, ``\\text{Evelyn}``) and are graded by math-verify
(:func:`frugal.rewards.verify.answers_match`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from frugal.tasks.config import TaskConfig
from frugal.tasks.rows import BadRow, TaskData, collect, make_row, record_field


@dataclass(frozen=True)
class Benchmark:
    repo: str
    split: str  # the Hub split that holds the problems (the task's test split)
    question: str = "problem"
    answer: str = "answer"
    config_name: Optional[str] = None


BENCHMARKS = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test"),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train"),
    "aime25": Benchmark("math-ai/aime25", "test"),
}
GSM8K_HUB = Benchmark("openai/gsm8k", "test", "question", "answer", config_name="main")


def load_splits(path: str, config_name: Optional[str] = None, single_split: str = "train"):
    """``datasets.load_dataset(path, config_name)`` as a ``DatasetDict`` (a folder written by
    ``save_to_disk`` is read with ``load_from_disk``; a lone saved ``Dataset`` is split ``single_split``);
    a data file's split is named after the file (``test.jsonl`` -> test), as the Hub names a
    repository's files. Errors name the path."""
    import datasets

    local = Path(path)
    if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
        loaded = datasets.load_from_disk(str(local))
    elif local.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
        if kind is None:
            raise ValueError(f"{path}: a data file must be .jsonl, .json, .parquet or .csv")
        split = local.name.split(".")[0].split("-")[0]
        loaded = datasets.load_dataset(kind, data_files={split: str(local)})
    else:
        try:
            loaded = datasets.load_dataset(path, config_name)
        except Exception as err:  # noqa: BLE001 -- offline, no such dataset or config: name what was asked
            raise FileNotFoundError(f"dataset {path!r}" + (f" (config {config_name!r})" if config_name else "")
                                    + f" could not be loaded: {type(err).__name__}: {err}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({single_split: loaded})
    return loaded


def _rows(split_rows, name: str, source: str, spec: Benchmark, cfg: TaskConfig) -> tuple[list[dict], int]:
    def items():
        for i, rec in enumerate(split_rows):
            where = f"{source} row {i}"

            def build(rec=rec, where=where, i=i):
                rid = rec.get("unique_id") or rec.get("id") or i
                return make_row(f"{name}:{rid}", record_field(rec, spec.question, where),
                                record_field(rec, spec.answer, where), cfg.prompt)
            yield where, build
    return collect(items(), cfg.on_bad_row, source)


def benchmark(cfg: TaskConfig) -> TaskData:
    """MATH-500 / AIME: every row of the benchmark's split is a test row; no train rows."""
    spec = BENCHMARKS[cfg.name]
    path = cfg.path or spec.repo
    loaded = load_splits(path, cfg.config_name or spec.config_name)
    split = spec.split if spec.split in loaded else (cfg.test_split if cfg.test_split in loaded else None)
    if split is None:
        if len(loaded) != 1:
            raise ValueError(f"task={cfg.name}: {path} has no {spec.split!r} split (splits: {list(loaded)})")
        split = next(iter(loaded))
    test, skipped = _rows(loaded[split], cfg.name, f"{path}[{split}]", spec, cfg)
    return TaskData([], test, skipped=skipped, info={"source": path, "split": split, "eval_only": True})


GSM8K_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_record(rec: Any, where: str, row_id: str, cfg: TaskConfig) -> dict:
    """One GSM8K record (``question``, ``answer`` = worked solution, ``#### n``) as a task row (the local
    file's rows, :func:`frugal.tasks.files.gsm8k`, and the Hub's ``openai/gsm8k`` rows alike)."""
    solution = str(record_field(rec, "answer", where))
    if "####" not in solution:
        raise BadRow(f"{where}: no '####' before the final answer")
    work, answer = solution.rsplit("####", 1)
    steps = [GSM8K_CALCULATOR.sub("", s).strip() for s in work.strip().split("\n") if s.strip()]
    return make_row(row_id, record_field(rec, "question", where), answer.strip(), cfg.prompt, steps)


def gsm8k_hub(cfg: TaskConfig) -> TaskData:
    """GSM8K from the Hub (``openai/gsm8k``, config ``main``): its own train (7,473) and test (1,319)
    splits, each answer's worked solution and ``#### n`` read as the local file's rows are."""
    path = cfg.path or GSM8K_HUB.repo
    loaded = load_splits(path, cfg.config_name or GSM8K_HUB.config_name)
    out, skipped = {}, 0
    for split in ("train", "test"):
        if split not in loaded:
            raise ValueError(f"task=gsm8k task.source=hub: {path} has no {split!r} split (splits: {list(loaded)})")
        source = f"{path}[{split}]"
        records = ((f"{source} row {i}", rec) for i, rec in enumerate(loaded[split]))
        out[split], s = collect(((where, lambda rec=rec, where=where: gsm8k_record(rec, where, f"gsm8k:{split}:"
                                                                                    + where.rsplit(" ", 1)[-1], cfg))
                                 for where, rec in records), cfg.on_bad_row, source)
        skipped += s
    return TaskData(out["train"], out["test"], skipped=skipped, info={"source": path})

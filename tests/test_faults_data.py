"""Fault drills for bad data and the demo under load (issue 21, items 10-16): every bad input gets an error
naming file and row, or a counted skip. Each test fails on the code before the fix."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_train

from frugal.conf import CONF_DIR
from frugal.tasks import BadRow, TaskConfig, load_task

PRM_TINY = ["model=tiny_random", "prm.num_layers=0", "lora.r=4", "max_minutes=null", "data.generated=false",
            "batch_size=2", "max_steps=1", "eval_every=0", "save_every=0", "data.drills_per_step=0"]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


def _task(path: Path, **kw) -> TaskConfig:
    return TaskConfig(name="jsonl", path=str(path), test_fraction=0.0, **kw)


def _compose_prm(overrides):
    from hydra import compose, initialize_config_dir

    import frugal.recipes.train_prm  # noqa: F401

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train_prm", overrides=overrides)


def _stepwise(i: int, steps: int = 2, prompt: str = "") -> dict:
    return {"prompt": prompt or f"What is {i} + {i}?", "completions": [f"{i} + {i} = {2 * i}"] * steps,
            "labels": [True] * steps}


# ---------------------------------------------------------------------- 10. a word as gold answer

def test_a_word_gold_answer_is_a_bad_row(tmp_path):
    # Before: accepted; math-verify reads "seven" as a product of symbols.
    from frugal.rewards.verify import gold_is_parseable

    path = _jsonl(tmp_path / "d.jsonl", [{"question": "3 + 4?", "answer": "7"},
                                         {"question": "Three plus four?", "answer": "seven"},
                                         {"question": "Half of one?", "answer": "\\frac{1}{2}"},
                                         {"question": "Who?", "answer": "\\text{Evelyn}"}])
    with pytest.raises(BadRow, match=rf"{path} line 2.*'seven'"):
        load_task(_task(path))
    data = load_task(_task(path, on_bad_row="skip"))
    assert [r["answer"] for r in data.train] == ["7", "\\frac{1}{2}", "\\text{Evelyn}"] and data.skipped == 1
    assert not gold_is_parseable("seven") and not gold_is_parseable("12 apples")
    assert gold_is_parseable("x^2+1") and gold_is_parseable("2\\sqrt{3}") and gold_is_parseable("\\text{(C)}")


# ---------------------------------------------------------------------- 11. bytes that are not UTF-8

def test_non_utf8_bytes_name_file_and_line_and_obey_skip(tmp_path):
    # Before: a bare UnicodeDecodeError naming neither file nor line; on_bad_row=skip did not skip.
    from frugal.train.prm_data import load_stepwise

    rows = [{"question": "1 + 1?", "answer": "2"}, b'{"question": "caf\xe9?", "answer": "3"}\n',
            {"question": "2 + 2?", "answer": "4"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(BadRow, match=rf"{path} line 2: not UTF-8"):
        load_task(_task(path))
    data = load_task(_task(path, on_bad_row="skip"))
    assert [r["answer"] for r in data.train] == ["2", "4"] and data.skipped == 1

    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "q?", "answer": "1 + 1 = 2\n#### 2"}, b"\xff\xfe\n",
                                          {"question": "r?", "answer": "2 + 2 = 4\n#### 4"}])
    with pytest.raises(BadRow, match=rf"{gsm} line 2: not UTF-8"):
        load_task(TaskConfig(name="gsm8k", path=str(gsm), source="local"))
    assert load_task(TaskConfig(name="gsm8k", path=str(gsm), source="local", on_bad_row="skip",
                                test_fraction=0.0)).skipped == 1

    prm = _jsonl(tmp_path / "prm.jsonl", [_stepwise(1), b'{"prompt": "\x80"}\n', _stepwise(2)])
    with pytest.raises(BadRow, match=rf"{prm} line 2: not UTF-8"):
        load_stepwise(str(prm))
    examples, skipped = load_stepwise(str(prm), on_bad_row="skip")
    assert len(examples) == 2 and skipped == 1


# ---------------------------------------------------------------------- 12. invalid JSON obeys skip

def test_invalid_json_line_is_skipped_under_skip(tmp_path):
    # Before: named, but on_bad_row=skip still aborted at the bad line.
    from frugal.train.prm_data import load_stepwise

    path = _jsonl(tmp_path / "d.jsonl", [{"question": "1 + 1?", "answer": "2"}, b'{"question": "x", \n',
                                         {"question": "2 + 2?", "answer": "4"}])
    with pytest.raises(BadRow, match=rf"{path} line 2: not valid JSON"):
        load_task(_task(path))
    data = load_task(_task(path, on_bad_row="skip"))
    assert [r["answer"] for r in data.train] == ["2", "4"] and data.skipped == 1
    prm = _jsonl(tmp_path / "prm.jsonl", [_stepwise(1), b"{nope\n", _stepwise(2)])
    assert [len(x) if isinstance(x, list) else x for x in load_stepwise(str(prm), on_bad_row="skip")] == [2, 1]


# ---------------------------------------------------------------------- 13. prompt longer than the context

def test_prompt_longer_than_the_context_is_a_bad_row(tmp_path):
    # Before: not caught; a real model died allocating a giant attention mask.
    from frugal.recipes.train import run

    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    rows.insert(3, {"question": "Add these: " + " + ".join(["1"] * 1500), "answer": "1500"})  # ~3000 tokens
    path = _jsonl(tmp_path / "long.jsonl", rows)
    base = [o for o in TINY if not o.startswith("task.")] + ["task=jsonl", f"task.path={path}",
                                                             "task.test_fraction=0.25", "max_steps=1",
                                                             "eval_before=false"]
    with pytest.raises(BadRow, match=r"line 4: the prompt is \d+ tokens, more than the 2036 allowed"):
        run(compose_train(base), run_dir=tmp_path / "a")  # tiny-random: 2048 context - 12 new tokens
    summary = run(compose_train(base + ["task.on_bad_row=skip", "task.max_prompt_tokens=200"]), run_dir=tmp_path / "b")
    assert summary["steps"] == 1
    # under max_prompt_tokens=200 the long row is dropped and counted, the short ones kept
    from frugal.tasks import check_prompt_lengths
    from frugal.inference.models import load_tokenizer

    data = load_task(_task(path, on_bad_row="skip"))
    data = check_prompt_lengths(data, load_tokenizer("builtin:tiny-random"), 200, _task(path, on_bad_row="skip"))
    assert len(data.train) == 8 and data.skipped == 1


# ---------------------------------------------------------------------- 14. PRM data: dropped, truncated, no held-out

def test_prm_counts_dropped_and_truncated_rows_and_refuses_an_empty_held_out_set(tmp_path, caplog):
    # Before: a prompt over max_length dropped and a long solution cut, both with skipped=0 and no word;
    # an empty held-out set trained, saved, then died with KeyError: 'step_auroc'.
    from frugal.recipes.train_prm import run

    train = _jsonl(tmp_path / "train.jsonl", [_stepwise(1), _stepwise(2, steps=40),
                                              _stepwise(3, prompt="Add " + " + ".join(["1"] * 200) + "?"),
                                              _stepwise(4)])
    held = _jsonl(tmp_path / "held.jsonl", [_stepwise(5), _stepwise(6)])
    with caplog.at_level(logging.WARNING):
        summary = run(_compose_prm(PRM_TINY + [f"data.paths=[{train}]", f"data.eval_paths=[{held}]",
                                               "prm.max_length=120", f"output_dir={tmp_path / 'run'}"]))
    fit = summary["data"]["fit"]
    assert fit["dropped"] == 1 and fit["truncated"] == 1 and fit["total"] == 4 and fit["labels_cut"] > 2
    assert "1 of 4 training solutions dropped" in caplog.text and "1 truncated" in caplog.text

    with pytest.raises(ValueError, match="held-out set is empty"):
        run(_compose_prm(PRM_TINY + [f"data.paths=[{train}]", "data.eval_fraction=0.0",
                                     f"output_dir={tmp_path / 'run2'}"]))
    assert not (tmp_path / "run2" / "final").exists()


# ---------------------------------------------------------------------- 15. empty data files

def test_empty_data_file_is_named(tmp_path, caplog):
    # Before: "the training split is empty" without the file; the PRM loader returned [] without a word.
    from frugal.train.prm_data import load_stepwise

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"{empty}: the data file is empty"):
        load_task(_task(empty))
    bad_only = _jsonl(tmp_path / "bad.jsonl", [b"{oops\n"])
    with pytest.raises(ValueError, match=rf"{bad_only}: every row was bad \(1 skipped"):
        load_task(_task(bad_only, on_bad_row="skip"))
    with caplog.at_level(logging.WARNING):
        assert load_stepwise(str(empty)) == ([], 0)
    assert f"stepwise data {empty}: zero usable rows" in caplog.text


# ---------------------------------------------------------------------- 16. the demo under load

def test_time_cap_is_reported_and_demo_fails_without_improvement(tmp_path):
    # Before: the cap stopped training silently, the DEMO line had no step count, and the exit status was 0.
    proc = subprocess.run([sys.executable, "-m", "frugal.recipes.train", *TINY, "max_steps=50", "max_minutes=0.001",
                           "require_improvement=true", f"output_dir={tmp_path / 'run'}"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert "stopped training EARLY: 0 of 50 steps ran" in proc.stdout
    assert "DEMO accuracy_before=" in proc.stdout and " steps=0 " in proc.stdout
    assert proc.returncode == 1 and "did not rise" in proc.stderr


def test_cli_sets_a_passive_openmp_wait_policy_and_threads_follow_free_cores(monkeypatch):
    import torch

    from frugal.runtime import system as runtime

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", "import os, frugal.recipes.cli; print(os.environ['OMP_WAIT_POLICY'])"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "PASSIVE"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 1.0, 1.0))  # one busy process beside us
        assert runtime.free_cores() == 1
        assert runtime.set_cpu_threads(None, torch.device("cpu")) == 1
        assert runtime.set_cpu_threads(2, torch.device("cpu")) == 2  # an explicit num_threads wins
    finally:
        torch.set_num_threads(before)

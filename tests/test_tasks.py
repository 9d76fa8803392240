"""Task loaders: generated problems, fixed splits, file formats and bad rows."""

import json

import pytest

from frugal.tasks import BadRow, load_task
from frugal.tasks.config import PromptConfig, TaskConfig
from frugal.tasks.generated import arith_steps, multiplication_steps


def test_arith_single_digit_enumerates_and_splits_fixed():
    data = load_task(TaskConfig(name="arith", digits=1, ops=["+"], test_fraction=0.3))
    assert len(data.train) + len(data.test) == 100  # every a+b with a,b in 0..9
    questions = {r["question"] for r in data.test}
    assert not questions & {r["question"] for r in data.train}
    other_seed = load_task(TaskConfig(name="arith", digits=1, ops=["+"], test_fraction=0.3, seed=7))
    assert {r["question"] for r in other_seed.test} == questions  # the held-out split never moves
    row = data.train[0]
    a, b = row["question"].removeprefix("What is ").rstrip("?").split(" + ")
    assert row["answer"] == str(int(a) + int(b)) and row["steps"] == [f"{a} + {b} = {row['answer']}"]
    assert row["prompt"][-1]["content"].endswith("\\boxed{}.") and row["answer_format"] == "boxed"


def test_arith_large_space_is_sampled_with_caps():
    data = load_task(TaskConfig(name="arith", digits=3, ops=["+", "-", "*"], num_operands=3, n_train=50, n_test=10))
    assert len(data.train) == 50 and len(data.test) == 10


def test_steps_hand_worked():
    assert arith_steps([2, 3, 4], ["+", "*"]) == (["3 * 4 = 12", "2 + 12 = 14"], 14)
    assert arith_steps([9, 4, 2], ["-", "+"]) == (["9 - 4 = 5", "5 + 2 = 7"], 7)
    assert multiplication_steps(123, 45) == (["123 * 5 = 615", "123 * 40 = 4920", "615 + 4920 = 5535"], 5535)
    assert multiplication_steps(12, 30) == (["12 * 30 = 360"], 360)


def test_multiply_rows():
    data = load_task(TaskConfig(name="multiply", digits=3, digits_b=2, n_train=20, n_test=5))
    row = data.test[0]
    a, b = row["question"].removeprefix("What is ").rstrip("?").split(" * ")
    assert int(row["answer"]) == int(a) * int(b) and row["steps"][-1].endswith(row["answer"])


def test_svamp_fixed_700_300_split():
    data = load_task(TaskConfig(name="svamp"))
    assert len(data.train) == 700 and len(data.test) == 300
    assert data.train[0]["id"] == "svamp:chal-1" and data.train[0]["answer"] == "51"


def test_gsm8k_answer_after_hashes():
    data = load_task(TaskConfig(name="gsm8k", test_fraction=0.1, max_train=5))
    assert len(data.train) == 5 and len(data.test) > 500
    first = data.train[0]
    assert first["answer"].lstrip("-").replace(".", "").isdigit() and first["steps"] and "<<" not in first["steps"][0]


def test_fewshot_turns_show_worked_solutions_and_leave_train():
    plain = load_task(TaskConfig(name="arith", ops=["+", "-"], num_operands=3, n_train=20, n_test=4))
    cfg = TaskConfig(name="arith", ops=["+", "-"], num_operands=3, n_train=20, n_test=4,
                     prompt=PromptConfig(answer_format="number", num_fewshot=2))
    data = load_task(cfg)
    shots = plain.train[:2]
    assert data.info["fewshot_ids"] == [r["id"] for r in shots]
    assert [r["id"] for r in data.train] == [r["id"] for r in plain.train[2:]]  # the examples left train
    prompt = data.test[0]["prompt"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert prompt[0]["content"] == shots[0]["question"] and prompt[-1]["content"] == data.test[0]["question"]
    a, b = shots[0]["steps"]  # e.g. "5 - 7 = -2", "-2 + 8 = 6"
    assert prompt[1]["content"] == f"{a}\n\n{b}\n\nThe answer is \\boxed{{{shots[0]['answer']}}}."
    system = load_task(TaskConfig(name="arith", prompt=PromptConfig(system="Be brief.", num_fewshot=1)))
    assert [m["role"] for m in system.test[0]["prompt"]] == ["system", "user", "assistant", "user"]
    with pytest.raises(ValueError, match="num_fewshot=1: svamp has only 0 training rows with reference steps"):
        load_task(TaskConfig(name="svamp", prompt=PromptConfig(num_fewshot=1)))
    with pytest.raises(ValueError, match="num_fewshot must be >= 0"):
        PromptConfig(num_fewshot=-1)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_mapping_regex_and_bad_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    _write_jsonl(path, [{"q": "1+1?", "sol": "it is #2"}, {"q": "2+2?", "sol": "#4"}, {"q": "", "sol": "#3"}])
    cfg = dict(name="jsonl", path=str(path), question_field="q", answer_field="sol", answer_regex=r"#(\d+)",
               test_fraction=0.0)
    with pytest.raises(BadRow, match=r"data.jsonl line 3.*question is missing or empty.*on_bad_row=skip"):
        load_task(TaskConfig(**cfg))
    data = load_task(TaskConfig(**cfg, on_bad_row="skip"))
    assert [r["answer"] for r in data.train] == ["2", "4"] and data.skipped == 1

    _write_jsonl(path, [{"q": "1+1?", "sol": "none"}])
    with pytest.raises(BadRow, match=r"line 1.*answer_regex.*does not match"):
        load_task(TaskConfig(**cfg))
    _write_jsonl(path, [{"question": "1+1?"}])
    with pytest.raises(BadRow, match=r"line 1: missing key 'sol'"):
        load_task(TaskConfig(**cfg))
    path.write_text('{"q": "1+1?", "sol": "#2"}\n{not json\n')
    with pytest.raises(BadRow, match=r"line 2: not valid JSON"):
        load_task(TaskConfig(**cfg))


def test_missing_file_and_bad_config_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_task(TaskConfig(name="svamp", path=str(tmp_path / "nope.json")))
    with pytest.raises(ValueError, match="task.ops"):
        TaskConfig(ops=["/"])
    with pytest.raises(ValueError, match="task.prompt.answer_format"):
        PromptConfig(answer_format="latex")


def test_hf_saved_dataset(tmp_path):
    import datasets

    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"problem": "3+3?", "solution": "6"}, {"problem": "1+2?", "solution": "3"}]),
        "test": datasets.Dataset.from_list([{"problem": "5+5?", "solution": "10"}]),
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_task(TaskConfig(name="hf", path=str(tmp_path / "ds"), question_field="problem", answer_field="solution"))
    assert [r["answer"] for r in data.train] == ["6", "3"] and data.test[0]["answer"] == "10"

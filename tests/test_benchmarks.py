"""Hub benchmarks (tasks/benchmarks.py) from small fixture files in each dataset's own on-disk layout on the
Hub, read through the same ``datasets.load_dataset`` path; LaTeX gold answers graded with math-verify."""

from __future__ import annotations

import json

import pytest

from frugal.rewards.verify import is_correct, validate_gold_answers
from frugal.tasks import TaskConfig, load_task, require_train

MATH500 = [  # HuggingFaceH4/MATH-500 test.jsonl columns
    {"problem": "Compute $\\frac{1}{4} + \\frac{1}{4}$.", "solution": "...", "answer": "\\frac{1}{2}",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Simplify $\\sqrt{8}/2$.", "solution": "...", "answer": "\\sqrt{2}", "subject": "Algebra", "level": 2,
     "unique_id": "test/algebra/2.json"},
    {"problem": "Solve $|x - 2.5| \\le 4.5$.", "solution": "...", "answer": "[-2, 7]", "subject": "Algebra", "level": 3,
     "unique_id": "test/algebra/3.json"},
    {"problem": "An angle of a right triangle?", "solution": "...", "answer": "90^\\circ", "subject": "Geometry",
     "level": 1, "unique_id": "test/geometry/4.json"},
    {"problem": "Who ran farthest?", "solution": "...", "answer": "\\text{Evelyn}", "subject": "Algebra", "level": 2,
     "unique_id": "test/algebra/5.json"},
]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_parquet(path, rows):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_math500_from_its_hub_layout(tmp_path):
    _write_jsonl(tmp_path / "MATH-500" / "test.jsonl", MATH500)
    data = load_task(TaskConfig(name="math500", path=str(tmp_path / "MATH-500")))
    assert data.train == [] and len(data.test) == 5
    assert [r["answer"] for r in data.test] == [r["answer"] for r in MATH500]
    assert data.test[0]["id"] == "math500:test/prealgebra/1.json"
    assert data.test[0]["question"] == MATH500[0]["problem"] and data.test[0]["answer_format"] == "boxed"
    validate_gold_answers(data.test, source="math500")  # every LaTeX gold is readable


def test_aime24_parquet_train_split_becomes_the_test_split(tmp_path):
    rows = [{"id": 60 + i, "problem": f"AIME problem {i}", "solution": "...", "answer": str(100 + i),
             "url": "https://artofproblemsolving.com", "year": "2024"} for i in range(3)]
    _write_parquet(tmp_path / "aime_2024" / "data" / "train-00000-of-00001.parquet", rows)
    data = load_task(TaskConfig(name="aime24", path=str(tmp_path / "aime_2024")))
    assert data.train == [] and [r["answer"] for r in data.test] == ["100", "101", "102"]
    assert data.test[0]["id"] == "aime24:60"


def test_aime25_jsonl(tmp_path):
    _write_jsonl(tmp_path / "aime25" / "test.jsonl", [{"problem": "Find n.", "answer": "70", "id": "0"},
                                                       {"problem": "Find m.", "answer": "588", "id": "1"}])
    data = load_task(TaskConfig(name="aime25", path=str(tmp_path / "aime25")))
    assert [r["answer"] for r in data.test] == ["70", "588"] and not data.train


GSM8K_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
"""


def _gsm8k_hub_copy(root):
    def rec(q, a):
        return {"question": q, "answer": f"She has 2 + 3 = <<2+3=5>>5 apples.\n#### {a}"}
    _write_parquet(root / "main" / "train-00000-of-00001.parquet", [rec(f"train {i}?", i) for i in range(4)])
    _write_parquet(root / "main" / "test-00000-of-00001.parquet", [rec(f"test {i}?", 10 + i) for i in range(2)])
    _write_parquet(root / "socratic" / "train-00000-of-00001.parquet", [rec("socratic?", 99)])
    _write_parquet(root / "socratic" / "test-00000-of-00001.parquet", [rec("socratic test?", 98)])
    (root / "README.md").write_text(GSM8K_README)
    return root


def test_gsm8k_from_the_hub_layout_keeps_its_own_splits(tmp_path):
    root = _gsm8k_hub_copy(tmp_path / "gsm8k")
    data = load_task(TaskConfig(name="gsm8k", source="hub", path=str(root)))
    assert [r["answer"] for r in data.train] == ["0", "1", "2", "3"] and [r["answer"] for r in data.test] == ["10", "11"]
    assert data.train[0]["steps"] == ["She has 2 + 3 = 5 apples."]  # the calculator annotation is dropped, as locally
    socratic = load_task(TaskConfig(name="gsm8k", source="hub", path=str(root), config_name="socratic"))
    assert [r["answer"] for r in socratic.test] == ["98"]


def test_gsm8k_auto_reads_the_local_file_when_there_is_one(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}?", "answer": f"w\n#### {i}"} for i in range(20)])
    data = load_task(TaskConfig(name="gsm8k", path=str(path), test_fraction=0.5))
    assert len(data.train) + len(data.test) == 20


def test_hf_eval_only_dataset_and_config_name(tmp_path):
    _write_jsonl(tmp_path / "evalset" / "test.jsonl", [{"question": "1 + 1?", "answer": "2"}])
    data = load_task(TaskConfig(name="hf", path=str(tmp_path / "evalset")))
    assert data.train == [] and [r["answer"] for r in data.test] == ["2"]
    with pytest.raises(ValueError, match="evaluation-only dataset .*frugal eval task=hf"):
        require_train(data, TaskConfig(name="hf"), "frugal train")
    root = _gsm8k_hub_copy(tmp_path / "cfgs")
    socratic = load_task(TaskConfig(name="hf", path=str(root), config_name="socratic", answer_regex=r"#### (\d+)"))
    assert [r["answer"] for r in socratic.train] == ["99"] and [r["answer"] for r in socratic.test] == ["98"]


def test_train_recipe_refuses_an_eval_only_benchmark(tmp_path, tiny_overrides):
    from conftest import compose_train

    from frugal.recipes.train import run

    _write_jsonl(tmp_path / "m" / "test.jsonl", MATH500)
    cfg = compose_train([o for o in tiny_overrides if not o.startswith("task.")]
                        + ["task=math500", f"task.path={tmp_path / 'm'}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="task=math500 is an evaluation-only dataset"):
        run(cfg)


def test_frugal_eval_on_math500(tmp_path):
    from test_configs import compose_recipe

    from frugal.recipes.eval import run

    _write_jsonl(tmp_path / "m" / "test.jsonl", MATH500)
    summary = run(compose_recipe("eval", ["model=tiny_random", "search=greedy", "task=math500",
                                          f"task.path={tmp_path / 'm'}", "engine.max_new_tokens=4", "num_threads=1",
                                          "plots=false", "progress=false"]), run_dir=tmp_path / "run")
    assert summary["rows"][0]["problems"] == 5


# ---------------------------------------------------------------------- LaTeX golds (math-verify)

@pytest.mark.parametrize("completion, gold, correct", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\dfrac12", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", True),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", True),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", False),
    ("\\boxed{[-2,7]}", "[-2, 7]", True),
    ("\\boxed{(-2,7]}", "[-2, 7]", False),  # an open end is another interval
    ("\\boxed{90^\\circ}", "90^\\circ", True),
    ("\\boxed{90}", "90^\\circ", True),
    ("\\boxed{91^\\circ}", "90^\\circ", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", False),
])
def test_latex_gold_answers(completion, gold, correct):
    assert is_correct(completion, gold, "boxed") is correct


def test_an_unreadable_gold_is_a_bad_row_never_reward_one():
    rows = [{"id": "math500:bad", "answer": "}{"}]
    with pytest.raises(ValueError, match="math500:bad"):
        validate_gold_answers(rows, source="task=math500")
    assert not any(is_correct(c, "}{") for c in ("\\boxed{}{}", "\\boxed{}", "}{", "\\boxed{0}"))

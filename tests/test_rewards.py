"""Answer extraction, verification and TRL-style reward functions on edge cases."""

import pytest

from frugal.rewards.combine import RewardConfig, RewardFunctionConfig, build_reward_model
from frugal.rewards.functions import correctness, format as format_reward, length_penalty
from frugal.rewards.verify import extract_answer, extract_boxed, is_correct, to_number, validate_gold_answers


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} then \\boxed{ 7 }", "7"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\fbox{3}", "3"),
    ("\\boxed {5}", "5"),
    ("\\boxed{}", None),
    ("\\boxed{12", None),  # unbalanced
    ("no box here 9", None),
])
def test_extract_boxed_variants(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, fmt, expected", [
    ("3 + 4 = 7", "number", "7"),
    ("It costs 1,234 dollars", "number", "1,234"),
    ("The result is -12.", "number", "-12"),
    ("half: 3/4", "number", "3/4"),
    ("Reasoning...\nAnswer: 15", "answer_line", "15"),
    ("answer is: \\boxed{8}", "answer_line", "8"),
    ("no digits", "number", None),
    ("Answer 15", "answer_line", None),
])
def test_extract_answer_formats(text, fmt, expected):
    assert extract_answer(text, fmt) == expected


@pytest.mark.parametrize("completion, gold, fmt, ok", [
    ("\\boxed{1,234}", "1234", "boxed", True),
    ("\\boxed{-5}", "-5", "boxed", True),
    ("\\boxed{5}", "-5", "boxed", False),
    ("\\boxed{\\frac{1}{2}}", "0.5", "boxed", True),
    ("\\boxed{0.5}", "1/2", "boxed", True),
    ("\\boxed{51.0}", "51", "boxed", True),
    ("\\boxed{x + 1}", "1 + x", "boxed", True),  # math-verify, not just numbers
    ("\\boxed{banana}", "7", "boxed", False),
    ("The answer is 7", "7", "boxed", False),  # strict: no box, no credit
    ("The answer is 7", "7", "number", True),
    ("7 apples, then 8", "7", "number", False),  # the last number counts
])
def test_is_correct(completion, gold, fmt, ok):
    assert is_correct(completion, gold, fmt) is ok


def test_to_number():
    assert to_number("1,234") == 1234 and to_number("-3/4") == -0.75 and to_number("$5.") == 5
    assert to_number("\\frac{3}{4}") == 0.75 and to_number("abc") is None and to_number("1/0") is None


def test_unparseable_gold_is_an_error_not_a_reward():
    validate_gold_answers([{"id": "ok", "answer": "12"}, {"id": "frac", "answer": "\\frac{1}{2}"}], source="t")
    with pytest.raises(ValueError, match=r"t: row 'bad'.*cannot be parsed"):
        validate_gold_answers([{"id": "bad", "answer": "\\boxed{"}], source="t")


def test_trl_signature_with_chat_and_plain_completions():
    prompts = [[{"role": "user", "content": "q"}]] * 3
    chat = [[{"role": "assistant", "content": c}] for c in ("\\boxed{7}", "\\boxed{8}", "7")]
    assert correctness(prompts, chat, answer=["7", "7", "7"], answer_format=["boxed"] * 3) == [1.0, 0.0, 0.0]
    assert correctness(prompts, ["\\boxed{7}", "x", "7"], answer=["7"] * 3, answer_format="number") == [1.0, 0.0, 1.0]
    assert format_reward(prompts, chat, answer_format="boxed") == [1.0, 1.0, 0.0]
    assert length_penalty(prompts, ["a" * 10, "a" * 15, "a" * 30], target_chars=10) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="'answer' has 2 values for 3"):
        correctness(prompts, chat, answer=["7", "7"])


def bad_reward(prompts, completions, **_):
    return [1.0 / (len(c[0]["content"]) - 3) for c in completions]  # fails on a 3-character completion


def none_reward(prompts, completions, **_):
    return [None, 2.0]


def test_reward_model_combines_and_names_failures():
    cfg = RewardConfig([RewardFunctionConfig("correctness", 1.0), RewardFunctionConfig("format", 0.5),
                        RewardFunctionConfig("tests.test_rewards:none_reward", 0.25)])
    model = build_reward_model(cfg)
    completions = [[{"role": "assistant", "content": t}] for t in ("\\boxed{7}", "7")]
    out = model(["p", "p"], completions, {"answer": ["7", "7"], "answer_format": ["boxed", "boxed"], "id": ["a", "b"]})
    assert out.total == [1.5, 0.5]  # None counts as 0 in the total (TRL)
    assert out.per_function["tests.test_rewards:none_reward"] == [None, 2.0]

    failing = build_reward_model(RewardConfig([RewardFunctionConfig("tests.test_rewards:bad_reward")]))
    bad = [[{"role": "assistant", "content": t}] for t in ("long one", "abc")]
    with pytest.raises(RuntimeError, match=r"(?s)'tests.test_rewards:bad_reward' raised ZeroDivisionError.*sample 1.*'abc'.*id 'y'"):
        failing(["p", "p"], bad, {"id": ["x", "y"]})
    with pytest.raises(ValueError, match="could not be imported"):
        build_reward_model(RewardConfig([RewardFunctionConfig("no_such_module:fn")]))

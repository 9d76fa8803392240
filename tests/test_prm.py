"""Process reward models: token layout, aggregation, data (exact and soft labels), metrics, MC labelling,
training on a separable set, save/reload. All on builtin:tiny-random (fast)."""

import json
import math

import pytest
import torch

from frugal.tasks.rows import BadRow
from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRMConfig, build_prm, load_prm
from frugal.train.prm_metrics import auroc, step_metrics
from frugal.train.prm_steps import aggregate, collate, encode, token_budget_batches
from frugal.rewards.steps import split_steps
from frugal.train.prm_data import corrupt_solution, generated_examples, load_stepwise, validate_example
from frugal.conf import CONF_DIR

TINY = ModelConfig(name_or_path="builtin:tiny-random", dtype="float32")


@pytest.fixture(scope="module")
def tok():
    from frugal.inference.models import load_tokenizer

    return load_tokenizer("builtin:tiny-random")


@pytest.fixture(scope="module")
def tiny_prm():
    torch.manual_seed(0)
    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig())
    torch.nn.init.normal_(prm.head.weight, std=0.5)  # a non-trivial head so scores differ per step
    return prm


# ---------------------------------------------------------------------- layout

def test_separator_positions_are_the_last_separator_token(tok):
    enc = encode(tok, "What is 3 + 4?", ["3 + 4 = 7", "The answer is \\boxed{7}."], "\n\n")
    sep_ids = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(enc.positions) == 2
    for p in enc.positions:
        assert enc.ids[p - len(sep_ids) + 1:p + 1] == sep_ids
    assert enc.positions[-1] == len(enc.ids) - 1
    # the text between the two positions is exactly the second step
    between = tok.decode(enc.ids[enc.positions[0] + 1:enc.positions[1] - len(sep_ids) + 1])
    assert between == "The answer is \\boxed{7}."


def test_multi_token_separator_and_special_token(tok):
    sep = "<|im_end|>"
    assert len(tok(sep, add_special_tokens=False)["input_ids"]) == 1
    enc = encode(tok, "q", ["a", "b"], sep)
    assert [tok.decode([enc.ids[p]]) for p in enc.positions] == [sep, sep]
    enc = encode(tok, "q", ["a", "b"], " ки")
    sep_ids = tok(" ки", add_special_tokens=False)["input_ids"]
    assert enc.ids[enc.positions[0] - len(sep_ids) + 1:enc.positions[0] + 1] == sep_ids


def test_split_steps_keeps_partial_last_step():
    assert split_steps("a = 1\n\nb = 2\n\nc = ", "\n\n") == ["a = 1", "b = 2", "c ="]
    assert split_steps("a = 1\n\nb = 2\n\n", "\n\n") == ["a = 1", "b = 2"]
    assert split_steps("", "\n\n") == []
    assert split_steps("x\ny", "\n") == ["x", "y"]


def test_score_partial_counts_the_trailing_unfinished_step(tiny_prm):
    q = "What is 3 + 4 * 5?"
    full = tiny_prm.score([q], [["4 * 5 = 20", "3 + 20 = 23"]])[0]
    partial = tiny_prm.score_partial([q, q, q], ["4 * 5 = 20\n\n3 + 20 = 23", "4 * 5 = 20\n\n3 + 2", "4 * 5 = 20\n\n"])
    assert len(partial[0]) == 2 and partial[0] == pytest.approx(full, abs=1e-6)
    assert len(partial[1]) == 2 and partial[1][0] == pytest.approx(full[0], abs=1e-6)
    assert partial[1][1] != pytest.approx(full[1], abs=1e-6)  # the unfinished step is scored as written
    assert len(partial[2]) == 1


def test_batched_scores_equal_one_by_one_and_tokens_are_counted(tiny_prm):
    prompts = ["What is 1 + 2?", "What is 9 * 9 - 3?", "x"]
    steps = [["1 + 2 = 3"], ["9 * 9 = 81", "81 - 3 = 78", "The answer is \\boxed{78}."], []]
    batched = tiny_prm.score(prompts, steps)
    tokens = tiny_prm.last_tokens
    single = [tiny_prm.score([p], [s])[0] for p, s in zip(prompts, steps)]
    for b, s in zip(batched, single):
        assert b == pytest.approx(s, abs=1e-5)
    assert batched[2] == []
    expected = sum(len(encode(tiny_prm.tokenizer, p, s, "\n\n").ids) for p, s in zip(prompts[:2], steps[:2]))
    assert tokens == expected
    before = tiny_prm.tokens_scored
    tiny_prm.score(prompts[:1], steps[:1])
    assert tiny_prm.tokens_scored == before + tiny_prm.last_tokens
    assert tiny_prm.num_parameters > tiny_prm.num_nonembedding_parameters > 0


def test_token_budget_batches_cover_everything_within_budget():
    lengths = [5, 50, 7, 30, 100, 6]
    batches = token_budget_batches(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 64


def test_collate_rows_and_positions(tok):
    a, b = encode(tok, "q", ["x", "y"], "\n"), encode(tok, "qq qq", ["z"], "\n")
    batch = collate([a, b], pad_id=0)
    assert batch["rows"].tolist() == [0, 0, 1]
    assert batch["positions"].tolist() == a.positions + b.positions
    assert batch["attention_mask"].sum().item() == len(a.ids) + len(b.ids)


# ---------------------------------------------------------------------- aggregation and metrics

def test_aggregate_by_hand():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert aggregate(s, "prod") == pytest.approx(0.36)
    assert aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert all(aggregate([], how) == 1.0 for how in ("last", "min", "prod", "mean"))
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(s, "max")


def test_auroc_by_hand():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert auroc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert auroc([0.2, 0.9], [1, 0]) == 0.0
    assert math.isnan(auroc([0.3], [1]))


def test_first_error_f1_processbench_style():
    labels = [[1, 1, 0, 0], [1, 1], [0, 0]]
    scores = [[0.9, 0.8, 0.2, 0.1],  # error at 2 found at 2
              [0.9, 0.4],            # correct solution flagged at 1 -> wrong
              [0.7, 0.3]]            # error at 0 predicted at 1 -> wrong
    m = step_metrics(scores, labels)
    assert m["first_error_acc_error"] == pytest.approx(0.5)
    assert m["first_error_acc_correct"] == 0.0
    assert m["first_error_f1"] == 0.0
    assert m["step_accuracy"] == pytest.approx(6 / 8)


# ---------------------------------------------------------------------- data

def test_generated_examples_label_first_error_and_after_zero():
    steps = ["7 * 5 = 35", "4 + 35 = 39", "39 + 9 = 48", "The answer is \\boxed{48}."]
    import random

    bad = corrupt_solution(steps, 1, random.Random(0), "result")
    assert bad[0] == steps[0] and bad[1] != steps[1]
    wrong = int(bad[1].split("= ")[1])
    assert wrong != 39
    assert bad[2] == f"{wrong} + 9 = {wrong + 9}"  # carried forward, locally consistent
    assert bad[3] == f"The answer is \\boxed{{{wrong + 9}}}."
    bad = corrupt_solution(steps, 0, random.Random(1), "operand")
    lhs, rhs = bad[0].split(" = ")
    assert lhs != "7 * 5" and int(rhs) == eval(lhs)  # a miscopied operand, honest arithmetic
    rows = [{"id": "t", "question": "What is 4 + 7 * 5 + 9?", "answer": "48", "steps": steps[:3]}]
    examples = generated_examples(rows, errors_per_row=3, seed=0)
    assert examples[0]["labels"] == [1.0] * 4 and examples[0]["completions"] == steps
    for e in examples[1:]:
        first = e["labels"].index(0.0)
        assert e["labels"] == [1.0] * first + [0.0] * (4 - first)
        assert e["completions"][:first] == steps[:first] and e["completions"][first] != steps[first]


def test_stepwise_jsonl_soft_labels_and_bad_rows(tmp_path):
    good = {"prompt": "q", "completions": ["a", "b"], "labels": [True, 0.25]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "q", "completions": ["a"], "labels": [1, 0]}) + "\n")
    with pytest.raises(BadRow, match=r"d\.jsonl line 2: 1 steps but 2 labels"):
        load_stepwise(str(path))
    rows, skipped = load_stepwise(str(path), on_bad_row="skip")
    assert skipped == 1 and rows[0]["labels"] == [1.0, 0.25]  # soft label kept as float
    for bad, msg in [({"prompt": "q", "completions": ["a", " "], "labels": [1, 1]}, "step 1 is empty"),
                     ({"prompt": "q", "completions": ["a"], "labels": [1.5]}, "label 0 is 1.5"),
                     ({"prompt": "q", "completions": ["a"]}, "missing key 'labels'")]:
        with pytest.raises(BadRow, match=msg):
            validate_example(bad, "f.jsonl line 9")


def test_stepwise_hf_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "completions": ["a"], "labels": [0.5]}]).save_to_disk(str(tmp_path / "ds"))
    rows, skipped = load_stepwise(str(tmp_path / "ds"))
    assert rows == [{"prompt": "q", "completions": ["a"], "labels": [0.5]}] and skipped == 0


# ---------------------------------------------------------------------- training

def test_soft_labels_end_to_end_and_loss_falls_on_separable_set(tmp_path):
    """Steps that say 'good' are labelled 0.9, 'bad' 0.1 (soft): BCE must fall and the scores separate."""
    from frugal.recipes.train_prm import train_step
    from frugal.train.prm import bce_loss

    torch.manual_seed(0)
    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig(separator="\n"))
    examples = [("What is 1 + 1?", ["good", "bad", "good"], [0.9, 0.1, 0.9]),
                ("What is 2 + 2?", ["bad", "good"], [0.1, 0.9])] * 4
    batch = [(prm.encode(p, s), y) for p, s, y in examples]
    opt = torch.optim.AdamW([{"params": [p for p in prm.model.parameters() if p.requires_grad], "lr": 1e-3},
                             {"params": list(prm.head.parameters()), "lr": 3e-2}])
    with torch.no_grad():
        first = bce_loss(prm, batch, sum(len(y) for _, y in batch)).item()
    for _ in range(30):
        stats = train_step(prm, opt, batch, 1.0, micro_batch_size=3)
    assert stats["loss"] < first - 0.1
    scores = prm.score(["What is 1 + 1?"], [["good", "bad"]])[0]
    assert scores[0] > 0.6 > 0.4 > scores[1]
    # the minimum of soft-label BCE is the label itself, so scores approach 0.9 / 0.1, not 1 / 0
    assert scores[0] < 0.99


def test_recipe_run_resume_and_reload_identical_scores(tmp_path):
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train_prm import run
    from frugal.train.tracking import read_jsonl

    overrides = ["model=tiny_random", "task.n_train=24", "task.n_test=6", "max_steps=4", "eval_every=2",
                 "save_every=2", "batch_size=4", "prm.num_layers=0", "lora.r=4", "max_minutes=null"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_prm", overrides=overrides + [f"output_dir={tmp_path}"])
    summary = run(cfg)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert "eval/step_auroc" in rows[1] and "eval/first_error_f1" in rows[-1]
    assert (tmp_path / "checkpoints" / "step_4" / "adapter" / "head.safetensors").exists()
    assert summary["steps"] == 4

    prm = load_prm(tmp_path / "final")
    again = load_prm(tmp_path / "final")
    q, steps = ["What is 2 + 3 * 4?"], [["3 * 4 = 12", "2 + 12 = 14"]]
    assert prm.score(q, steps) == again.score(q, steps)
    meta = json.loads((tmp_path / "final" / "prm.json").read_text())
    assert meta["backbone"] == "builtin:tiny-random" and meta["separator"] == "\n\n"

    # resume from step 2 of the same run: reaches step 4 and logs steps 3, 4 once
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_prm", overrides=overrides + [f"resume={tmp_path / 'checkpoints' / 'step_2'}"])
    summary2 = run(cfg)
    steps_logged = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps_logged == [1, 2, 3, 4] and summary2["steps"] == 4


def test_save_reload_identical_scores_with_truncated_backbone(tmp_path):
    torch.manual_seed(1)
    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig(num_layers=1, separator="\n"))
    torch.nn.init.normal_(prm.head.weight, std=0.5)
    for p in prm.model.parameters():  # LoRA B starts at zero; perturb so the adapter matters
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    prm.save(tmp_path / "p")
    back = load_prm(tmp_path / "p")
    texts = ["1 + 1 = 2\n2 + 2 = 4", "1 + 1 = 3\n3 + 2"]
    assert back.score_partial(["q", "q"], texts) == prm.score_partial(["q", "q"], texts)
    assert back.num_parameters == prm.num_parameters and back.cfg.num_layers == 1


# ---------------------------------------------------------------------- Monte-Carlo labelling

class FakePolicy:
    """Deterministic: every sampled solution is 'A\\nB\\nC'; a rollout from a prefix reaches the gold
    answer iff the prefix does not contain 'B' (so step B and after are wrong), except one of four."""

    def sample(self, prompts, n):
        from frugal.recipes.label_prm import Solution

        return [[Solution("A\nB\n\\boxed{5}")] * n for _ in prompts]

    def complete(self, prompts, prefixes, n):
        out = []
        for prefix in prefixes:
            good = "B" not in prefix.text
            out.append(["\\boxed{7}" if good or i == 0 else "\\boxed{5}" for i in range(n)])
        return out


def test_mc_labelling_with_fake_policy_soft_hard_and_resume(tmp_path):
    from hydra import compose, initialize_config_dir

    from frugal.recipes.label_prm import mc_labels, run

    assert mc_labels([[True, False, False, False], [False] * 4], False, "soft") == [0.25, 0.0, 0.0]
    assert mc_labels([[True, False, False, False], [False] * 4], True, "hard") == [1.0, 0.0, 1.0]

    out = tmp_path / "labels.jsonl"
    base = ["model=tiny_random", "prm=newline", "task.n_train=6", "task.n_test=2", "max_problems=3",
            "samples_per_problem=1", "rollouts=4", "problems_per_batch=2", f"output={out}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("label_prm", overrides=base)
    # gold answers of arith are not 7 for every problem; the fake policy's rows use the task's gold
    summary = run(cfg, run_dir=tmp_path / "run", policy=FakePolicy())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["newly_labelled_problems"] == 3 and len(rows) == 3
    for r in rows:
        assert r["completions"] == ["A", "B", "\\boxed{5}"]
        gold_is_7 = r["answer"] == "7"
        first = 1.0 if gold_is_7 else 0.0
        # prefix "A\n": 4 of 4 rollouts say 7; prefix "A\nB\n": only rollout 0 says 7
        assert r["labels"][:2] == [first, 0.25 if gold_is_7 else 0.0]
        assert r["labels"][2] == float(r["answer"] == "5")
    rows_loaded, _ = load_stepwise(str(out))  # the output is valid stepwise data
    assert len(rows_loaded) == 3
    # resume: a torn last line is dropped, done problems are skipped
    with open(out, "a") as f:
        f.write('{"id": "arith:broken", "prom')
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("label_prm", overrides=base[:-4] + ["max_problems=4", "samples_per_problem=1",
                                                         "rollouts=4", "problems_per_batch=2", f"output={out}"])
    summary = run(cfg, run_dir=tmp_path / "run2", policy=FakePolicy())
    assert summary["newly_labelled_problems"] == 1
    assert len(out.read_text().splitlines()) == 4


def test_mc_labelling_runs_real_generate_on_tiny_random(tmp_path):
    from hydra import compose, initialize_config_dir

    from frugal.recipes.label_prm import run

    out = tmp_path / "labels.jsonl"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("label_prm", overrides=["model=tiny_random", "prm.separator=e", "task.n_train=4",
                                              "task.n_test=2", "max_problems=2", "rollouts=2",
                                              "generation.max_new_tokens=8", f"output={out}"])
    summary = run(cfg, run_dir=tmp_path / "run")
    rows, _ = load_stepwise(str(out))
    assert summary["solutions_written"] == len(rows) > 0
    from frugal.rewards.verify import is_correct

    raw = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["labels"] for r in raw] == [r["labels"] for r in rows]
    assert any(len(r["labels"]) > 1 for r in raw)  # some steps were rolled out
    for r in raw:
        # a step's soft label is the share of its 2 rollouts that reached the answer: 0, 1/2 or 1; the
        # last step's is the sampled solution's own grade, re-graded here from its steps
        assert 1 <= len(r["labels"]) == len(r["completions"]) <= 8 and r["rollouts"] == 2
        assert all(y in (0.0, 0.5, 1.0) for y in r["labels"][:-1])
        assert r["labels"][-1] == float(r["solution_correct"]) == float(is_correct("e".join(r["completions"]), r["answer"], "boxed"))


def test_mc_labelling_continues_each_prefix_from_the_sampled_token_ids(monkeypatch):
    """A step prefix is continued from the chat prompt's ids + the ids the policy sampled for the prefix,
    not from its text re-rendered through the chat template (which tokenizes differently: here the
    policy sampled the separator as two "\\n" tokens, and the tokenizer merges "4\\n\\n" into one)."""
    from frugal.recipes.label_prm import HFPolicy, LabelPRMConfig, label_problems
    from frugal.inference import decoding
    from frugal.inference.models import load_model
    from frugal.train.rollout import GenerationConfig

    model, tok = load_model(TINY, torch.device("cpu"))
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    sampled = enc("4") + enc("\n") + enc("\n") + enc("5")  # "4\n\n5", the separator as two tokens
    assert enc("4\n\n") != sampled[:3]
    contexts, real = [], decoding.sample

    def fake_first_sample(model, tokenizer, ids, mask, n, cfg, max_new, greedy=False):
        contexts.append([row[m.bool()].tolist() for row, m in zip(ids, mask)])
        if len(contexts) > 1:  # the rollouts from the prefix: really sampled
            return real(model, tokenizer, ids, mask, n, cfg, max_new, greedy)
        rows = len(ids) * n
        return torch.tensor([sampled + [tok.eos_token_id]] * rows), torch.full((rows,), len(sampled) + 1)

    monkeypatch.setattr(decoding, "sample", fake_first_sample)
    cfg = LabelPRMConfig(prm=PRMConfig(separator="\n\n"), samples_per_problem=1, rollouts=2,
                         generation=GenerationConfig(max_new_tokens=4))
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    row = {"id": "p0", "prompt": prompt, "question": "What is 2 + 2?", "answer": "4", "answer_format": "number"}
    out = label_problems([row], HFPolicy(model, tok, cfg.generation), cfg)
    prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert contexts[1] == [list(prompt_ids) + sampled[:3]]  # the prefix "4\n\n" exactly as sampled
    rerendered = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "4\n\n"}], tokenize=True,
                                         continue_final_message=True, return_dict=True)["input_ids"]
    assert list(rerendered) != contexts[1][0]  # what continuing the re-rendered text would have fed
    assert out[0]["completions"] == ["4", "5"] and len(out[0]["labels"]) == 2

"""PRM training levers: problem-grouped batches, the auxiliary LM loss (targets and that it trains), and a
held-out generated set that does not move when the training corruption mix changes. builtin:tiny-random."""

import torch

from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRMConfig, build_prm
from frugal.conf import CONF_DIR

TINY = ModelConfig(name_or_path="builtin:tiny-random", dtype="float32")


def test_group_rows_keeps_a_problems_solutions_together():
    from frugal.recipes.train_prm import group_rows
    from frugal.train.schedule import batch_for_step

    prompts = ["p1", "p2", "p1", "p3", "p2", "p1"]
    rows = ["a", "b", "c", "d", "e", "f"]
    assert group_rows(prompts, rows, by_problem=True) == [["a", "c", "f"], ["b", "e"], ["d"]]
    assert group_rows(prompts, rows, by_problem=False) == [[r] for r in rows]
    groups = group_rows(prompts, rows, by_problem=True)
    for step in (1, 2, 3):  # every batch holds whole problems
        batch = [r for g in batch_for_step(groups, step, 2, seed=0) for r in g]
        for prompt in {prompts[rows.index(r)] for r in batch}:
            mine = [r for p, r in zip(prompts, rows) if p == prompt]
            assert batch.count(mine[0]) >= 1 and all(r in batch for r in mine)


def test_lm_targets_are_the_correct_steps_and_their_separators():
    from frugal.train.prm import lm_targets

    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig())
    steps = ["1 + 2 = 3", "3 + 4 = 8", "The answer is 8."]
    enc = prm.encode("What is 1 + 2 + 4?", steps)
    decode = lambda idx: prm.tokenizer.decode([enc.ids[i] for i in idx])  # noqa: E731
    assert decode(lm_targets(prm.tokenizer, "What is 1 + 2 + 4?", enc, [1.0, 0.0, 0.0])) == "1 + 2 = 3\n\n"
    both = lm_targets(prm.tokenizer, "What is 1 + 2 + 4?", enc, [1.0, 0.0, 1.0])
    assert decode(both) == "1 + 2 = 3\n\nThe answer is 8.\n\n"
    assert both == sorted(both) and both[-1] == enc.positions[-1]
    assert lm_targets(prm.tokenizer, "What is 1 + 2 + 4?", enc, [0.0, 0.0, 0.0]) == []


def test_aux_lm_loss_trains_next_token_prediction_and_is_off_by_default():
    from frugal.recipes.train_prm import train_step
    from frugal.train.prm import lm_targets, prm_losses

    torch.manual_seed(0)
    prm = build_prm(TINY, LoraConfig(r=8, alpha=16), PRMConfig())
    rows = []
    for q, steps, labels in [("What is 2 + 3?", ["2 + 3 = 5", "The answer is 5."], [1.0, 1.0]),
                             ("What is 2 + 3?", ["2 + 3 = 6", "The answer is 6."], [0.0, 0.0])]:
        enc = prm.encode(q, steps)
        rows.append((enc, labels, lm_targets(prm.tokenizer, q, enc, labels)))
    assert rows[1][2] == []  # no LM targets in a wrong solution
    bce, lm = prm_losses(prm, rows, 4)
    assert lm is None  # lm_normalizer 0: no LM term
    opt = torch.optim.AdamW([p for p in prm.parameters() if p.requires_grad], lr=1e-2)
    first = train_step(prm, opt, rows, 0.0, micro_batch_size=1, lm_loss_weight=1.0)
    for _ in range(20):
        last = train_step(prm, opt, rows, 0.0, micro_batch_size=1, lm_loss_weight=1.0)
    assert last["lm_loss"] < first["lm_loss"] - 0.5
    assert "lm_loss" not in train_step(prm, opt, rows, 1.0, micro_batch_size=2)


def test_held_out_generated_set_ignores_the_training_corruption_mix():
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train_prm import TrainPRMConfig, load_examples, to_config

    def examples(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train_prm", overrides=["model=tiny_random", "task.n_train=30", "task.n_test=10", *overrides])
        return load_examples(to_config(cfg, TrainPRMConfig))

    train_a, held_a, _ = examples("data.errors_per_row=1", "data.operand_error_frac=0.5")
    train_b, held_b, _ = examples("data.errors_per_row=3", "data.operand_error_frac=0.1")
    assert held_a == held_b and len(held_a) == 20  # 10 problems x (reference + 1 corrupted copy)
    assert len(train_b) == 2 * len(train_a)  # 1 + 3 solutions per problem instead of 1 + 1
    train_c, _, _ = examples("data.eval_errors_per_row=2")
    assert train_c == train_a


def test_equation_drills_hand_worked():
    from frugal.train.prm_data import equation_drills

    rows = [{"steps": ["5 - 7 = -2", "-2 + 8 = 6"]}, {"steps": ["5 - 7 = -2", "-2 - 1 = -3"]}]
    drills = equation_drills(rows, seed=0, wrong_per_fact=2)
    assert [d["prompt"] for d in drills[::4]] == ["What is 5 - 7?", "What is -2 + 8?", "What is -2 - 1?"]  # 5 - 7 once
    assert len(drills) == 3 * 4 and sum(d["labels"][0] for d in drills) == 6  # balanced
    for d in drills:
        lhs, rhs = d["completions"][0].split(" = ")
        assert d["prompt"] == f"What is {lhs}?" and (int(rhs) == eval(lhs)) == (d["labels"] == [1.0])
    wrong = [d["completions"][0] for d in drills[:4] if d["labels"] == [0.0]]
    assert len(set(wrong)) == 2  # two different slips per fact


def test_recipe_adds_drills_to_every_step(tmp_path):
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train_prm import run
    from frugal.train.tracking import read_jsonl

    overrides = ["model=tiny_random", "task.n_train=12", "task.n_test=4", "max_steps=2", "eval_every=0",
                 "save_every=0", "batch_size=4", "prm.num_layers=0", "lora.r=4", "max_minutes=null",
                 "data.drills_per_step=3", f"output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        run(compose("train_prm", overrides=overrides))
    logged = [r["steps_in_batch"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert logged == [4 * 3 + 3] * 2  # 4 solutions of 3 steps (2 equations + answer) and 3 one-step drills


def test_recipe_with_logprob_features_saves_the_training_vocabulary(tmp_path):
    """``prm.logprob_features=true`` (``logprob_vocab: train``): the features' softmax runs over exactly the
    token ids of the training solutions and drills, saved with the head and restored by ``load_prm``."""
    from hydra import compose, initialize_config_dir

    from frugal.recipes.train_prm import TrainPRMConfig, load_drills, load_examples, run
    from frugal.runtime.config import to_config
    from frugal.train.prm import load_prm
    from frugal.train.tracking import read_jsonl

    overrides = ["model=tiny_random", "task.n_train=12", "task.n_test=4", "max_steps=2", "eval_every=0",
                 "save_every=0", "batch_size=4", "prm.num_layers=0", "lora.r=4", "max_minutes=null",
                 "data.drills_per_step=3", "prm.logprob_features=true", "lm_loss_weight=1.0", f"output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose("train_prm", overrides=overrides)
    summary = run(raw)
    assert all("lm_loss" in r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r)
    prm = load_prm(summary["prm"])
    cfg = to_config(raw, TrainPRMConfig)
    train, _, _ = load_examples(cfg)
    texts = [(e["prompt"], e["completions"]) for e in train] + [(d["prompt"], d["completions"]) for d in load_drills(cfg)]
    expected = sorted({i for prompt, steps in texts for i in prm.encode(prompt, steps, cfg.prm.max_length).ids})
    assert prm.candidate_ids.tolist() == expected
    assert len(expected) < prm.model.get_output_embeddings().weight.shape[0]

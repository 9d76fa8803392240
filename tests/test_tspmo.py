"""T-SPMO: prefix-trie advantages against hand-worked examples, the selected-position gradient, replay,
and a short tiny-random training run with an exact resume."""

import shutil

import pytest
import torch

from conftest import TINY, compose_train
from frugal.runtime.config import to_config
from frugal.train.lora import LoraConfig, apply_lora
from frugal.inference.models import ModelConfig, load_model
from frugal.train.policy_loss import clipped_pg_loss, full_logits_logprobs, selected_logprobs
from frugal.train.rollout import GenerationConfig, Rollout
from frugal.train.tracking import read_jsonl
from frugal.train.tspmo import branch_transitions, replay_prefixes, replay_rollout, select_prefix_matching

PAD = 0

# One group of four. Shared prefixes of different lengths: all share [1]; a, b, d share [1, 2];
# a and d are identical.           reward
GROUP = [[1, 2, 3],               # a  1
         [1, 2, 4],               # b  0
         [1, 5],                  # c  1
         [1, 2, 3]]               # d  1
REWARDS = [1.0, 0.0, 1.0, 1.0]
# By hand: V([]) = V([1]) = 3/4 (root has one child: no branch). Node [1] branches:
#   V([1,2]) = (1+0+1)/3 = 2/3 -> A([1], 2) = 2/3 - 3/4 = -1/12   (rows a, b, d; position 1)
#   V([1,5]) = 1               -> A([1], 5) = 1 - 3/4   = +1/4    (row c; position 1)
# Node [1,2] branches (V = 2/3):
#   V([1,2,3]) = 1             -> A = +1/3                         (rows a, d; position 2)
#   V([1,2,4]) = 0             -> A = -2/3                         (row b; position 2)


def _padded(groups: list[list[list[int]]]):
    seqs = [s for g in groups for s in g]
    width = max(len(s) for s in seqs) + 2  # right padding past every completion
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def _triples(sel):
    return sorted(zip(sel.rows.tolist(), sel.positions.tolist(), [round(a, 6) for a in sel.advantages.tolist()]))


def test_trie_advantages_hand_worked():
    got = [(t.position, t.token, round(t.advantage, 6), t.visits, t.rows, t.is_leaf)
           for t in branch_transitions(GROUP, REWARDS)]
    assert got == [
        (1, 2, round(-1 / 12, 6), 3, (0, 1, 3), False),
        (1, 5, 0.25, 1, (2,), True),
        (2, 3, round(1 / 3, 6), 2, (0, 3), True),
        (2, 4, round(-2 / 3, 6), 1, (1,), True),
    ]


def test_unique_and_visit_weighted_selection():
    ids, mask = _padded([GROUP])
    unique = select_prefix_matching(ids, mask, REWARDS, group_size=4)
    # Each transition once, on its first row.
    assert _triples(unique) == [(0, 1, round(-1 / 12, 6)), (0, 2, round(1 / 3, 6)),
                                (1, 2, round(-2 / 3, 6)), (2, 1, 0.25)]
    visits = select_prefix_matching(ids, mask, REWARDS, group_size=4, weighting="visits")
    # Once per completion that took it: -1/12 three times, +1/3 twice.
    assert _triples(visits) == [(0, 1, round(-1 / 12, 6)), (0, 2, round(1 / 3, 6)), (1, 1, round(-1 / 12, 6)),
                                (1, 2, round(-2 / 3, 6)), (2, 1, 0.25), (3, 1, round(-1 / 12, 6)),
                                (3, 2, round(1 / 3, 6))]


def test_min_visits_drops_rare_transitions_but_keeps_their_rewards_in_v():
    ids, mask = _padded([GROUP])
    sel = select_prefix_matching(ids, mask, REWARDS, group_size=4, min_visits=2)
    # [1,5] and [1,2,4] have one completion each; the kept advantages still use V([1]) = 3/4, V([1,2]) = 2/3.
    assert _triples(sel) == [(0, 1, round(-1 / 12, 6)), (0, 2, round(1 / 3, 6))]


def test_identical_and_single_completions_give_nothing():
    ids, mask = _padded([[[7, 8, 9]] * 3 + [[7, 8, 9]]])
    assert len(select_prefix_matching(ids, mask, [1.0, 1.0, 1.0, 1.0], group_size=4)) == 0
    assert branch_transitions([[4, 5, 6]], [1.0]) == []
    assert branch_transitions([], []) == []
    # Equal rewards on different paths: a branch, but A = 0 everywhere, so nothing is selected.
    ids, mask = _padded([[[1, 2], [1, 3]]])
    assert len(select_prefix_matching(ids, mask, [0.5, 0.5], group_size=2)) == 0


def test_groups_are_independent_and_padding_is_ignored():
    # Group 2 uses the pad id 0 as a real token inside a completion; only the mask decides the length.
    ids, mask = _padded([[[3, 0], [3, 1]], [[0, 6], [0, 7, 7, 7]]])
    sel = select_prefix_matching(ids, mask, [1.0, 0.0, 0.0, 1.0], group_size=2)
    # Group 1 branches at position 1 (V = 1/2): +1/2 and -1/2; group 2 likewise, rows offset by 2.
    # Were the trailing pad ids read as tokens, [3, 0] would be a prefix of the padded [3, 0, 0, 0].
    assert _triples(sel) == [(0, 1, 0.5), (1, 1, -0.5), (2, 1, -0.5), (3, 1, 0.5)]
    with pytest.raises(ValueError, match="groups of 3"):
        select_prefix_matching(ids, mask, [0.0] * 4, group_size=3)


def test_advantage_normalisation_and_cap():
    ids, mask = _padded([GROUP])
    # reward_std: population std of (1, 0, 1, 1) = sqrt(3)/4.
    sel = select_prefix_matching(ids, mask, REWARDS, 4, adv_norm="reward_std", eps=0.0)
    scale = 4 / 3 ** 0.5
    assert _triples(sel) == [(0, 1, round(-1 / 12 * scale, 6)), (0, 2, round(1 / 3 * scale, 6)),
                             (1, 2, round(-2 / 3 * scale, 6)), (2, 1, round(0.25 * scale, 6))]
    sel = select_prefix_matching(ids, mask, REWARDS, 4, adv_norm="batch_std", eps=0.0)
    assert sel.advantages.std(unbiased=False).item() == pytest.approx(1.0)
    # Cap: the two largest |A| (-2/3 and +1/3) survive, in their original order.
    sel = select_prefix_matching(ids, mask, REWARDS, 4, max_selected=2)
    assert _triples(sel) == [(0, 2, round(1 / 3, 6)), (1, 2, round(-2 / 3, 6))]
    with pytest.raises(ValueError, match="algo.weighting"):
        select_prefix_matching(ids, mask, REWARDS, 4, weighting="bogus")


@pytest.mark.parametrize("override, key", [
    ("algo.weighting=most", "algo.weighting"),
    ("algo.adv_norm=zscore", "algo.adv_norm"),
    ("algo.min_visits=0", "algo.min_visits"),
    ("algo.max_selected=-1", "algo.max_selected"),
    ("algo.replay_samples=-2", "algo.replay_samples"),
])
def test_config_validation_names_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        to_config(compose_train(["algo=tspmo", override]))


def test_presets_compose():
    for preset in ("tspmo_multiply", "tspmo_qwen2_1_5b"):
        cfg = to_config(compose_train([f"recipe={preset}"]))
        assert cfg.algo.name == "tspmo" and cfg.task.name == "multiply" and cfg.max_steps > 0


def test_replay_prefix_is_the_child_of_the_largest_non_leaf_advantage():
    ids, mask = _padded([GROUP])
    # |A| = 2/3, 1/3 and 1/4 lead to whole completions (leaves); the only non-leaf is [1] -> 2 (A = -1/12).
    assert replay_prefixes(ids[:4], mask[:4], REWARDS, group_size=4) == [[1, 2]]
    # Second case: group 1 branches at [1] with A = ±1/2 (first of equals wins); group 2 is identical
    # completions, no branch -> the empty prefix (fresh samples).
    ids, mask = _padded([[[1, 2, 3], [1, 4, 5]], [[9, 9], [9, 9]]])
    assert replay_prefixes(ids, mask, [1.0, 0.0, 1.0, 1.0], group_size=2) == [[1, 2], []]


@pytest.fixture(scope="module")
def tiny_lora():
    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # LoRA B starts at zero; perturb it so the adapter matters for the gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok


def test_selected_position_loss_matches_full_logits(tiny_lora):
    model, tok = tiny_lora
    torch.manual_seed(0)
    prompt_width = 5
    base = torch.randint(3, len(tok), (1, 7)).repeat(4, 1)  # four completions of one prompt that diverge
    base[1, 3:] = torch.randint(3, len(tok), (4,))
    base[2, 1:] = torch.randint(3, len(tok), (6,))
    base[3, 5:] = torch.randint(3, len(tok), (2,))
    completion_mask = torch.ones_like(base)
    completion_mask[2, 4:] = 0  # a shorter completion
    prompt = torch.randint(3, len(tok), (1, prompt_width)).repeat(4, 1)
    input_ids = torch.cat([prompt, base * completion_mask], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt), completion_mask], dim=1)
    sel = select_prefix_matching(base, completion_mask, [1.0, 0.0, 0.5, 1.0], group_size=4, weighting="visits")
    assert 0 < len(sel) < int(completion_mask.sum())

    def loss_and_grads(logp_fn):
        model.zero_grad()
        logp = logp_fn(model, input_ids, attention_mask, prompt_width, sel)
        loss = clipped_pg_loss(logp, None, None, sel.advantages).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast_loss, fast_grads = loss_and_grads(selected_logprobs)
    full_loss, full_grads = loss_and_grads(full_logits_logprobs)
    assert fast_loss == pytest.approx(full_loss, abs=1e-6)
    assert any(g.abs().sum() > 0 for g in fast_grads.values())
    for name in full_grads:
        assert torch.allclose(fast_grads[name], full_grads[name], atol=1e-6), name


def test_replay_rollout_grows_each_group_from_its_prefix(tiny_lora):
    model, tok = tiny_lora
    torch.manual_seed(0)
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([[pad, 11, 12], [pad, 11, 12], [21, 22, 23], [21, 22, 23]])
    prompt_mask = (torch.arange(3) > 0).long().expand(4, 3).clone()
    prompt_mask[2:] = 1
    completion_ids = torch.tensor([[31, 32, 33, 34], [31, 40, 41, 42], [50, 51, 52, 53], [50, 51, 52, 53]])
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, torch.ones_like(completion_ids),
                      ["a", "b", "c", "c"], group_size=2)
    out = replay_rollout(model, tok, rollout, [1.0, 0.0, 1.0, 1.0], GenerationConfig(max_new_tokens=4), 3)
    assert out.group_size == 5 and out.completion_ids.shape[0] == 10
    assert torch.equal(out.completion_ids[:2, :4], completion_ids[:2]) and out.texts[:2] == ["a", "b"]
    assert torch.equal(out.completion_ids[5:7, :4], completion_ids[2:4])
    for row in range(2, 5):  # group 1 replays from its decisive prefix [31, 32] (A = +1/2, not a leaf)
        assert out.completion_ids[row, :2].tolist() == [31, 32]
        assert torch.equal(out.prompt_ids[row], prompt_ids[0])
    for row in range(7, 10):  # group 2 had no branch: fresh samples after its own prompt
        assert torch.equal(out.prompt_ids[row], prompt_ids[2])
    assert int(out.completion_mask.sum(dim=1).max()) <= 4  # the original token budget holds


def test_tiny_run_then_exact_resume(tmp_path):
    from frugal.recipes.train import run

    args = TINY + ["algo=tspmo", "algo.replay_samples=2", "max_steps=4", "save_every=2",
                   "keep_checkpoints=2", "eval_before=false"]
    full = tmp_path / "full"
    summary = run(compose_train(args), run_dir=full)
    rows = [r for r in read_jsonl(full / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and summary["algo"] == "tspmo"
    for r in rows:
        assert 0 < r["tokens/selected_frac"] < 1 and r["loss"] != 0 and r["grad_norm"] > 0

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    run(compose_train(args + [f"resume={resumed / 'checkpoints' / 'step_2'}"]))
    got = {r["step"]: r["loss"] for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r}
    want = {r["step"]: r["loss"] for r in rows}
    assert sorted(got) == [1, 2, 3, 4], "metrics.jsonl must hold each step exactly once"
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-6), f"step {step} differs after resume"

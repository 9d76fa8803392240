"""S-GRPO building blocks against hand-worked examples."""

import math

import pytest
import torch

from frugal.train.advantages import group_advantages
from frugal.train.lora import LoraConfig, apply_lora
from frugal.inference.models import ModelConfig, load_model
from frugal.train.policy_loss import clipped_pg_loss, full_logits_logprobs, selected_logprobs
from frugal.train.token_selection import (Selection, expected_keep_fraction, expected_last_position, select_all,
                                          select_stochastic)


def test_group_advantages_hand_worked():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5, population std 0.5 -> A = +1, -1, -1, +1 (eps aside)
    # group 2: all equal -> zero variance, A = 0, counted
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    out = group_advantages(rewards, group_size=4, eps=0.0)
    assert torch.allclose(out.advantages, torch.tensor([1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0]))
    assert out.zero_variance_groups == 1 and out.num_groups == 2


def test_group_advantages_eps_and_unscaled():
    rewards = torch.tensor([3.0, 1.0])  # mean 2, std 1
    assert torch.allclose(group_advantages(rewards, 2, eps=1.0).advantages, torch.tensor([0.5, -0.5]))
    assert torch.allclose(group_advantages(rewards, 2, scale_by_std=False).advantages, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_select_all_skips_padding_and_zero_advantage_rows():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([0.5, 0.0, -1.0])
    sel = select_all(mask, adv)
    assert sel.rows.tolist() == [0, 0, 2] and sel.positions.tolist() == [0, 1, 0]
    assert sel.advantages.tolist() == [0.5, 0.5, -1.0]


def test_select_stochastic_keeps_early_tokens_and_samples_the_rest():
    n, width, k_early, p_keep = 400, 60, 8, 0.3
    mask = torch.ones(n, width, dtype=torch.long)
    adv = torch.ones(n)
    sel = select_stochastic(mask, adv, k_early, p_keep, generator=torch.Generator().manual_seed(0))
    kept = torch.zeros(n, width)
    kept[sel.rows, sel.positions] = 1
    assert kept[:, :k_early].all(), "the first k_early tokens are always kept"
    late_rate = kept[:, k_early:].mean().item()
    assert abs(late_rate - p_keep) < 0.02  # 400*52 Bernoulli draws: std ~0.003
    expected = expected_keep_fraction(width, k_early, p_keep)
    assert abs(kept.mean().item() - expected) < 0.02
    assert 0.3 <= expected <= 0.5  # the documented default regime


def test_select_stochastic_decay_and_masking():
    mask = torch.ones(2000, 20, dtype=torch.long)
    mask[:, 10:] = 0  # completions end at 10 tokens
    sel = select_stochastic(mask, torch.ones(2000), k_early=2, p_keep=1.0, decay=0.5,
                            generator=torch.Generator().manual_seed(1))
    assert int(sel.positions.max()) < 10
    counts = torch.bincount(sel.positions, minlength=10).float() / 2000
    # position t >= 2 kept with prob 0.5^(t-2)
    for t, expected in [(2, 1.0), (3, 0.5), (4, 0.25), (5, 0.125)]:
        assert abs(counts[t].item() - expected) < 0.04
    # rows with zero advantage are never selected
    adv = torch.ones(2000)
    adv[::2] = 0
    sel = select_stochastic(mask, adv, 2, 0.5, generator=torch.Generator().manual_seed(2))
    assert (sel.rows % 2 == 1).all()


def test_clipped_loss_hand_worked():
    # Two tokens: logp = log 0.5 and log 0.25; old = log 0.25 for both -> ratios 2 and 1.
    logp = torch.log(torch.tensor([0.5, 0.25]))
    old = torch.log(torch.tensor([0.25, 0.25]))
    adv = torch.tensor([1.0, -2.0])
    out = clipped_pg_loss(logp, old, None, adv, clip_low=0.2, clip_high=0.2)
    # token 1: min(2*1, 1.2*1) = 1.2 ; token 2: min(1*-2, 1*-2) = -2 ; loss = -(1.2 - 2)/2 = 0.4
    assert out.loss.item() == pytest.approx(0.4)
    assert out.clip_fraction == pytest.approx(0.5)
    # First pass (old = current): the gradient is -A/K * dlogp.
    lp = logp.clone().requires_grad_(True)
    clipped_pg_loss(lp, None, None, adv).loss.backward()
    assert torch.allclose(lp.grad, -adv / 2)


def test_truncated_importance_weights_hand_worked():
    """vLLM's log-probs as the behaviour policy: each token's term is weighted by min(pi_old / mu, cap),
    a constant (no gradient through it); the mean |log pi_old - log mu| is reported."""
    logp = torch.log(torch.tensor([0.5, 0.25, 0.2])).requires_grad_(True)
    mu = torch.log(torch.tensor([0.25, 0.5, 0.01]))  # weights 2, 0.5, 20 -> capped at 3
    adv = torch.tensor([1.0, -1.0, 2.0])
    out = clipped_pg_loss(logp, None, None, adv, behaviour_logp=mu, is_cap=3.0)
    # r = 1 everywhere (first pass): loss = -(2*1 + 0.5*-1 + 3*2)/3
    assert out.loss.item() == pytest.approx(-(2 - 0.5 + 6) / 3)
    assert out.is_weight == pytest.approx((2 + 0.5 + 3) / 3)
    assert out.logprob_gap == pytest.approx(math.log(2) + math.log(2) + math.log(20), rel=1e-5)
    out.loss.backward()
    assert torch.allclose(logp.grad, -torch.tensor([2.0, -0.5, 6.0]) / 3)
    # Identical behaviour and policy: the plain loss.
    same = clipped_pg_loss(logp.detach(), None, None, adv, behaviour_logp=logp.detach(), is_cap=3.0)
    assert same.loss.item() == pytest.approx(clipped_pg_loss(logp.detach(), None, None, adv).loss.item())
    assert same.logprob_gap == 0 and same.is_weight == 1


def test_kl_term_k3_estimator():
    logp = torch.log(torch.tensor([0.5]))
    ref = torch.log(torch.tensor([0.25]))
    out = clipped_pg_loss(logp, None, ref, torch.tensor([0.0]), beta=0.1)
    d = math.log(0.25) - math.log(0.5)
    assert out.loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1))


@pytest.fixture(scope="module")
def tiny_lora():
    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    # LoRA B starts at zero; perturb it so the adapter matters for the gradient check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok


def test_selected_position_head_matches_full_logits(tiny_lora):
    model, tok = tiny_lora
    torch.manual_seed(0)
    prompt_width, comp = 6, 9
    input_ids = torch.randint(3, len(tok), (3, prompt_width + comp))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding on one row
    attention_mask[2, prompt_width + 5:] = 0  # a shorter completion
    sel = Selection(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 4, 7, 1, 3]), torch.tensor([1.0, 1.0, -0.5, 2.0, 2.0]))

    model.zero_grad()
    fast = selected_logprobs(model, input_ids, attention_mask, prompt_width, sel)
    (fast * sel.advantages).sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    slow = full_logits_logprobs(model, input_ids, attention_mask, prompt_width, sel)
    (slow * sel.advantages).sum().backward()
    slow_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert torch.allclose(fast, slow, atol=1e-5)
    for name in fast_grads:
        # float32 noise only: the cropped batch runs matmuls of other shapes
        err = (fast_grads[name] - slow_grads[name]).abs().max()
        assert err <= 1e-4 * slow_grads[name].abs().max() + 1e-7, name


def test_expected_last_position_hand_worked():
    # p = [1, .5, .5]: last = 2 w.p. .5, last = 1 w.p. .5·.5, last = 0 w.p. 1·.5·.5 -> E = .25 + 2·.5 = 1.25
    assert expected_last_position(3, k_early=1, p_keep=0.5) == pytest.approx(1.25)
    assert expected_last_position(10, k_early=10, p_keep=0.0) == pytest.approx(9.0)  # only the first 10
    # p = 1, 1/2, 1/4, 1/8, 1/16: P(last = j) = p(j) · Π_{t>j} (1 − p(t))
    p = [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16]
    by_hand = sum(j * p[j] * math.prod(1 - q for q in p[j + 1:]) for j in range(5))
    assert expected_last_position(5, k_early=0, p_keep=1.0, decay=0.5) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(1.3193359375)
    assert math.isnan(expected_last_position(4, k_early=0, p_keep=0.0))  # nothing is ever kept


@pytest.mark.parametrize("k_early,p_keep,decay", [(8, 0.3, 1.0), (4, 0.6, 0.95), (16, 0.5, 0.9)])
def test_selected_fraction_and_last_position_follow_the_schedule(k_early, p_keep, decay):
    """Over many rows of mixed lengths, the share of tokens in the loss and the mean position of each row's
    last selected token match the schedule's expectations (expected_keep_fraction, expected_last_position)."""
    n, width = 3000, 128
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(16, width + 1, (n,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    sel = select_stochastic(mask, torch.ones(n), k_early, p_keep, decay, generator=gen)
    expected_kept = sum(expected_keep_fraction(int(L), k_early, p_keep, decay) * int(L) for L in lengths)
    assert len(sel) / float(lengths.sum()) == pytest.approx(expected_kept / float(lengths.sum()), rel=0.03)
    last = torch.full((n,), -1).scatter_reduce(0, sel.rows, sel.positions, reduce="amax")
    assert (last >= 0).all() and (last < lengths).all()
    expected_last = sum(expected_last_position(int(L), k_early, p_keep, decay) for L in lengths) / n
    assert last.float().mean().item() == pytest.approx(expected_last, rel=0.03)
    if decay < 1:  # a decayed schedule stops early: that is what lets the update crop long completions
        assert expected_last_position(256, k_early, p_keep, decay) < 0.5 * 255

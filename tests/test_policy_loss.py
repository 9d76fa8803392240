"""The selected-position log-probs of train/policy_loss.py: prompts shared through one KV cache and rows
bucketed by length give the full-logits values and gradients exactly."""

import pytest
import torch

from conftest import tiny_lora
from frugal.inference import decoding
from frugal.train import policy_loss
from frugal.train.policy_loss import full_logits_logprobs, length_buckets, selected_logprobs
from frugal.train.token_selection import Selection


@pytest.mark.parametrize("bucket_overhead", [1000, 0])  # one padded batch; rows split by length
def test_shared_prompt_update_matches_full_logits_and_gradients(bucket_overhead, monkeypatch):
    model, tok = tiny_lora()
    torch.manual_seed(0)
    P, C, G = 6, 9, 3
    prompts = torch.randint(3, len(tok), (2, P))
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :2] = 0  # a left-padded prompt
    completions = torch.randint(3, len(tok), (2 * G, C))
    completion_mask = torch.ones_like(completions)
    completion_mask[2, 5:] = 0
    completion_mask[4, 3:] = 0
    ids = torch.cat([prompts.repeat_interleave(G, 0), completions], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], dim=1)
    sel = Selection(torch.tensor([0, 0, 1, 2, 2, 3, 4, 5, 5]), torch.tensor([0, 4, 7, 1, 3, 8, 2, 0, 6]),
                    torch.tensor([1.0, 1.0, -0.5, 2.0, 2.0, 0.3, -1.0, 0.7, 0.7]))
    monkeypatch.setattr(policy_loss, "BUCKET_OVERHEAD", bucket_overhead)
    row_last = [P - 1 + max(p for r, p in zip(sel.rows.tolist(), sel.positions.tolist()) if r == row) for row in range(6)]
    assert len(length_buckets(row_last)) == (1 if bucket_overhead else 6)  # 6 distinct lengths

    prefills = []  # the shared-prompt KV helper runs the two distinct prompts once, all but their last token
    real = decoding.PromptKV.prefill.__func__
    monkeypatch.setattr(decoding.PromptKV, "prefill",
                        classmethod(lambda cls, module, i, m, **kw: prefills.append(tuple(i.shape)) or
                                    real(cls, module, i, m, **kw)))

    def logp_and_grads(fn):
        model.zero_grad()
        logp = fn(model, ids, mask, P, sel)
        (logp * sel.advantages).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast, fast_grads = logp_and_grads(selected_logprobs)
    assert prefills == [(2, P - 1)]
    slow, slow_grads = logp_and_grads(full_logits_logprobs)
    assert torch.allclose(fast, slow, atol=1e-5)
    for name, grad in slow_grads.items():
        assert (fast_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name


def test_length_buckets_minimise_padded_columns():
    # lengths 2,2,3,9,10: one batch computes 5·11 = 55 columns; {2,2,3} + {9,10} computes 3·4 + 2·11 = 34
    assert length_buckets([9, 2, 10, 3, 2], per_call_overhead=5) == [[1, 4, 3], [0, 2]]  # 34 + 10 < 55 + 5
    assert length_buckets([9, 2, 10, 3, 2], per_call_overhead=30) == [[1, 4, 3, 0, 2]]  # 55 + 30 < 34 + 60
    assert length_buckets([], per_call_overhead=5) == []


@pytest.mark.parametrize("share_prompts", [True, False])  # one process / DDP; the FSDP path (PolicyLogprobs)
def test_cropping_at_the_last_selected_token_matches_the_uncropped_loss(share_prompts, monkeypatch):
    """A decayed S-GRPO schedule keeps early tokens, so each row's last selected token comes well before its
    end. The update runs each row only up to that token: the same loss and LoRA gradients as the uncropped
    full-logits computation, the decoder never sees a later column, and the tokens after it (changed at
    random here) affect nothing, so no activation of theirs is computed or kept."""
    from frugal.train.policy_loss import PolicyLogprobs, clipped_pg_loss
    from frugal.train.token_selection import select_stochastic

    model, tok = tiny_lora()
    torch.manual_seed(1)
    P, C, G = 5, 24, 4
    prompts = torch.randint(3, len(tok), (2, P)).repeat_interleave(G, 0)
    completions = torch.randint(3, len(tok), (2 * G, C))
    ids = torch.cat([prompts, completions], dim=1)
    mask = torch.ones_like(ids)
    mask[G:, 0] = 0  # the second prompt is left-padded
    completion_mask = torch.ones_like(completions)
    completion_mask[1, 15:] = 0  # a completion that ended early
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0, -1.0, 1.0])  # row 5: zero advantage, no tokens
    sel = select_stochastic(completion_mask, advantages, k_early=2, p_keep=0.6, decay=0.7,
                            generator=torch.Generator().manual_seed(0))
    last = torch.full((2 * G,), -1).scatter_reduce(0, sel.rows, sel.positions, reduce="amax")
    assert last[5] == -1 and (last[advantages != 0] >= 1).all()
    assert int(last.max()) < C // 2, "the decayed schedule stops early: most of each row is cropped"
    monkeypatch.setattr(policy_loss, "BUCKET_OVERHEAD", 0)  # each distinct length runs as its own call

    widths = []  # the columns each decoder call covers (its attention mask: cached prompt + what runs)
    decoder = model.get_base_model().get_decoder()
    real_forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: widths.append(kw["attention_mask"].shape[1]) or
                        real_forward(*a, **kw))

    def loss_and_grads(fn, input_ids):
        model.zero_grad()
        logp = fn(input_ids)
        out = clipped_pg_loss(logp, None, None, sel.advantages, normalizer=len(sel))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    module = PolicyLogprobs(model) if not share_prompts else model
    cropped = lambda i: selected_logprobs(module, i, mask, P, sel, share_prompts=share_prompts)  # noqa: E731
    loss, grads = loss_and_grads(cropped, ids)
    needed = {P + int(p) for p in last[last >= 0]}  # a row's last selected token sits at column P + p
    assert set(widths) - {P - 1} == needed, "each call ends at its rows' last selected token"
    assert max(widths) == P + int(last.max())
    widths.clear()
    ref_loss, ref_grads = loss_and_grads(lambda i: full_logits_logprobs(model, i, mask, P, sel), ids)
    assert max(widths) == P + C  # the reference runs every column
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for name, grad in ref_grads.items():
        assert (grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name

    # Tokens after each row's last selected one (and every token of the unselected row) change nothing.
    scrambled = ids.clone()
    for row in range(2 * G):
        start = P + int(last[row]) + 1
        scrambled[row, start:] = torch.randint(3, len(tok), (P + C - start,))
    loss2, grads2 = loss_and_grads(cropped, scrambled)
    assert torch.equal(loss2, loss)
    for name, grad in grads.items():
        assert torch.equal(grads2[name], grad), name

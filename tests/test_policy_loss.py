"""The selected-position log-probs of train/policy_loss.py: prompts shared through one KV cache and rows
bucketed by length give the full-logits values and gradients exactly."""

import pytest
import torch

from conftest import tiny_lora
from frugal.train import decoding, policy_loss
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

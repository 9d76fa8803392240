"""PRM scoring with the prompt's KV cache shared by all solutions of a prompt (train.prm.PRM.score):
scores equal the full-sequence path, token and attention counts match a hand count, and the evaluator's
CountingPRM / FLOPs use them. On builtin:tiny-random (fast)."""

import pytest
import torch

from frugal.inference.engine import Candidate, Counts
from frugal.evaluator.prm_counts import CountingPRM
from frugal.evaluator.flops import prm_shape
from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRMConfig, build_prm
from frugal.train.prm_steps import PROMPT_SUFFIX

TINY = ModelConfig(name_or_path="builtin:tiny-random", dtype="float32")
CHAT = [{"role": "user", "content": "What is 3 + 4 - 2?"}]
PROMPTS = [CHAT, CHAT, CHAT, "What is 12 - 5 + 1?", "What is 12 - 5 + 1?", CHAT, "x"]
STEPS = [["3 + 4 = 7", "7 - 2 = 5"], ["3 + 4 = 8", "8 - 2 = 6", "The answer is 6"], [], ["12 - 5 = 7"],
         ["12 - 5 = 7", "7 + 1 = 8", "so 8"], ["seven"], ["y"]]


@pytest.fixture(scope="module")
def prm():
    torch.manual_seed(0)
    # small score_batch_tokens: several forward batches, so a prompt's KV is reused across batches too
    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig(score_batch_tokens=64))
    torch.nn.init.normal_(prm.head.weight, std=0.5)  # a non-trivial head: scores differ per step
    for name, p in prm.model.named_parameters():  # non-zero LoRA B: the adapter changes the states
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return prm


def test_shared_prompt_scores_equal_full_sequences(prm):
    full = prm.score(PROMPTS, STEPS, share_prompt=False)
    shared = prm.score(PROMPTS, STEPS)
    assert [len(s) for s in shared] == [len(s) for s in STEPS]
    assert shared[2] == []
    for a, b in zip(full, shared):
        assert a == pytest.approx(b, abs=1e-5)
    # scores differ between steps and solutions (the comparison is not between constants)
    assert len({round(x, 4) for row in full for x in row}) > 5


def test_shared_prompt_token_counts_by_hand(prm):
    tok = prm.tokenizer
    prompt_len = {p: len(tok(p + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
                  for p in ("What is 3 + 4 - 2?", "What is 12 - 5 + 1?", "x")}
    lengths = [len(prm.encode(p, s).ids) for p, s in zip(PROMPTS, STEPS) if s]
    heads = [prompt_len[p if isinstance(p, str) else p[0]["content"]] for p, s in zip(PROMPTS, STEPS) if s]

    prm.score(PROMPTS, STEPS, share_prompt=False)
    assert prm.last_tokens == sum(lengths)  # every full sequence (the empty solution is not run)
    assert prm.last_attention == sum(n * (n + 1) // 2 for n in lengths)

    before = prm.tokens_scored
    prm.score(PROMPTS, STEPS)
    tails = [n - h for n, h in zip(lengths, heads)]
    # each of the 3 distinct prompts once, then every solution's step tokens over its prompt's cache
    assert prm.last_tokens == sum(prompt_len.values()) + sum(tails)
    assert prm.last_attention == (sum(p * (p + 1) // 2 for p in prompt_len.values())
                                  + sum(t * h + t * (t + 1) // 2 for t, h in zip(tails, heads)))
    assert prm.tokens_scored - before == prm.last_tokens
    assert prm.last_tokens < sum(lengths)  # 6 solutions over 3 prompts: 3 prompt prefills saved


def test_counting_prm_charges_what_the_prm_ran(prm):
    problems = [{"prompt": CHAT}, {"prompt": [{"role": "user", "content": "What is 12 - 5 + 1?"}]}]
    cands = [Candidate(0, "3 + 4 = 7\n\n7 - 2 = 5"), Candidate(0, "3 + 4 = 7\n\n7 - 2"), Candidate(1, "12 - 5 = 7\n\n")]
    counting = CountingPRM(prm)
    counting.score_candidates(problems, cands)
    assert counting.counts.prefill == prm.last_tokens and counting.counts.attention == prm.last_attention
    assert counting.counts.calls == 1 and all(c.scores for c in cands)
    # FLOPs of the shared call are below those of the same call on full sequences
    shape = prm_shape(prm)
    shared_flops = shape.flops(counting.counts)
    prm.score([problems[c.problem]["prompt"] for c in cands], [c.steps() for c in cands], share_prompt=False)
    assert shape.flops(Counts(prefill=prm.last_tokens, attention=prm.last_attention)) > shared_flops
    # the PRM never applies an LM head: no head term, only decoder blocks + LoRA + scoring head
    assert shape.head == 0

"""The PRM's log-probability features (``prm.logprob_features``): the backbone's own log-probability of
each step's tokens, read through its LM head, next to the hidden state at the separator. Checked against
a hand-worked example and against a plain forward pass of the model; on builtin:tiny-random."""

import pytest
import torch

from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRMConfig, build_prm, load_prm
from frugal.train.prm_steps import collate

TINY = ModelConfig(name_or_path="builtin:tiny-random", dtype="float32")


@pytest.fixture(scope="module")
def lp_prm():
    torch.manual_seed(0)
    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig(logprob_features=True))
    torch.nn.init.normal_(prm.head.weight, std=0.5)
    with torch.no_grad():
        prm.evidence.weight.copy_(torch.tensor([[0.7, 0.3]]))
    return prm


def test_features_by_hand(lp_prm):
    """Two rows: row 0 has steps at tokens 2-3 (separator 4) and 5-6 (separator 7); row 1 one step at
    tokens 1-2 (separator 3); separators are one token here (tiny-random's "\\n\\n")."""
    assert lp_prm.separator_length == 1
    logp = torch.tensor([[0.0, 0.0, -0.5, -2.0, -9.0, -0.1, -0.3, -8.0],
                         [0.0, -1.5, -0.2, -7.0, 0.0, 0.0, 0.0, 0.0]])
    rows, starts, positions = torch.tensor([0, 0, 1]), torch.tensor([2, 5, 1]), torch.tensor([4, 7, 3])
    features = lp_prm._logprob_features(logp, rows, starts, positions)
    # step minimum (separator excluded), then the minimum over the row's steps so far
    assert torch.allclose(features, torch.tensor([[-2.0, -2.0], [-0.3, -2.0], [-1.5, -1.5]]))


def test_token_logprobs_match_a_plain_forward(lp_prm):
    prm = lp_prm
    encoded = [prm.encode("What is 2 + 3?", ["2 + 3 = 5", "The answer is 5."]), prm.encode("Hi", ["a"])]
    batch = collate(encoded, prm.tokenizer.pad_token_id)
    prm.eval()
    with torch.no_grad():
        _, token_logprobs = prm.step_logits(**batch, return_token_logprobs=True)
        logits = prm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = torch.log_softmax(logits.float(), -1)
    for r, enc in enumerate(encoded):
        for t in range(len(enc.ids)):
            expected = reference[r, t - 1, enc.ids[t]].item() if t >= enc.start else 0.0
            assert token_logprobs[r, t].item() == pytest.approx(expected, abs=1e-4), (r, t)


def test_prompt_sharing_and_reload_give_the_same_scores(lp_prm, tmp_path):
    prm = lp_prm
    prompts = ["What is 2 + 3?", "What is 2 + 3?", "What is 7 - 1?"]
    steps = [["2 + 3 = 5", "The answer is 5."], ["2 + 3 = 6"], ["7 - 1 = 6", "The answer is 6."]]
    shared = prm.score(prompts, steps)
    full = prm.score(prompts, steps, share_prompt=False)
    for a, b in zip(shared, full):
        assert a == pytest.approx(b, abs=1e-5)
    assert prm.last_lm_tokens > 0
    without = prm.evidence.weight.detach().clone()
    with torch.no_grad():
        prm.evidence.weight.zero_()
    assert prm.score(prompts, steps, share_prompt=False) != full  # the features change the scores
    with torch.no_grad():
        prm.evidence.weight.copy_(without)
    reloaded = load_prm(prm.save(tmp_path / "prm"))
    assert reloaded.evidence is not None
    for a, b in zip(reloaded.score(prompts, steps), shared):
        assert a == pytest.approx(b, abs=1e-5)


def test_a_head_without_feature_weights_is_refused(lp_prm, tmp_path):
    plain = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig())
    plain.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="logprob_features"):
        lp_prm.load_head(tmp_path / "head.safetensors")


def test_the_lm_head_is_charged_for_every_step_token(lp_prm):
    from frugal.inference.engine import Candidate
    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.evaluator.flops import prm_shape

    problems = [{"prompt": "What is 2 + 3?"}, {"prompt": "What is 7 - 1?"}]
    cands = [Candidate(0, "2 + 3 = 5\n\nThe answer is 5."), Candidate(0, "2 + 3 = 6\n\n"), Candidate(1, "7 - 1 = 6")]
    counting = CountingPRM(lp_prm)
    counting.score_candidates(problems, cands)
    # every token of every step, its separator included (shared prompts are not step tokens)
    by_hand = sum(len(lp_prm.encode(problems[c.problem]["prompt"], c.steps()).ids)
                  - lp_prm.encode(problems[c.problem]["prompt"], c.steps()).start for c in cands)
    assert counting.counts.scored == lp_prm.last_lm_tokens == by_hand
    shape = prm_shape(lp_prm)
    assert shape.head == lp_prm.model.get_output_embeddings().weight.numel()


def test_candidate_vocabulary_softmax_by_hand_save_and_charge(tmp_path):
    """``logprob_vocab: train``: log p̃(x_t) = z_{x_t} − log Σ_{v ∈ V' ∪ {x_t}} exp z_v, checked against the
    plain forward's logits, with one step token deliberately left out of V' (it joins its own sum)."""
    from frugal.evaluator.flops import prm_shape

    torch.manual_seed(1)
    prm = build_prm(TINY, LoraConfig(r=4, alpha=8), PRMConfig(logprob_features=True))
    with torch.no_grad():
        prm.evidence.weight.copy_(torch.tensor([[0.7, 0.3]]))
    enc = prm.encode("What is 2 + 3?", ["2 + 3 = 5", "The answer is 5."])
    step_tokens = enc.ids[enc.start:]
    left_out = step_tokens[2]
    prm.set_candidate_vocab([i for i in enc.ids if i != left_out] + [7, 7, 11])
    vocab = prm.candidate_ids.tolist()
    assert vocab == sorted(set(vocab)) and left_out not in vocab
    batch = collate([enc], prm.tokenizer.pad_token_id)
    prm.eval()
    with torch.no_grad():
        _, token_logprobs = prm.step_logits(**batch, return_token_logprobs=True)
        logits = prm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0].float()
    for t in range(enc.start, len(enc.ids)):
        x = enc.ids[t]
        z = logits[t - 1]
        expected = z[x] - torch.logsumexp(z[sorted(set(vocab) | {x})], dim=0)
        assert token_logprobs[0, t].item() == pytest.approx(expected.item(), abs=1e-4), t
        if x == left_out:  # without the extra column its log-probability would be undefined
            assert token_logprobs[0, t].item() < 0
    # Saved with the head; the reloaded PRM scores the same; the evaluator charges |V'| + 1 head rows.
    scores = prm.score(["What is 2 + 3?"], [["2 + 3 = 5", "The answer is 5."]])
    reloaded = load_prm(prm.save(tmp_path / "prm"))
    assert reloaded.candidate_ids.tolist() == vocab
    assert reloaded.score(["What is 2 + 3?"], [["2 + 3 = 5", "The answer is 5."]])[0] == pytest.approx(scores[0], abs=1e-5)
    hidden = prm.model.get_output_embeddings().weight.shape[1]
    assert prm_shape(reloaded).head == (len(vocab) + 1) * hidden


def test_prm_config_refuses_an_unknown_logprob_vocab():
    with pytest.raises(ValueError, match="prm.logprob_vocab"):
        PRMConfig(logprob_vocab="tiny")

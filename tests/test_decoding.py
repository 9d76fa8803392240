"""The decoding core (inference/decoding.py): ``decode`` matches ``model.generate`` while finished rows leave
the batch, the shared-prompt KV helper is exact, and every sampler of the project (training rollouts,
held-out evaluation, T-SPMO replay, Monte-Carlo labelling, the evaluator's Engine) goes through it."""

import pytest
import torch
from transformers import LogitsProcessorList, TopKLogitsWarper

from conftest import tiny_lora
from frugal.inference import decoding
from frugal.inference.decoding import PromptKV, StreamSampling, TorchSampling, decode, left_pad
from frugal.train.rollout import GenerationConfig, encode_prompts, generate

PROMPTS = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Hi", "Say a word.", "2 * 8?")]


@pytest.fixture(scope="module")
def varied():
    """A tiny model whose (greedy and sampled) outputs vary from row to row and step to step."""
    model, tok = tiny_lora(scale=1.0)
    model.eval()
    return model, tok


@pytest.mark.parametrize("sample", [False, True])
def test_decode_drops_finished_rows_and_matches_generate(sample, varied):
    """Rows that hit EOS leave ``decode``'s batch early; the tokens (and, sampling, the random draws) are
    still exactly those of ``model.generate``."""
    model, tok = varied
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    kwargs = dict(do_sample=True, top_k=2, temperature=1.0, top_p=1.0) if sample else dict(do_sample=False)
    torch.manual_seed(3)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                          eos_token_id=None, **kwargs)[:, ids.shape[1]:]

    def first_positions(token):
        return [row.index(token) if token in row else 12 for row in free.tolist()]

    # EOS := the token whose first appearance differs most across rows, so rows finish at different steps
    eos = [max(sorted(set(free.flatten().tolist())), key=lambda t: len(set(first_positions(t))))]
    torch.manual_seed(3)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                         eos_token_id=eos, **kwargs)[:, ids.shape[1]:]
    torch.manual_seed(3)
    sampler = TorchSampling(LogitsProcessorList([TopKLogitsWarper(2)]), tok.pad_token_id) if sample else None
    with torch.inference_mode():
        out, lengths = decode(model, ids, mask, None, 12, eos, tok.pad_token_id, sampler)
    assert lengths.tolist() == [min(p + 1, 12) for p in first_positions(eos[0])]
    assert len(set(lengths.tolist())) >= 2  # rows really left the batch at different steps
    for row in range(len(PROMPTS)):
        n = int(lengths[row])
        assert out[row, :n].tolist() == ref[row, :n].tolist()
        assert (n == 12) or int(ref[row, n - 1]) in eos


def test_decode_per_row_limits_and_stream_sampling_ignore_the_batch(varied):
    """Row r stops after ``limits[r]`` tokens; with per-row streams a row's tokens are the same alone or
    in a batch, and greedy rows over a shared prompt cache equal rows decoded on their own."""
    model, tok = varied
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    sampler = StreamSampling(keys=[11, 12, 13, 14], starts=[0, 0, 0, 0])
    with torch.inference_mode():
        out, lengths = decode(model, ids, mask, None, 9, [], tok.pad_token_id, sampler, limits=[9, 3, 6, 1])
        assert lengths.tolist() == [9, 3, 6, 1]
        for r in range(len(PROMPTS)):
            row_ids, row_mask = encode_prompts(tok, PROMPTS[r:r + 1], "cpu")
            alone, n = decode(model, row_ids, row_mask, None, 9, [], tok.pad_token_id,
                              StreamSampling([11 + r], [0]))
            assert alone[0, :int(lengths[r])].tolist() == out[r, :int(lengths[r])].tolist()


def test_prompt_kv_rows_split_stack_and_prefix_equal_a_direct_prefill(varied):
    """The shared-prompt KV helper: rows gathered from one prefill, prompts stored one by one and stacked
    back, and prompts prefilled over a shared prefix all hold the KV of prefilling each prompt alone."""
    model, tok = varied
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 20], [5, 6, 7, 30, 31, 32]]
    with torch.inference_mode():
        alone = [PromptKV.prefill(model, *left_pad([p], 0, "cpu"))[0].split()[0] for p in prompts]
        together, _ = PromptKV.prefill(model, *left_pad(prompts, 0, "cpu"))
        prefix = PromptKV.prefill(model, *left_pad([prompts[0][:3]], 0, "cpu"))[0].split()[0]
        over_prefix, _ = PromptKV.prefill(model, *left_pad([p[3:] for p in prompts], 0, "cpu"), prefix=prefix)
        for parts in (together.split(), over_prefix.split()):
            for got, want in zip(parts, alone):
                for (k, v), (k0, v0) in zip(got, want):
                    assert k.shape == k0.shape and torch.allclose(k, k0, atol=1e-5) and torch.allclose(v, v0, atol=1e-5)
        stacked = PromptKV.stack([alone[2], None, alone[0]])
        assert stacked.mask.tolist() == [[1] * 6, [0] * 6, [0, 1, 1, 1, 1, 1]]
        cache = stacked.rows(torch.tensor([2, 0, 0]))
        assert cache.get_seq_length() == 6
        assert torch.equal(cache.layers[0].keys[1], cache.layers[0].keys[2])
        assert torch.equal(cache.layers[0].keys[0, :, 1:], alone[0][0][0][0])


def test_every_sampler_goes_through_the_one_core(monkeypatch):
    """Training rollouts, greedy held-out evaluation, T-SPMO replay, Monte-Carlo labelling and the
    evaluator's Engine all decode with ``decoding.decode``; the sampler, the engine, the policy loss and
    the PRM all share prompts through ``decoding.PromptKV``."""
    from frugal.inference.engine import Candidate, Engine
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.recipes.label_prm import HFPolicy
    from frugal.train.evaluation import greedy_accuracy
    from frugal.train.lora import LoraConfig
    from frugal.inference.models import ModelConfig
    from frugal.train.policy_loss import selected_logprobs
    from frugal.train.prm import PRMConfig, build_prm
    from frugal.train.token_selection import Selection
    from frugal.train.tspmo import replay_rollout

    model, tok = tiny_lora()
    calls = []
    real_decode, real_prefill = decoding.decode, PromptKV.prefill.__func__
    monkeypatch.setattr(decoding, "decode", lambda *a, **kw: calls.append("decode") or real_decode(*a, **kw))
    monkeypatch.setattr(PromptKV, "prefill",
                        classmethod(lambda cls, *a, **kw: calls.append("prefill") or real_prefill(cls, *a, **kw)))

    def uses(fn):
        calls.clear()
        fn()
        return set(calls)

    cfg = GenerationConfig(max_new_tokens=4)
    rollout = generate(model, tok, PROMPTS[:2], cfg, num_samples=2)
    assert uses(lambda: generate(model, tok, PROMPTS[:2], cfg, num_samples=2)) == {"prefill", "decode"}
    rows = [{"id": str(i), "prompt": p, "question": "", "answer": "7"} for i, p in enumerate(PROMPTS[:2])]
    assert uses(lambda: greedy_accuracy(model, tok, rows, cfg, "number")) == {"prefill", "decode"}
    assert "decode" in uses(lambda: replay_rollout(model, tok, rollout, [1.0, 0.0, 0.0, 1.0], cfg, 2))
    policy = HFPolicy(model, tok, cfg)
    assert uses(lambda: policy.sample(PROMPTS[:1], 2)) == {"prefill", "decode"}
    engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=4))
    assert uses(lambda: engine.extend([{"prompt": p} for p in PROMPTS], [Candidate(0), Candidate(1)])) == {
        "prefill", "decode"}
    sel = Selection(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]), torch.ones(3))
    assert uses(lambda: selected_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                          rollout.prompt_ids.shape[1], sel)) == {"prefill"}
    prm = build_prm(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), LoraConfig(), PRMConfig(),
                    torch.device("cpu"))
    assert uses(lambda: prm.score(["q", "q"], [["a"], ["b", "c"]])) == {"prefill"}

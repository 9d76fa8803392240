"""Training rollouts (train/rollout.py): the same completions as ``model.generate`` for a seed, prompts
prefilled once for their G samples, stop strings."""

import torch

from conftest import tiny_lora
from frugal.inference.decoding import eos_token_ids
from frugal.train.rollout import GenerationConfig, encode_prompts, generate


def test_shared_prompt_sampling_draws_the_same_completions_as_num_return_sequences():
    model, tok = tiny_lora()
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Hi", "What is 12 + 9? Show steps.")]
    torch.manual_seed(1)
    shared = generate(model, tok, prompts, GenerationConfig(max_new_tokens=10), num_samples=4)
    ids, mask = encode_prompts(tok, prompts, "cpu")
    torch.manual_seed(1)
    plain = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=4, max_new_tokens=10,
                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos_token_ids(model, tok),
                           pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    m = shared.completion_mask[:, : plain.shape[1]]
    assert torch.equal(shared.completion_ids[:, : plain.shape[1]] * m, plain * m)
    assert torch.equal(shared.prompt_ids, ids.repeat_interleave(4, 0))


def test_generate_stops_a_row_at_a_stop_string():
    model, tok = tiny_lora(scale=1.0)
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}]]
    free = generate(model, tok, prompts, GenerationConfig(max_new_tokens=12), greedy=True)
    ids = free.completion_ids[0, : int(free.completion_mask[0].sum())].tolist()
    stop = tok.decode(ids[3:5])
    assert stop.strip() and stop not in tok.decode(ids[:4])  # first completed by token 5
    cut = generate(model, tok, prompts, GenerationConfig(max_new_tokens=12, stop_strings=[stop]), greedy=True)
    n = int(cut.completion_mask[0].sum())
    assert cut.completion_ids[0, :n].tolist() == ids[:n] and n <= 5 and stop in cut.texts[0]


def test_generate_restores_training_mode_and_the_adapter_weights():
    model, tok = tiny_lora()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generate(model, tok, [[{"role": "user", "content": "Hi"}]], GenerationConfig(max_new_tokens=4), num_samples=2)
    assert model.training
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the LoRA merge undone exactly

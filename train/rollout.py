"""Batched sampling of completions for chat prompts: the training rollouts and greedy held-out evaluation.

:func:`generate` templates chat prompts and samples them in chunks through the decoding core
(``frugal.inference.decoding.sample``: each prompt prefilled once for its G samples, finished rows leaving the
batch, the LoRA adapter merged while sampling); a completion ends at its first EOS (or stop string) and
everything after is masked. With ``generation.backend=vllm`` training samples through
:class:`EngineSampler` over a vLLM engine (``frugal.inference.vllm_engine`` in process, or
``frugal.inference.openai_engine`` fronting ``vllm serve``): the same engine objects the evaluator searches
with.
"""

from __future__ import annotations

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
    backend: str = "hf"  # hf | vllm: who samples the training rollouts (the vllm block configures vLLM)
    vllm_is_cap: float = 2.0  # truncated importance weight cap: min(pi_old / pi_sampler, cap) per token

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
        if self.vllm_is_cap < 1:
            raise ValueError(f"generation.vllm_is_cap must be >= 1, got {self.vllm_is_cap}")


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
    # The HF backend for every caller; with generation.backend=vllm the training loop samples through an
    # EngineSampler instead and evaluation (greedy, small) stays here.
    device = next(model.parameters()).device
    max_new = (cfg.eval_max_new_tokens or cfg.max_new_tokens) if greedy else cfg.max_new_tokens
    chunk_rows = cfg.eval_batch_size if greedy else cfg.batch_size
    prompts_per_chunk = max(1, chunk_rows // num_samples)
    parts = []
    for start in range(0, len(prompts), prompts_per_chunk):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + prompts_per_chunk], device)
        completion, lengths = decoding.sample(model, tokenizer, ids, mask, num_samples, cfg, max_new, greedy)
        parts.append((ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0), completion, lengths))
    prompt_ids = pad_left([p[0] for p in parts], tokenizer.pad_token_id)
    prompt_mask = pad_left([p[1] for p in parts], 0)
    completion_ids = pad_right([p[2] for p in parts], tokenizer.pad_token_id)
    lengths = torch.cat([p[3] for p in parts])
    completion_mask = (torch.arange(completion_ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(completion_ids, completion_mask)
    ]
    return Rollout(prompt_ids, prompt_mask, completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                   completion_mask, texts, num_samples)


def pad_left(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value) for t in tensors])


def pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


def vllm_sampler(model, tokenizer, gen: GenerationConfig, vcfg, model_cfg, lora_r: int, run_dir, seed: int = 0,
                 num_threads: Optional[int] = None, rank: int = 0) -> "EngineSampler":
    """The sampler ``generation.backend=vllm`` asks for: an in-process vLLM engine (``vllm.mode=colocate``) or
    a ``vllm serve`` at ``vllm.server_url`` behind the OpenAI-compatible engine (``vllm.mode=server``), both
    taking the trainer's adapters; adapters go to ``vllm.adapter_dir`` (default ``<run_dir>/vllm_adapters``)."""
    import uuid
    from pathlib import Path

    from frugal.inference.vllm_setup import AdapterPublisher, sampler_dtype, weight_sync

    folder = Path(vcfg.adapter_dir) if vcfg.adapter_dir else Path(run_dir) / "vllm_adapters"
    publisher = AdapterPublisher(folder, prefix=f"frugal-{uuid.uuid4().hex[:8]}-r{rank}")
    shared = dict(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                  stop_strings=list(gen.stop_strings))
    eos = eos_token_ids(model, tokenizer)
    if vcfg.mode == "server":
        from frugal.inference.openai_engine import OpenAIEngine, OpenAIEngineConfig

        cfg = OpenAIEngineConfig(base_url=vcfg.server_url.rstrip("/") + "/v1", timeout_s=vcfg.timeout_s, **shared)
        engine = OpenAIEngine(tokenizer, cfg, eos_ids=eos, seed=seed)
        engine.attach_trainer(publisher)
    else:
        from frugal.inference.vllm_engine import VLLMEngine, VLLMEngineConfig

        engine = VLLMEngine.for_training(model, tokenizer, model_cfg, VLLMEngineConfig(**shared), vcfg, lora_r,
                                         publisher, dtype=sampler_dtype(vcfg.dtype, next(model.parameters()).dtype),
                                         full_weights=weight_sync(vcfg.sync) == "full", seed=seed,
                                         num_threads=num_threads)
    return EngineSampler(engine, tokenizer, eos)


class EngineSampler:
    """``generation.backend=vllm``: the training loop's sampler over an engine that takes adapters
    (:class:`frugal.inference.vllm_engine.VLLMEngine` in process, or
    :class:`frugal.inference.openai_engine.OpenAIEngine` fronting ``vllm serve``). Each call hands the engine
    the current policy (so a resumed run samples from the restored policy too), samples G completions per
    chat prompt, and returns a :class:`Rollout` with the engine's per-token log-probs."""

    def __init__(self, engine, tokenizer, eos_ids: list[int]):
        self.engine, self.tokenizer, self.eos_ids = engine, tokenizer, eos_ids

    def close(self) -> None:
        """At the end of a run: the last adapter version is retired from the engine."""
        self.engine.close()

    def prompt_ids(self, prompts: list[list[dict]]) -> list[list[int]]:
        return [list(self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]) for p in prompts]

    @torch.no_grad()
    def __call__(self, model, prompts: list[list[dict]], num_samples: int) -> Rollout:
        self.engine.update(model)
        ids = self.prompt_ids(prompts)
        # The per-request seed comes from torch's generator, which the loop seeds per step: a resumed run
        # draws the samples the uninterrupted run would have drawn.
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        samples = self.engine.sample(ids, num_samples, seed)
        return to_rollout(ids, samples, num_samples, self.tokenizer, self.eos_ids, next(model.parameters()).device)


def to_rollout(prompt_ids: list[list[int]], samples: list[tuple[list[int], list[float]]], num_samples: int,
               tokenizer, eos_ids: list[int], device) -> Rollout:
    """Prompt-major samples (token ids, their log-probs) as a padded :class:`Rollout`; a completion ends at
    its first EOS (vLLM includes the EOS it stopped at), everything after is masked."""
    pad = tokenizer.pad_token_id
    rows = [p for p in prompt_ids for _ in range(num_samples)]
    prompt = pad_left([torch.tensor([p]) for p in rows], pad).to(device)
    prompt_mask = pad_left([torch.ones(1, len(p), dtype=torch.long) for p in rows], 0).to(device)
    completion = pad_right([torch.tensor([t or [pad]]) for t, _ in samples], pad).to(device)
    logp = pad_right([torch.tensor([lp or [0.0]], dtype=torch.float32) for _, lp in samples], 0).to(device)
    lengths = torch.tensor([len(t) for t, _ in samples], device=device)
    within = torch.arange(completion.shape[1], device=device)[None, :] < lengths[:, None]
    mask = completion_mask_from_ids(completion, eos_ids) * within.long()
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, mask)]
    return Rollout(prompt, prompt_mask, completion * mask + pad * (1 - mask), mask, texts, num_samples,
                   behaviour_logprobs=logp * mask)

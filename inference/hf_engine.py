"""``engine.backend=hf``: the policy in this process, run by Frugal's decoding core
(``frugal.inference.decoding.decode``), with prompt-prefix and per-candidate KV reuse.

Each ``extend`` call runs the unfinished candidates in batched calls of the decoding core
(``engine.batch_size`` rows each; :class:`~frugal.inference.engine.EngineCore` orders them so that rows
of one prompt sit side by side); within a call a row leaves the batch as soon as it stops (EOS, a stop
string, the step delimiter, its own token limit). Rows draw from their candidates' random streams
(:class:`~frugal.inference.decoding.StreamSampling`).

Prompt-prefix reuse: every distinct prompt except its last token is prefilled once into a KV cache and
kept (per prompt, until :meth:`HFEngine.clear_cache`; the harness clears it between chunks of problems).
Prompts that begin with the same tokens (the chat template's system prompt, few-shot worked examples)
prefill that shared prefix once and only their own rest over it — the automatic prefix caching of serving
engines — and are charged so (``engine.shared_prefix_min_tokens``).

Per-candidate KV reuse (``engine.kv_cache_tokens`` > 0, the default): a candidate's KV (its prompt's last
token and everything it generated or accepted) is kept across calls in a radix tree of token segments per
prompt (:mod:`frugal.inference.kv_cache`), keyed by the exact ids the engine continues it from
(``Candidate.ids``). Forks share their parent's segments. Each row's cache is [its prompt's KV | the longest
stored prefix of its tail], stacked per row. The rest — the token it ended on last call (generated, never
fed) and anything appended since (text another model wrote) — runs once per distinct tail before decoding
(:meth:`HFEngine._run_tails`: the children of one beam or the duplicates of one particle share it), and
every row then decodes from its whole tail in the store. When a row leaves the decoding batch, the decoding
core hands its KV back (``decode``'s ``on_leave``) and the store keeps it; over ``kv_cache_tokens`` the least
recently used segments are dropped, and tokens prefilled again because of that are counted
(``Counts.reprefill``). With the store off every call encodes each candidate's partial solution again.
``cached`` counts the context tokens rows read from a cache (prompt and store).

Accounting (``Counts``): ``prefill`` — each distinct prompt once (shared by all candidates of that problem,
across calls) plus what each row runs per call; ``decode`` — tokens generated and kept; a generated token is
charged as one processed token (the forward pass that feeds it back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from frugal.inference import decoding
from frugal.inference.decoding import (PromptKV, StreamSampling, cache_kw, eos_token_ids, left_pad, lora_merged,
                                       sampling_warpers, stop_criteria)
from frugal.inference.engine import Candidate, EngineConfig, EngineCore, common_prefix_length
from frugal.inference.kv_cache import KVTree
from frugal.runtime.registry import register


@register("engine")
@dataclass
class HFEngineConfig(EngineConfig):
    """``engine.backend=hf``: the batching and caching Frugal's own decoding does (a server does its own)."""

    backend: str = "hf"
    batch_size: int = 64  # rows per decoding call (bounds memory)
    # Prompts whose token prefix of at least this many tokens is the same (a system prompt, few-shot
    # examples) prefill that prefix once and their own rest over it (0 = off; see `HFEngine._prefill`).
    shared_prefix_min_tokens: int = 32
    # Per-candidate KV kept across calls (inference/kv_cache.py): at most this many tokens over all
    # candidates, least recently used dropped first (their tokens are prefilled again, and counted as
    # `reprefill`). 0 = off: each call encodes each candidate's partial solution again.
    kv_cache_tokens: int = 100_000

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"engine.batch_size must be >= 1, got {self.batch_size}")
        if self.kv_cache_tokens < 0:
            raise ValueError(f"engine.kv_cache_tokens must be >= 0 (0 = off), got {self.kv_cache_tokens}")
        if self.shared_prefix_min_tokens < 0:
            raise ValueError(f"engine.shared_prefix_min_tokens must be >= 0, got {self.shared_prefix_min_tokens}")

    def build(self, model_cfg, device=None, name: str = "policy", seed: int = 0, vllm=None) -> "HFEngine":
        """Load the policy (``model_cfg``) in this process and run it."""
        from frugal.inference.models import load_model

        model, tok = load_model(model_cfg, device)
        return HFEngine(model, tok, self, name=name, seed=seed)


class HFEngine:
    """Batched step-wise generation for one policy model in this process; ``counts`` accumulates its token
    usage. ``seed`` keys the candidates' random streams (the harness sets it to the run's seed)."""

    def __init__(self, model, tokenizer, cfg: Optional[HFEngineConfig] = None, name: str = "policy", seed: int = 0):
        cfg = cfg if cfg is not None else HFEngineConfig()
        if not isinstance(cfg, HFEngineConfig):
            raise TypeError(f"HFEngine takes an HFEngineConfig (engine.backend=hf), got {type(cfg).__name__}")
        self.model, self.tokenizer, self.cfg, self.name, self.seed = model, tokenizer, cfg, name, seed
        self.core = EngineCore(self, tokenizer, cfg, eos_token_ids(model, tokenizer))
        self.counts = self.core.counts
        self.eos_ids = self.core.eos_ids
        self._kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # prompt -> per-layer (K, V)
        self._shared: Optional[tuple[list[int], list]] = None  # (ids, per-layer (K, V)) of a shared prefix
        # the candidates' KV across calls, keyed by (prompt, last prompt token + Candidate ids)
        self._store = KVTree(cfg.kv_cache_tokens) if cfg.kv_cache_tokens else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def extend(self, problems: Sequence[dict], cands: Sequence[Candidate], max_tokens: Optional[int] = None,
               stop_at_step: bool = True, greedy: bool = False) -> list[Candidate]:
        """See :meth:`frugal.inference.engine.Engine.extend`."""
        return self.core.extend(problems, cands, max_tokens, stop_at_step, greedy, self._run_rows,
                                chunk=self.cfg.batch_size)

    def clear_cache(self) -> None:
        """Forget the prompts' KV caches and the candidates' store. The store grows with every new prompt, so
        callers running many problems clear it between chunks (the harness does, per strategy, budget and
        chunk)."""
        self._kv.clear()
        self._shared = None
        if self._store is not None:
            self._store.clear()
        self.core.clear()

    def close(self) -> None:
        self.clear_cache()

    # ------------------------------------------------------------------ internals
    def _prompt_kv(self, prompts: list[str], heads: list[list[int]]) -> PromptKV:
        """Each prompt's KV (all but its last token) from the store, left-padded into one
        :class:`~frugal.inference.decoding.PromptKV`. Prompts not seen since the last
        :meth:`clear_cache` are prefilled (batched) and charged; the others are reused for free — the
        prefix cache of a serving engine."""
        new = [(p, h) for p, h in zip(prompts, heads) if p not in self._kv and h]
        if new:
            self._prefill(new)
        return PromptKV.stack([self._kv[p] if h else None for p, h in zip(prompts, heads)], self.model.config)

    def _prefill(self, new: list[tuple[str, list[int]]]) -> None:
        """Prefill new prompts (``(prompt, head ids)``) into ``self._kv``, batched and charged.

        Shared prefix: when the heads begin with the same ``m >= shared_prefix_min_tokens`` tokens (among
        themselves; a lone head, with the kept ``self._shared`` prefix), those m are run once (batch 1)
        and each prompt runs only its own ``n - m`` tokens over that KV (charged with ``context=m``). The
        part of them that the kept prefix already holds is not run again: its KV is cut to that length
        (the few-shot examples and system prompt that the next problem's prompts share with the last
        ones'), and only the rest of the m is run over it. Causal attention makes a prefix's KV
        independent of what follows it, so the stored KV is the same as a whole-prompt prefill (up to
        float rounding)."""
        heads = [h for _, h in new]
        shortest = min(len(h) for h in heads)
        kept_ids, kept_kv = self._shared if self._shared is not None else ([], None)
        # the common prefix, leaving each prompt a token
        m = min(common_prefix_length(heads if len(heads) > 1 else [kept_ids, heads[0]]), shortest - 1)
        shared_ids, shared_kv = [], None
        if self.cfg.shared_prefix_min_tokens and m >= self.cfg.shared_prefix_min_tokens:
            reuse = min(common_prefix_length([kept_ids, heads[0]]), m) if kept_ids else 0
            shared_ids = heads[0][:m]
            shared_kv = [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in kept_kv] if reuse else None
            if m > reuse:
                ids, mask = left_pad([shared_ids[reuse:]], self.tokenizer.pad_token_id, self.device)
                shared_kv = PromptKV.prefill(self.model, ids, mask, prefix=shared_kv, logits_to_keep=1)[0].split()[0]
                self.counts.add(m - reuse, context=reuse)
            self._shared = (shared_ids, shared_kv)
        m = len(shared_ids)
        ids, mask = left_pad([h[m:] for h in heads], self.tokenizer.pad_token_id, self.device)
        # [shared prefix | left-padded rest] when there is a prefix: positions come from the attention mask
        prompts, _ = PromptKV.prefill(self.model, ids, mask, prefix=shared_kv, logits_to_keep=1)
        for (prompt, head), kv in zip(new, prompts.split()):
            self._kv[prompt] = kv
            self.counts.add(len(head) - m, context=m)

    def _run_rows(self, items: list[tuple[str, list[int]]], max_new: int, stop_at_step: bool, greedy: bool,
                  streams: Sequence[tuple[int, int]], limits: Optional[Sequence[int]] = None):
        """One batched call of the decoding core (``frugal.inference.decoding.decode``) with prompt-prefix reuse
        and, when ``engine.kv_cache_tokens`` > 0, per-candidate KV reuse (:meth:`_layout`): each row
        starts from the KV of its prompt (all but its last token) and of the longest stored prefix of its
        tail, and runs only the rest of its tail. Sampled rows draw from their ``streams`` ((key, tokens
        generated before), :class:`~frugal.inference.decoding.StreamSampling`); row r stops at EOS, a stop
        string, or after ``limits[r]`` tokens (default ``max_new``) and then leaves the batch, handing its
        KV (every token it fed: all but its last generated one) to the store. Returns, per row, its
        generated ids and the context length before them."""
        tok = self.tokenizer
        pad = tok.pad_token_id
        was_training = self.model.training
        self.model.eval()  # before the prompt prefill too (no dropout in evaluation)
        sampler = None if greedy else StreamSampling([k for k, _ in streams], [t for _, t in streams],
                                                     warpers=sampling_warpers(self.cfg))
        stops = self.core.stops(stop_at_step)
        left: dict[int, tuple[int, list]] = {}  # row -> (tokens it generated and fed, KV of what it fed)
        first = None
        try:
            with lora_merged(self.model):
                if self._store is None:
                    cache, ids, mask, rows = self._layout(items, [len(t) - 1 for _, t in items])
                else:  # each distinct tail's new tokens run once (forks share them), then all rows decode
                    first = self._run_tails(items)
                    cache, ids, mask, rows = self._layout(items, [len(t) for _, t in items])

                def keep(which, cache, mask, index):  # decode hands each row's KV back as it leaves
                    for r, i in zip(which.tolist(), index.tolist()):
                        head, matched, fed = rows[r]
                        cols = mask[i].nonzero().squeeze(1)[head + matched:]
                        left[r] = (len(cols) - fed, [(layer.keys[i:i + 1, :, cols], layer.values[i:i + 1, :, cols])
                                                     for layer in cache.layers])

                out, lengths = decoding.decode(self.model, ids, mask, cache, max_new, self.eos_ids, pad, sampler,
                                               stop_criteria(tok, stops), limits,
                                               on_leave=keep if self._store is not None else None,
                                               first_logits=first)
        finally:
            self.model.train(was_training)
        self.counts.calls += 1
        result = []
        for r, ((prompt, tail), n) in enumerate(zip(items, lengths.tolist())):
            head, matched, fed = rows[r]
            if r in left:
                generated, kv = left[r]
                self._store.insert(prompt, list(tail) + out[r, :generated].tolist(), matched, kv)
            result.append((out[r, :n].tolist(), head + len(tail)))
        if self._store is not None:
            self._store.evict()
        return result

    def _run_tails(self, items: Sequence[tuple[str, list[int]]]) -> torch.Tensor:
        """Store on: run the not-yet-stored tokens of each distinct (prompt, tail) once — forks of one
        parent share it, so the token their parent ended on runs once, not once per fork — store their KV,
        and return each row's logits for its next token ([rows, vocab]). Every tail then lies whole in
        the store."""
        distinct = list(dict.fromkeys((p, tuple(t)) for p, t in items))
        where = {key: i for i, key in enumerate(distinct)}
        runs = [(p, list(t)) for p, t in distinct]
        cache, ids, mask, rows = self._layout(runs, [len(t) - 1 for _, t in runs], count_cached=False)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        width = cache.get_seq_length()
        logits = self.model(input_ids=ids[:, width:], attention_mask=mask, use_cache=True, **{cache_kw(): cache},
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, width:], logits_to_keep=1).logits[:, -1]
        for r, ((prompt, tail), (head, matched, _)) in enumerate(zip(runs, rows)):
            cols = mask[r].nonzero().squeeze(1)[head + matched:]
            self._store.insert(prompt, tail, matched,
                               [(layer.keys[r:r + 1, :, cols], layer.values[r:r + 1, :, cols]) for layer in cache.layers])
        return logits[torch.tensor([where[(p, tuple(t))] for p, t in items], device=logits.device)]

    def _layout(self, items: Sequence[tuple[str, list[int]]], limits: Sequence[int], count_cached: bool = True):
        """The batch for rows ``items`` ((templated prompt, tail ids)): a ``DynamicCache`` holding each
        row's cached context, and ``ids`` / ``mask`` whose columns past the cache are the tokens each row
        still has to run (left-padded; middle padding is fine: positions come from the mask). Returns
        (cache or None, ids, mask, per row (prompt tokens cached, tail tokens cached, tail tokens run)) and
        charges what runs (``Counts.add``: prefill after the cached context) and what is read from a
        cache (``cached``). Row r's tail may be served from the store up to ``limits[r]`` tokens (a row
        must run at least one token: the logits come from it).

        Store off: the prompts' KV gathered per row (:meth:`_prompt_kv`) and every tail run whole. Store
        on: each row's KV is [its prompt's | its tail's longest stored prefix] stacked per row
        (:meth:`PromptKV.stack`); the tokens of that prefix cost nothing, and those the store held once
        and evicted are counted as ``reprefill``."""
        dev, pad = self.device, self.tokenizer.pad_token_id
        prompts = list(dict.fromkeys(p for p, _ in items))
        heads = [self.core.prompt_ids(p)[:-1] for p in prompts]
        which = [prompts.index(p) for p, _ in items]
        rows = []
        if self._store is None:
            head_ids, head_mask = left_pad(heads, pad, dev)
            tail_ids, tail_mask = left_pad([t for _, t in items], pad, dev)
            index = torch.tensor(which, device=dev)
            ids = torch.cat([head_ids[index], tail_ids], dim=1)
            mask = torch.cat([head_mask[index], tail_mask], dim=1)
            cache = self._prompt_kv(prompts, heads).rows(index) if head_ids.shape[1] > 0 else None
            for w, (_, tail) in zip(which, items):
                rows.append((len(heads[w]), 0, len(tail)))
        else:
            new = [(p, h) for p, h in zip(prompts, heads) if p not in self._kv and h]
            if new:
                self._prefill(new)
            parts, fed = [], []
            for w, (prompt, tail), limit in zip(which, items, limits):
                matched, kv, lost = self._store.match(prompt, tail, limit)
                head = self._kv[prompt] if heads[w] else None
                if head is not None and kv is not None:
                    kv = [(torch.cat([hk, k], dim=2), torch.cat([hv, v], dim=2)) for (hk, hv), (k, v) in zip(head, kv)]
                parts.append(kv if kv is not None else head)
                fed.append(tail[matched:])
                rows.append((len(heads[w]), matched, len(tail) - matched))
                self.counts.reprefill += lost
            tail_ids, tail_mask = left_pad(fed, pad, dev)
            if all(p is None for p in parts):
                cache, ids, mask = None, tail_ids, tail_mask
            else:
                stacked = PromptKV.stack(parts, self.model.config)
                width = stacked.mask.shape[1]
                cache = stacked.cache
                ids = torch.cat([torch.full((len(items), width), pad, dtype=torch.long, device=dev), tail_ids], dim=1)
                mask = torch.cat([stacked.mask, tail_mask], dim=1)
        for head, matched, run in rows:
            self.counts.add(run, context=head + matched)
            self.counts.cached += (head + matched) if count_cached else 0
        return cache, ids, mask, rows

    @torch.inference_mode()
    def score(self, problems: Sequence[dict], cands: Sequence[Candidate], conts: Sequence[Sequence[int]],
              batch_size: Optional[int] = None) -> list[tuple[list[float], list[float], int]]:
        """The model's reading of token ids ``conts[i]`` (this engine's tokenizer) written after candidate
        ``cands[i]``: per token its log-prob and the log-prob of the model's own greedy token there
        (speculative verification: SSR's target checks drafted tokens), and the tokens the pass ran for
        the row. Nothing is generated.

        One forward pass per batch over only what is not cached: with the store on, a candidate's prompt
        and partial solution come from the KV cache (as in :meth:`extend`) and the pass runs the rest of
        its tail and ``conts[i]``, the LM head at ``len(conts[i])`` positions (charged as ``scored``). The
        KV of every token run is stored under the candidate's ids + ``conts[i]``, so a candidate that
        accepts a prefix of ``conts[i]`` continues from the cache there and the rejected tokens are never
        attended to (they sit in a leaf of their own until evicted)."""
        out: list[tuple[list[float], list[float], int]] = [([], [], 0) for _ in cands]
        rows = []
        for cand, cont in zip(cands, conts):
            prompt = self.core.prompt_text(problems[cand.problem]["prompt"])
            rows.append((prompt, self.core.prompt_ids(prompt)[-1:] + self.core.continuation_ids(cand), list(cont)))
        todo = [i for i, r in enumerate(rows) if r[2]]
        was_training = self.model.training
        self.model.eval()
        try:
            with lora_merged(self.model):
                for b in range(0, len(todo), batch_size or self.cfg.batch_size):
                    batch = todo[b:b + (batch_size or self.cfg.batch_size)]
                    items = [(rows[i][0], rows[i][1] + rows[i][2]) for i in batch]
                    cache, ids, mask, layout = self._layout(items, [len(rows[i][1]) - 1 for i in batch])
                    if cache is None:
                        from transformers import DynamicCache

                        cache = DynamicCache(config=self.model.config)
                    width = cache.get_seq_length()
                    keep = max(len(rows[i][2]) for i in batch) + 1
                    logits = self.model(input_ids=ids[:, width:], attention_mask=mask, use_cache=True, **{cache_kw(): cache},
                                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, width:],
                                        logits_to_keep=keep).logits.float()
                    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)  # column c predicts column c + 1
                    top = logp_all.max(-1).values
                    for r, i in enumerate(batch):
                        n = len(rows[i][2])
                        target = torch.tensor(rows[i][2], device=logits.device)
                        picked = logp_all[r, keep - 1 - n:].gather(-1, target[:, None]).squeeze(-1)
                        out[i] = (picked.tolist(), top[r, keep - 1 - n:].tolist(), layout[r][2])
                        self.counts.scored += n
                        if self._store is not None:
                            head, matched, _ = layout[r]
                            cols = mask[r].nonzero().squeeze(1)[head + matched:]
                            self._store.insert(items[r][0], items[r][1], matched,
                                               [(layer.keys[r:r + 1, :, cols], layer.values[r:r + 1, :, cols])
                                                for layer in cache.layers])
                    self.counts.calls += 1
        finally:
            self.model.train(was_training)
        if self._store is not None:
            self._store.evict()
        return out

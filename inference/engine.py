"""The one generation engine every search strategy uses, with per-model token accounting.

Strategies never call ``generate``; they hold :class:`Candidate` objects (a partial solution of one
problem) and ask the engine to extend a whole batch of them at once:

    engine.extend(problems, cands)                     # one more step each (until the step delimiter)
    engine.extend(problems, cands, max_tokens=64, stop_at_step=False)   # up to τ tokens (early rejection)
    engine.extend(problems, cands, stop_at_step=False)                  # to the end (best-of-N, majority)

All unfinished candidates of all problems go through batched calls of the decoding core that training
samples with too (``frugal.inference.decoding.decode``; ``batch_size`` rows each, rows of one prompt side by
side and sorted by length so little padding is wasted); finished candidates are returned untouched and
cost nothing. Within a call a row leaves the batch as soon as it stops (EOS, a stop string, the step
delimiter, its own token limit). A candidate finishes at EOS, at one of ``stop_strings``, after
``max_steps`` steps or ``max_new_tokens`` generated tokens.

Sampling: each candidate draws its tokens from a random stream of its own, keyed by (engine seed, its
prompt, ``Candidate.stream``) and the token's position (:class:`StreamSampling`), not from one generator
shared by the batch. The i-th fresh candidate of a problem has stream i in every strategy, and a copy that
must continue differently (a beam's child, a resampled duplicate) takes ``Candidate.fork``. So a
candidate's text does not depend on its batch or on how its generation was split into calls, and
strategies compared at one seed start from the same samples (common random numbers: their accuracy
differences are paired and not blurred by independent sampling luck).

Token accounting (:class:`Counts`, one per model; :mod:`frugal.evaluator.flops` turns them into FLOPs):

* ``prefill`` — tokens encoded before generating: each distinct prompt once (shared by all candidates
  of that problem, across calls), plus what each row runs per call (the part of [last prompt token +
  partial solution] not in the per-candidate KV store);
* ``decode`` — tokens generated and kept, per row (a row that has stopped leaves the batch, so nothing
  is decoded, or charged, after its end);
* ``attention`` — Σ over processed tokens of the number of keys each one attends to (itself and every
  token before it: the i-th token of a sequence adds i; see :meth:`Counts.add`), for the attention FLOPs
  term. A generated token is charged as one processed token (the forward pass that feeds it back).

What is reused (prompt-prefix reuse): every distinct prompt except its last token is prefilled once
into a KV cache and kept (per prompt, until :meth:`Engine.clear_prompt_cache`; the harness clears it
between chunks of problems). Prompts that begin with the same tokens (the chat template's system prompt,
few-shot worked examples: often most of a short question's prompt) prefill that shared prefix once and
only their own rest over it — the automatic prefix caching of serving engines (vLLM, SGLang) — and are
charged so (``shared_prefix_min_tokens``).

Per-candidate KV reuse (``kv_cache_tokens`` > 0, the default): a candidate's KV (its prompt's last token and
everything it generated or accepted) is kept across calls in a radix tree of token segments per prompt
(:mod:`frugal.inference.kv_cache`), keyed by the exact ids the engine continues it from: ``Candidate.ids``
(the ids this engine sampled for its text, :meth:`Engine._partial_ids`), not its text re-tokenised, which
would not round-trip. Forks share their parent's segments. Each row's cache is [its prompt's KV | the
longest stored prefix of its tail], stacked per row. The rest — the token it ended on last call (generated,
never fed) and anything appended since (text another model wrote) — runs once per distinct tail before
decoding (:meth:`Engine._run_tails`: the children of one beam or the duplicates of one particle share it),
and every row then decodes from its whole tail in the store. When a row leaves the decoding batch, the
decoding core hands its KV back (``decode``'s ``on_leave``) and the store keeps it; over
``kv_cache_tokens`` the least recently used segments are dropped, and tokens prefilled again because of
that are counted (``Counts.reprefill``). With the store off every call encodes each candidate's partial
solution again. ``cached`` counts the context tokens rows read from a cache (prompt and store).
``summary.json`` reports prefill and generated tokens separately.

:class:`CountingPRM` wraps a PRM (``frugal.train.prm.PRM`` or anything with the same ``score`` /
``score_partial`` API) and keeps the same counts for it, from the PRM's own ``last_tokens`` and
``last_attention`` (what it ran: ``frugal.train.prm.PRM.score`` runs each distinct prompt once per call and
every solution's step tokens over that prompt's KV cache); for a PRM without ``last_attention``, from
the encoded lengths as if each full sequence were run.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional, Protocol, Sequence

import torch

from frugal.inference.kv_cache import KVTree
from frugal.inference import decoding
from frugal.inference.decoding import (PromptKV, StreamSampling, cache_kw, eos_token_ids, left_pad, lora_merged, mix,
                                   sampling_warpers, stop_criteria)
from frugal.train.prm_steps import split_steps


@dataclass
class EngineConfig:
    step_delimiter: str = "\n\n"  # ends a step; the PRM scores at step ends
    stop_strings: list[str] = field(default_factory=list)  # end a whole solution (e.g. "</answer>")
    max_steps: int = 12  # a solution is finished after this many steps
    max_step_tokens: int = 96  # tokens per step (a longer step is cut there and continues next call)
    max_new_tokens: int = 256  # tokens per solution
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    batch_size: int = 64  # rows per generate call (bounds memory)
    # Prompts whose token prefix of at least this many tokens is the same (a system prompt, few-shot
    # examples) prefill that prefix once and their own rest over it (0 = off; see `Engine._prefill`).
    shared_prefix_min_tokens: int = 32
    # Per-candidate KV kept across calls (inference/kv_cache.py): at most this many tokens over all
    # candidates, least recently used dropped first (their tokens are prefilled again, and counted as
    # `reprefill`). 0 = off: each call encodes each candidate's partial solution again.
    kv_cache_tokens: int = 100_000
    # ---- which backend runs the policy (inference/backends.py; docs/evaluator.md "Engine backends").
    # hf: this class (Frugal's decoding core) | vllm: an in-process vLLM `LLM` | openai: any
    # OpenAI-compatible completions server. A key of another backend is refused (BACKEND_KEYS).
    backend: str = "hf"
    # vllm
    dtype: str = "auto"  # vLLM's dtype: auto (bf16 on a bf16 GPU, else float32, as model.dtype) | float32 | bfloat16 | float16
    max_model_len: int = 2048  # prompt + solution tokens vLLM reserves KV for
    gpu_memory_utilization: float = 0.9  # share of the GPU vLLM may use (GPU only)
    kv_cache_gib: Optional[float] = None  # KV cache size in GiB (default: 1 GiB on CPU, gpu_memory_utilization on GPU)
    # openai
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1
    served_model: Optional[str] = None  # the server's model name (default: model.name_or_path)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (the key is never written)
    max_concurrency: int = 8  # requests in flight at once
    timeout_s: float = 120.0  # per request
    max_retries: int = 3  # retries of a failed request, with exponential backoff
    prompt_format: str = "auto"  # auto (token ids, text if the server refuses them) | ids | text

    def __post_init__(self):
        if self.backend not in BACKEND_KEYS:
            raise ValueError(f"engine.backend must be one of {'|'.join(BACKEND_KEYS)}, got {self.backend!r}")
        foreign = [f"engine.{k} belongs to engine.backend={b}" for b, keys in BACKEND_KEYS.items()
                   if b != self.backend for k in keys if getattr(self, k) != _ENGINE_DEFAULTS[k]]
        if foreign:
            raise ValueError(f"{'; '.join(foreign)}, not engine.backend={self.backend}")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("engine.backend=openai needs engine.base_url (e.g. http://127.0.0.1:8000/v1)")
        for key in ("max_model_len", "max_concurrency", "timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"engine.{key} must be > 0, got {getattr(self, key)}")
        if self.max_retries < 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("engine.max_retries must be >= 0 and engine.gpu_memory_utilization in (0, 1]")
        if self.prompt_format not in ("auto", "ids", "text"):
            raise ValueError(f"engine.prompt_format must be auto|ids|text, got {self.prompt_format!r}")
        if not self.step_delimiter:
            raise ValueError("engine.step_delimiter must be a non-empty string")
        for key in ("max_steps", "max_step_tokens", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be >= 1, got {getattr(self, key)}")
        if self.kv_cache_tokens < 0:
            raise ValueError(f"engine.kv_cache_tokens must be >= 0 (0 = off), got {self.kv_cache_tokens}")
        if self.shared_prefix_min_tokens < 0:
            raise ValueError(f"engine.shared_prefix_min_tokens must be >= 0, got {self.shared_prefix_min_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"engine.temperature must be > 0 (greedy is a strategy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"engine.top_p must be in (0, 1], got {self.top_p}")


# The keys only one backend reads (the rest are every backend's): set away from its default under another
# backend, a key is refused with the backend it belongs to (as `search.*` keys of another strategy are).
BACKEND_KEYS = {
    "hf": ("batch_size", "shared_prefix_min_tokens"),  # vLLM and servers batch and cache prefixes themselves
    "vllm": ("dtype", "max_model_len", "gpu_memory_utilization", "kv_cache_gib"),
    "openai": ("base_url", "served_model", "api_key_env", "max_concurrency", "timeout_s", "max_retries",
               "prompt_format"),
}
_ENGINE_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
                    for f in fields(EngineConfig)}


@dataclass
class Counts:
    """Tokens one model processed (see the module docstring for what each field counts)."""

    prefill: int = 0
    decode: int = 0
    attention: int = 0
    calls: int = 0
    scored: int = 0  # prefill tokens whose logits were computed too (SSR verification), for the LM-head FLOPs
    cached: int = 0  # prompt tokens served from a prefix / KV cache instead of being prefilled (not charged)
    reprefill: int = 0  # prefill tokens processed before and again because their KV was evicted (in prefill)

    @property
    def tokens(self) -> int:
        return self.prefill + self.decode

    def add(self, prefill: int, generated: int = 0, context: int = 0, scored: int = 0) -> None:
        """Charge one row: ``prefill`` tokens encoded after ``context`` cached tokens (``scored`` of them
        through the LM head as well), then ``generated`` tokens after those. The i-th token of the sequence
        attends to i keys (itself included), so prefill token k adds context + k and generated token j adds
        context + prefill + j."""
        self.prefill += prefill
        self.scored += scored
        self.decode += generated
        self.attention += prefill * context + prefill * (prefill + 1) // 2
        before = context + prefill
        self.attention += generated * before + generated * (generated + 1) // 2

    def snapshot(self) -> "Counts":
        return copy.copy(self)

    def since(self, before: "Counts") -> "Counts":
        return Counts(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(Counts)})


@dataclass
class Candidate:
    """A (partial) solution of problem ``problem``; strategies copy, score and select these."""

    problem: int
    text: str = ""
    tokens: int = 0  # generated tokens in ``text`` (inherited by copies; bounds max_new_tokens)
    finished: bool = False
    scores: list[float] = field(default_factory=list)  # PRM step scores of ``text`` (set by strategies)
    # (engine, text, token ids): the ids that engine fed and generated for ``text`` (see Engine.extend)
    ids: Optional[tuple] = None
    # Which random stream the engine samples this candidate's tokens from (see `Engine` "Sampling"): the
    # i-th fresh candidate of a problem has stream i in every strategy; None = a stream drawn at random.
    stream: Optional[int] = None

    def copy(self) -> "Candidate":
        """The same candidate (it goes on sampling from the same stream)."""
        return Candidate(self.problem, self.text, self.tokens, self.finished, list(self.scores), self.ids, self.stream)

    def fork(self, k: int) -> "Candidate":
        """Copy number ``k`` of this candidate that will continue differently (a beam's child, a resampled
        particle's duplicate): the same text on a stream of its own, derived from (stream, k, tokens)."""
        child = self.copy()
        child.stream = None if self.stream is None else mix(self.stream, k, self.tokens)
        return child

    def steps(self, delimiter: str = "\n\n") -> list[str]:
        return split_steps(self.text, delimiter)


class Engine:
    """Batched step-wise generation for one policy model; ``counts`` accumulates its token usage.
    ``seed`` keys the candidates' random streams (the harness sets it to the run's seed)."""

    def __init__(self, model, tokenizer, cfg: EngineConfig, name: str = "policy", seed: int = 0):
        self.model, self.tokenizer, self.cfg, self.name, self.seed = model, tokenizer, cfg, name, seed
        self.counts = Counts()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._template_cache: dict[tuple, str] = {}
        self._ids_cache: dict[str, list[int]] = {}
        self._prompt_keys: dict[str, int] = {}
        self._kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # prompt -> per-layer (K, V)
        self._shared: Optional[tuple[list[int], list]] = None  # (ids, per-layer (K, V)) of a shared prefix
        # the candidates' KV across calls, keyed by (prompt, last prompt token + Candidate ids)
        self._store = KVTree(cfg.kv_cache_tokens) if cfg.kv_cache_tokens else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_text(self, prompt: list[dict]) -> str:
        """The chat-templated prompt (with the assistant turn opened), cached per prompt."""
        key = tuple((m["role"], m["content"]) for m in prompt)
        if key not in self._template_cache:
            self._template_cache[key] = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=False)
        return self._template_cache[key]

    def num_steps(self, cand: Candidate) -> int:
        return len(cand.steps(self.cfg.step_delimiter))

    @torch.inference_mode()
    def extend(self, problems: Sequence[dict], cands: Sequence[Candidate], max_tokens: Optional[int] = None,
               stop_at_step: bool = True, greedy: bool = False) -> list[Candidate]:
        """Extend every unfinished candidate (new objects; the inputs are not modified).

        ``stop_at_step``: stop at the end of the current step (the step delimiter). ``max_tokens``: at most
        this many new tokens (default: ``max_step_tokens`` when stopping at steps, else the rest of
        ``max_new_tokens``). ``problems[c.problem]["prompt"]`` is the chat prompt of candidate ``c``.
        """
        out = [c.copy() for c in cands]
        todo = [i for i, c in enumerate(out) if not c.finished]
        if not todo:
            return out
        cap = max_tokens if max_tokens is not None else (self.cfg.max_step_tokens if stop_at_step else None)
        items, partials, keys = [], [], []  # (templated prompt, tail ids = last prompt token + partial solution)
        for i in todo:
            prompt = self.prompt_text(problems[out[i].problem]["prompt"])
            partials.append(self._partial_ids(out[i]))
            items.append((prompt, self._prompt_ids(prompt)[-1:] + partials[-1]))
            keys.append(None if greedy else self._stream_key(prompt, out[i].stream))  # greedy draws nothing
        # Rows of one prompt side by side (they share its prefill), similar lengths together (less padding).
        order = sorted(range(len(todo)), key=lambda k: (items[k][0], len(items[k][1])))
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start:start + self.cfg.batch_size]
            limits = [self._limit(out[todo[k]], cap) for k in chunk]
            streams = [(keys[k], out[todo[k]].tokens) for k in chunk]
            rows = self._generate([items[k] for k in chunk], max(limits), stop_at_step, greedy, streams, limits)
            for k, limit, (ids, context) in zip(chunk, limits, rows):
                self._apply(out[todo[k]], partials[k], ids[:limit], context, stop_at_step)
        return out

    def _partial_ids(self, cand: Candidate) -> list[int]:
        """The token ids to continue ``cand`` from: the very ids this engine fed and sampled for its text
        when it wrote all of it, else the text re-encoded (steps written by another model, e.g. SSR's draft,
        or edited). Why not always re-encode: BPE does not round-trip, e.g. SmolLM2 samples "\n\n" as one
        token but encodes "4\n\n1" with two "\n" tokens, and a policy continued from such out-of-
        distribution ids writes differently (here: step after step, never its answer line)."""
        if cand.ids is not None and cand.ids[0] is self and cand.ids[1] == cand.text:
            return list(cand.ids[2])
        return self.tokenizer(cand.text, add_special_tokens=False)["input_ids"] if cand.text else []

    # ------------------------------------------------------------------ internals
    def _stream_key(self, prompt: str, stream: Optional[int]) -> int:
        """The key of a candidate's random stream: (engine seed, its prompt, its stream); a candidate
        without a stream gets a fresh random one (from torch's global generator, which the harness seeds)."""
        if stream is None:
            return int(torch.randint(0, 2**62, ()))
        if prompt not in self._prompt_keys:
            digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
            self._prompt_keys[prompt] = int.from_bytes(digest, "little")
        return mix(self.seed, self._prompt_keys[prompt], stream)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids_cache:
            self._ids_cache[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._ids_cache[prompt]

    def clear_prompt_cache(self) -> None:
        """Forget the prompts' KV caches. The store grows with every new prompt, so callers running many
        problems clear it between chunks (the harness does, per strategy, budget and chunk)."""
        self._kv.clear()
        self._shared = None
        if self._store is not None:
            self._store.clear()

    def _prompt_kv(self, prompts: list[str], heads: list[list[int]]) -> PromptKV:
        """Each prompt's KV (all but its last token) from the store, left-padded into one
        :class:`~frugal.inference.decoding.PromptKV`. Prompts not seen since the last
        :meth:`clear_prompt_cache` are prefilled (batched) and charged; the others are reused for free — the
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
        m = min(_common_prefix_length(heads if len(heads) > 1 else [kept_ids, heads[0]]), shortest - 1)
        shared_ids, shared_kv = [], None
        if self.cfg.shared_prefix_min_tokens and m >= self.cfg.shared_prefix_min_tokens:
            reuse = min(_common_prefix_length([kept_ids, heads[0]]), m) if kept_ids else 0
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

    def _limit(self, cand: Candidate, cap: Optional[int]) -> int:
        left = self.cfg.max_new_tokens - cand.tokens
        return max(1, min(left, cap) if cap is not None else left)

    def _generate(self, items: list[tuple[str, list[int]]], max_new: int, stop_at_step: bool, greedy: bool,
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
        stops = list(self.cfg.stop_strings) + ([self.cfg.step_delimiter] if stop_at_step else [])
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
        heads = [self._prompt_ids(p)[:-1] for p in prompts]
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
        attended to (they sit in a leaf of their own until evicted). This is the HF backend's; a backend
        that runs the model elsewhere overrides it (e.g. vLLM's ``prompt_logprobs`` over its prefix cache)
        and charges the same ``Counts`` fields."""
        out: list[tuple[list[float], list[float], int]] = [([], [], 0) for _ in cands]
        rows = []
        for cand, cont in zip(cands, conts):
            prompt = self.prompt_text(problems[cand.problem]["prompt"])
            rows.append((prompt, self._prompt_ids(prompt)[-1:] + self._partial_ids(cand), list(cont)))
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

    def _apply(self, cand: Candidate, partial: list[int], ids: list[int], context: int, stop_at_step: bool) -> None:
        """Cut one row's new tokens at its first stop (step delimiter, stop string, EOS) and charge it;
        ``partial`` (the ids it was continued from) + the kept ids are remembered when they spell the text."""
        eos_at = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
        body = ids[:eos_at] if eos_at is not None else ids
        pieces = [self.tokenizer.decode([t]) for t in body]
        new_text = "".join(pieces)
        cut, ends_solution = None, False
        for stop in self.cfg.stop_strings:  # an explicit end-of-solution marker wins
            at = new_text.find(stop)
            if at >= 0 and (cut is None or at + len(stop) < cut):
                cut, ends_solution = at + len(stop), True
        if stop_at_step:
            at = self._step_end(cand.text, new_text)
            if at is not None and (cut is None or at < cut):
                cut, ends_solution = at, False
        if cut is not None:
            kept, length = 0, 0
            while kept < len(pieces) and length < cut:
                length += len(pieces[kept])
                kept += 1
            exact = length == cut  # the cut falls between tokens, so the kept ids spell the kept text
            new_text, used, kept_ids = new_text[:cut], kept, body[:kept]
        elif eos_at is not None:
            ends_solution, used, exact, kept_ids = True, eos_at + 1, True, body  # the EOS was generated too
        else:
            used, exact, kept_ids = len(ids), True, body
        self.counts.add(0, used, context)
        cand.text += new_text
        cand.tokens += used
        cand.ids = (self, cand.text, partial + kept_ids) if exact else None
        cand.finished = (ends_solution or cand.tokens >= self.cfg.max_new_tokens
                         or (self.num_steps(cand) >= self.cfg.max_steps and cand.text.endswith(self.cfg.step_delimiter)))

    def _step_end(self, old_text: str, new_text: str) -> Optional[int]:
        """Index in ``new_text`` just after the delimiter that closes the current step (a delimiter with
        only whitespace before it in the step does not close a step), or None."""
        delim = self.cfg.step_delimiter
        open_step = old_text.split(delim)[-1] if old_text else ""
        start = 0
        while True:
            at = new_text.find(delim, start)
            if at < 0:
                return None
            if (open_step + new_text[:at]).strip():
                return at + len(delim)
            start = at + 1


# ---------------------------------------------------------------------- the PRM side

class PRMLike(Protocol):
    """What the evaluator needs from a PRM (``frugal.train.prm.PRM`` satisfies it)."""

    def score(self, prompts: Sequence[Any], steps_batch: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def score_partial(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[list[float]]: ...


class CountingPRM:
    """A PRM plus its token counts. ``score_candidates`` sets ``cand.scores`` for a batch of candidates in
    one ``score_partial`` call (a trailing unfinished step counts as a step)."""

    def __init__(self, prm: PRMLike, name: str = "prm"):
        self.prm, self.name = prm, name
        self.counts = Counts()

    def score_partial(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[list[float]]:
        scores = self.prm.score_partial(prompts, texts)
        self._charge(prompts, texts)
        return scores

    def score_candidates(self, problems: Sequence[dict], cands: Sequence[Candidate]) -> None:
        if not cands:
            return
        scores = self.score_partial([problems[c.problem]["prompt"] for c in cands], [c.text for c in cands])
        for cand, s in zip(cands, scores):
            cand.scores = list(s)

    def _charge(self, prompts, texts) -> None:
        self.counts.calls += 1
        if getattr(self.prm, "last_attention", None) is not None:  # the PRM counted what it ran (train.prm)
            self.counts.prefill += int(self.prm.last_tokens)
            self.counts.attention += int(self.prm.last_attention)
            self.counts.scored += int(getattr(self.prm, "last_lm_tokens", 0))  # its LM head (logprob_features)
            return
        # Otherwise assume every (prompt + steps) sequence was run in full.
        separator = getattr(getattr(self.prm, "cfg", None), "separator", "\n\n")
        lengths = []
        if hasattr(self.prm, "encode"):
            for p, t in zip(prompts, texts):
                steps = split_steps(t, separator)
                if steps:  # solutions with no steps are not run through the PRM
                    lengths.append(len(self.prm.encode(p, steps).ids))
        total = getattr(self.prm, "last_tokens", None)
        total = sum(lengths) if total is None else int(total)
        self.counts.prefill += total
        self.counts.attention += sum(n * (n + 1) // 2 for n in lengths) if lengths else total


def _common_prefix_length(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n

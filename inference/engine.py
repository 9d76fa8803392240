"""The engine protocol: what every backend that runs a policy offers training and search, and the pieces
they share.

Strategies never call ``generate``; they hold :class:`Candidate` objects (a partial solution of one problem)
and ask an engine to extend a whole batch of them at once:

    engine.extend(problems, cands)                     # one more step each (until the step delimiter)
    engine.extend(problems, cands, max_tokens=64, stop_at_step=False)   # up to τ tokens (early rejection)
    engine.extend(problems, cands, stop_at_step=False)                  # to the end (best-of-N, majority)
    engine.score(problems, cands, conts)               # log-probs of given tokens after each candidate (SSR)

Backends are siblings that implement :class:`Engine` (lm-evaluation-harness's shape: one model interface,
one module per backend, each registered by name; ``frugal.inference.backends``):

* ``hf`` — :class:`frugal.inference.hf_engine.HFEngine`: the policy in this process, through the decoding
  core (``frugal.inference.decoding``) with prompt-prefix and per-candidate KV reuse;
* ``vllm`` — :class:`frugal.inference.vllm_engine.VLLMEngine`: an in-process ``vllm.LLM``;
* ``openai`` — :class:`frugal.inference.openai_engine.OpenAIEngine`: an OpenAI-compatible completions server.

What does not depend on where the model runs is composed, not inherited: :class:`EngineCore` holds the
chat templating, the candidates' random-stream keys, the step/stop rules that cut new tokens, the token
ids candidates continue from, and the :class:`Counts`. A backend supplies one function — run a batch of
rows (templated prompt + the ids to continue from) for up to N new tokens — and the core does the rest.

A candidate finishes at EOS, at one of ``stop_strings``, after ``max_steps`` steps or ``max_new_tokens``
generated tokens. Finished candidates are returned untouched and cost nothing.

Continuing from token ids (:class:`TokenIds`): a candidate remembers the ids the engine fed and sampled
for its text, and is continued from exactly those, never from its text re-encoded, because BPE does not
round-trip (SmolLM2 samples "\\n\\n" as one token but encodes "4\\n\\n1" with two "\\n" tokens, and a policy
continued from such out-of-distribution ids writes differently). Text another model wrote (SSR's draft)
is encoded once; an engine with the same tokenizer can take over the ids (:meth:`TokenIds.handed_to`).

Sampling: each candidate draws its tokens from a random stream of its own, keyed by (engine seed, its
prompt, ``Candidate.stream``) (:meth:`EngineCore.stream_key`), not from one generator shared by the batch.
The i-th fresh candidate of a problem has stream i in every strategy, and a copy that must continue
differently (a beam's child, a resampled duplicate) takes ``Candidate.fork``. So a candidate's text does
not depend on its batch or on how its generation was split into calls, and strategies compared at one
seed start from the same samples (common random numbers). The HF backend draws from the stream itself
(``frugal.inference.decoding.StreamSampling``); a served backend sends ``seed = mix(stream key, tokens
generated before)`` with each request (:func:`request_seed`) and the server draws, so ``hf`` and ``vllm``
write different samples from one seed: their outputs agree in distribution, not token for token.

Token accounting (:class:`Counts`, one per model; :mod:`frugal.evaluator.flops` turns them into FLOPs):

* ``prefill`` — tokens encoded before generating (a backend's prefix cache reduces it: ``cached``);
* ``decode`` — tokens generated and kept, per row (a row that stopped is not charged past its end);
* ``attention`` — Σ over processed tokens of the number of keys each attends to (:meth:`Counts.add`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch

from frugal.inference.decoding import mix
from frugal.runtime import registry
from frugal.rewards.steps import split_steps


# ---------------------------------------------------------------------- config

@dataclass
class EngineConfig:
    """The knobs every backend reads: the base of each backend's config (``engine.backend`` picks one; the
    backends register theirs, see ``frugal.inference.backends``). A knob of another backend is refused,
    naming the backend it belongs to."""

    GROUP: ClassVar[str] = "engine"
    KEY: ClassVar[str] = "backend"
    backend: str = ""
    step_delimiter: str = "\n\n"  # ends a step; the PRM scores at step ends
    stop_strings: list[str] = field(default_factory=list)  # end a whole solution (e.g. "</answer>")
    max_steps: int = 12  # a solution is finished after this many steps
    max_step_tokens: int = 96  # tokens per step (a longer step is cut there and continues next call)
    max_new_tokens: int = 256  # tokens per solution
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        own = type(self).__dataclass_fields__["backend"].default
        if not own:
            raise TypeError("EngineConfig is the base of the backends' configs; use one of them "
                            "(frugal.inference.backends.engine_config)")
        if self.backend != own:
            raise ValueError(f"engine.backend must be {own!r} in {type(self).__name__}, got {self.backend!r}")
        if not self.step_delimiter:
            raise ValueError("engine.step_delimiter must be a non-empty string")
        for key in ("max_steps", "max_step_tokens", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ValueError(f"engine.temperature must be > 0 (greedy is a strategy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"engine.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"engine.top_k must be >= 0 (0 = off), got {self.top_k}")

    def shared(self) -> dict:
        """The knobs of this base class (for an engine of another backend beside this one, SSR's draft)."""
        return {f.name: getattr(self, f.name) for f in fields(EngineConfig) if f.name != "backend"}


registry.discover("engine", "frugal.inference.backends")


# ---------------------------------------------------------------------- counts

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


# ---------------------------------------------------------------------- candidates

@dataclass(frozen=True)
class TokenIds:
    """The token ids ``owner`` (an engine) fed and generated for ``text``: what it continues the candidate
    from. Valid only for that engine and that text (:meth:`valid_for`)."""

    owner: Any
    text: str
    ids: tuple[int, ...]

    def valid_for(self, engine: Any, text: str) -> bool:
        return self.owner is engine and self.text == text

    def spells(self, text: str) -> bool:
        return self.text == text

    def handed_to(self, engine: Any) -> "TokenIds":
        """The same ids made ``engine``'s (an engine with the same tokenizer takes over another's ids)."""
        return dataclasses.replace(self, owner=engine)


@dataclass
class Candidate:
    """A (partial) solution of problem ``problem``; strategies copy, score and select these."""

    problem: int
    text: str = ""
    tokens: int = 0  # generated tokens in ``text`` (inherited by copies; bounds max_new_tokens)
    finished: bool = False
    scores: list[float] = field(default_factory=list)  # PRM step scores of ``text`` (set by strategies)
    ids: Optional[TokenIds] = None  # the ids an engine fed and generated for ``text`` (module docstring)
    # Which random stream the engine samples this candidate's tokens from (module docstring, "Sampling"):
    # the i-th fresh candidate of a problem has stream i in every strategy; None = a stream drawn at random.
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


# ---------------------------------------------------------------------- the protocol

@runtime_checkable
class Engine(Protocol):
    """What a policy backend offers (``hf``, ``vllm``, ``openai``). ``model`` is the policy module (on
    PyTorch's ``meta`` device for a backend that runs it elsewhere: shapes for FLOPs, no weights);
    ``device`` is where Frugal's own models (PRM, SSR's draft) run beside it."""

    name: str
    cfg: EngineConfig
    tokenizer: Any
    model: Any
    core: "EngineCore"  # templating, prompt ids, the ids a candidate continues from, step rules, counts
    counts: Counts
    seed: int

    @property
    def device(self) -> torch.device: ...

    def extend(self, problems: Sequence[dict], cands: Sequence[Candidate], max_tokens: Optional[int] = None,
               stop_at_step: bool = True, greedy: bool = False) -> list[Candidate]:
        """Extend every unfinished candidate (new objects; the inputs are not modified). ``stop_at_step``:
        stop at the end of the current step. ``max_tokens``: at most this many new tokens (default:
        ``max_step_tokens`` when stopping at steps, else the rest of ``max_new_tokens``).
        ``problems[c.problem]["prompt"]`` is the chat prompt of candidate ``c``."""

    def score(self, problems: Sequence[dict], cands: Sequence[Candidate], conts: Sequence[Sequence[int]],
              batch_size: Optional[int] = None) -> list[tuple[list[float], list[float], int]]:
        """Per row: the log-prob of each token of ``conts[i]`` (this engine's tokenizer) written after
        candidate ``cands[i]``, the log-prob of the model's own greedy token there, and the tokens the pass
        ran. Nothing is generated (speculative verification: SSR's target checks drafted tokens)."""

    def clear_cache(self) -> None:
        """Forget per-prompt state (templates, prompt ids, KV) between chunks of problems."""

    def close(self) -> None: ...


# ---------------------------------------------------------------------- what every backend shares

# One batch of rows for a backend: (templated prompt, tail ids = last prompt token + partial solution ids),
# the most new tokens, whether to stop at the step delimiter, greedy, per row (stream key, tokens generated
# before) and per row its own token limit. Returns per row (generated ids, context length before them).
RunRows = Callable[[list, int, bool, bool, Sequence, Sequence[int]], list]


def request_seed(stream: tuple[Optional[int], int]) -> Optional[int]:
    """A served backend's per-request seed from (stream key, tokens generated before); None for greedy."""
    key, before = stream
    return None if key is None else mix(key, before)


def sampling_settings(cfg: EngineConfig, greedy: bool) -> dict:
    """Temperature / top-p / top-k as a served backend sends them (greedy: temperature 0). Top-k is sent only
    when it is on, so no backend has to agree on how "off" is spelled."""
    if greedy:
        return {"temperature": 0.0}
    out = {"temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.top_k:
        out["top_k"] = cfg.top_k
    return out


class EngineCore:
    """The backend-independent part of an engine, composed into each backend: chat templating (cached per
    prompt), stream keys, the ids candidates continue from, the step and stop rules, and ``counts``.

    :meth:`extend` is the whole of ``Engine.extend`` except running the model: it templates the prompts,
    builds each unfinished candidate's row, hands rows in chunks of ``chunk`` to the backend's ``run``
    (rows of one prompt side by side, similar lengths together: they share a prefill and waste little
    padding) and cuts each row's new tokens at its first stop (:meth:`apply`)."""

    def __init__(self, owner, tokenizer, cfg: EngineConfig, eos_ids: Sequence[int]):
        # A weak reference: the engine holds its core, and a cycle would keep an engine (and a vLLM engine
        # inside it, with its process-wide state) alive until the garbage collector happens to run.
        self._owner = weakref.ref(owner)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.eos_ids = list(eos_ids)
        self.counts = Counts()
        self._templates: dict[tuple, str] = {}
        self._ids: dict[str, list[int]] = {}
        self._prompt_keys: dict[str, int] = {}

    @property
    def owner(self):
        """The engine this core belongs to (the owner of the token ids it records)."""
        return self._owner()

    # ------------------------------------------------------------------ prompts and ids
    def prompt_text(self, prompt: list[dict]) -> str:
        """The chat-templated prompt (with the assistant turn opened), cached per prompt."""
        key = tuple((m["role"], m["content"]) for m in prompt)
        if key not in self._templates:
            self._templates[key] = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                                      tokenize=False)
        return self._templates[key]

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids:
            self._ids[prompt] = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self._ids[prompt]

    def continuation_ids(self, cand: Candidate) -> list[int]:
        """The ids to continue ``cand`` from: the very ids this engine fed and sampled for its text when
        it wrote all of it (or was handed them), else the text encoded (module docstring)."""
        if cand.ids is not None and cand.ids.valid_for(self.owner, cand.text):
            return list(cand.ids.ids)
        return self.tokenizer(cand.text, add_special_tokens=False)["input_ids"] if cand.text else []

    def stream_key(self, prompt: str, stream: Optional[int]) -> int:
        """The key of a candidate's random stream: (the owning engine's ``seed``, its prompt, its stream); a candidate
        without a stream gets a fresh random one (from torch's global generator, which the harness seeds)."""
        if stream is None:
            return int(torch.randint(0, 2**62, ()))
        if prompt not in self._prompt_keys:
            digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
            self._prompt_keys[prompt] = int.from_bytes(digest, "little")
        return mix(self.owner.seed, self._prompt_keys[prompt], stream)  # the engine's seed (the run's)

    def clear(self) -> None:
        self._templates.clear()
        self._ids.clear()
        self._prompt_keys.clear()

    def num_steps(self, cand: Candidate) -> int:
        return len(cand.steps(self.cfg.step_delimiter))

    def stops(self, stop_at_step: bool) -> list[str]:
        """The strings that end a row's generation: the solution's stop strings and, within a step, the
        step delimiter."""
        return list(self.cfg.stop_strings) + ([self.cfg.step_delimiter] if stop_at_step else [])

    # ------------------------------------------------------------------ extend
    def extend(self, problems: Sequence[dict], cands: Sequence[Candidate], max_tokens: Optional[int],
               stop_at_step: bool, greedy: bool, run: RunRows, chunk: Optional[int] = None) -> list[Candidate]:
        """``Engine.extend`` with the model run by ``run`` (see :data:`RunRows`), ``chunk`` rows per call
        (None: all rows in one call; a served backend schedules its own batches)."""
        out = [c.copy() for c in cands]
        todo = [i for i, c in enumerate(out) if not c.finished]
        if not todo:
            return out
        cap = max_tokens if max_tokens is not None else (self.cfg.max_step_tokens if stop_at_step else None)
        items, partials, keys = [], [], []  # (templated prompt, tail ids = last prompt token + partial solution)
        for i in todo:
            prompt = self.prompt_text(problems[out[i].problem]["prompt"])
            partials.append(self.continuation_ids(out[i]))
            items.append((prompt, self.prompt_ids(prompt)[-1:] + partials[-1]))
            keys.append(None if greedy else self.stream_key(prompt, out[i].stream))  # greedy draws nothing
        order = sorted(range(len(todo)), key=lambda k: (items[k][0], len(items[k][1])))
        size = chunk or len(order)
        for start in range(0, len(order), size):
            part = order[start:start + size]
            limits = [self._limit(out[todo[k]], cap) for k in part]
            streams = [(keys[k], out[todo[k]].tokens) for k in part]
            rows = run([items[k] for k in part], max(limits), stop_at_step, greedy, streams, limits)
            for k, limit, (ids, context) in zip(part, limits, rows):
                self.apply(out[todo[k]], partials[k], ids[:limit], context, stop_at_step)
        return out

    def _limit(self, cand: Candidate, cap: Optional[int]) -> int:
        left = self.cfg.max_new_tokens - cand.tokens
        return max(1, min(left, cap) if cap is not None else left)

    def apply(self, cand: Candidate, partial: list[int], ids: list[int], context: int, stop_at_step: bool) -> None:
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
        cand.ids = TokenIds(self.owner, cand.text, tuple(partial + kept_ids)) if exact else None
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


def served_score(engine, problems, cands, conts, score_tokens) -> list[tuple[list[float], list[float], int]]:
    """``Engine.score`` for a backend that runs the model elsewhere: ``score_tokens(seqs, starts)`` gives the
    backend's prompt log-probs over [prompt + the candidate's ids + ``conts[i]``], one request per row (the
    backend batches them); every token is charged as prefill and the LM head at the scored positions."""
    core = engine.core
    out: list[tuple[list[float], list[float], int]] = [([], [], 0) for _ in cands]
    todo = [i for i, cont in enumerate(conts) if cont]
    if not todo:
        return out
    seqs, starts = [], []
    for i in todo:
        prompt = core.prompt_text(problems[cands[i].problem]["prompt"])
        head = core.prompt_ids(prompt) + core.continuation_ids(cands[i])
        seqs.append(head + list(conts[i]))
        starts.append(len(head))
    for i, seq, start, (logp, top) in zip(todo, seqs, starts, score_tokens(seqs, starts)):
        out[i] = (logp, top, len(seq))
        core.counts.add(len(seq), scored=len(seq) - start)
    core.counts.calls += 1
    return out


def common_prefix_length(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return i
    return n

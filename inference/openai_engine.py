"""``engine.backend=openai``: the policy behind any OpenAI-compatible completions endpoint (``vllm serve``,
SGLang, TGI, a hosted API), through the ``openai`` client package (``pip install "frugal-rl[openai]"``): the
one place Frugal talks to a server, for search and, with ``vllm.mode=server``, for training rollouts
(:meth:`OpenAIEngine.attach_trainer`: each adapter version is loaded through vLLM's runtime LoRA endpoints,
and :meth:`OpenAIEngine.sample` draws G completions per prompt with their log-probs).

    frugal eval engine.backend=openai engine.base_url=http://127.0.0.1:8000/v1 engine.served_model=<name> ...

One ``/completions`` request per candidate (each carries its own seed: (run seed, prompt, candidate
stream, tokens so far), :func:`frugal.inference.engine.request_seed`), at most
``engine.max_concurrency`` in flight; the client retries a failed request (connection errors, 408, 409,
429, 5xx) ``engine.max_retries`` times with exponential backoff and gives each try ``engine.timeout_s``.
An unreachable server is an error naming ``engine.base_url``. The API key is read from the environment
variable named by ``engine.api_key_env`` (default ``OPENAI_API_KEY``; a local server needs none) and is
never written: ``config.yaml`` holds the variable's name only.

Prompt format (``engine.prompt_format``):

* ``ids`` — the prompt is the token ids (templated prompt + the ids the candidate was sampled with:
  never re-encoded text, which BPE does not round-trip) and the request asks for vLLM's extensions: the
  generated ``token_ids`` back (``return_token_ids``), stop strings kept in the output, the policy's EOS
  ids as stop token ids, ``top_k``. vLLM's server accepts all of these.
* ``text`` — for servers that take text only: the prompt is the ids decoded to text, the completion's
  text is tokenised again (a warning says so: the continuation is then not exactly what was sampled), and
  no stop strings are sent (a server that strips the matched stop string would hide where a step ended),
  so each request generates up to its token limit and ``EngineCore.apply`` cuts at the step end.
* ``auto`` (default) — ``ids``, switching to ``text`` with a warning when the server refuses the first
  ids request (HTTP 400 / 422).

Accounting from each response's ``usage``: ``prompt_tokens_details.cached_tokens`` (where the server
reports it; ``vllm serve --enable-prompt-tokens-details``) → ``Counts.cached``, the rest of
``prompt_tokens`` → ``prefill``; generated tokens → ``decode`` as kept by ``EngineCore.apply``.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from dataclasses import dataclass

from frugal.inference.engine import (Candidate, EngineConfig, EngineCore, request_seed, sampling_settings,
                                     served_score)
from frugal.inference.models import load_tokenizer, model_skeleton
from frugal.runtime.registry import register

log = logging.getLogger("frugal.eval")

EXTRA = "openai"  # pyproject's optional dependency


def _client_module():
    try:
        import openai
    except ImportError as err:
        raise ImportError(f'engine.backend=openai needs the openai client package: pip install "frugal-rl[{EXTRA}]" '
                          f'(or pip install openai): {err}') from err
    return openai


PROMPT_FORMATS = ("auto", "ids", "text")


@register("engine")
@dataclass
class OpenAIEngineConfig(EngineConfig):
    """``engine.backend=openai``: where the server is and how to talk to it."""

    backend: str = "openai"
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1
    served_model: Optional[str] = None  # the server's model name (default: model.name_or_path)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (the key is never written)
    max_concurrency: int = 8  # requests in flight at once
    timeout_s: float = 120.0  # per request
    max_retries: int = 3  # retries of a failed request, with exponential backoff
    prompt_format: str = "auto"  # auto (token ids, text if the server refuses them) | ids | text

    def __post_init__(self):
        super().__post_init__()
        if not self.base_url:
            raise ValueError("engine.backend=openai needs engine.base_url (e.g. http://127.0.0.1:8000/v1)")
        for key in ("max_concurrency", "timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"engine.{key} must be > 0, got {getattr(self, key)}")
        if self.max_retries < 0:
            raise ValueError(f"engine.max_retries must be >= 0, got {self.max_retries}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"engine.prompt_format must be {'|'.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")

    def build(self, model_cfg, device=None, name: str = "policy", seed: int = 0, vllm=None) -> "OpenAIEngine":
        return OpenAIEngine.load(model_cfg, self, device=device, name=name, seed=seed)


class OpenAIEngine:
    """The policy behind an OpenAI-compatible server at ``engine.base_url``. Build it with :meth:`load`
    (search: the policy's tokenizer and shapes from ``model_cfg``) or the constructor (a tokenizer and EOS ids
    at hand, e.g. training's server mode)."""

    def __init__(self, tokenizer, cfg: OpenAIEngineConfig, *, model=None, eos_ids: Optional[Sequence[int]] = None,
                 served_model: Optional[str] = None, name: str = "policy", seed: int = 0,
                 device: Optional[torch.device] = None):
        from frugal.inference.decoding import eos_token_ids

        openai = _client_module()
        self.tokenizer, self.cfg, self.name, self.seed, self.model = tokenizer, cfg, name, seed, model
        self.core = EngineCore(self, tokenizer, cfg, eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
        self.counts, self.eos_ids = self.core.counts, self.core.eos_ids
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.base_url = cfg.base_url
        self.served_model = served_model or cfg.served_model
        # A local server needs no key; the client insists on one, so a placeholder stands in.
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                    timeout=cfg.timeout_s, max_retries=cfg.max_retries)
        self.format = cfg.prompt_format
        self._format_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix=f"{name}-openai")
        self._publisher = None  # training: the adapters this engine loads into the server
        self.adapter: Optional[str] = None  # the adapter name requests use (None: the served model)

    @classmethod
    def load(cls, model_cfg, cfg: OpenAIEngineConfig, device: Optional[torch.device] = None, name: str = "policy",
             seed: int = 0) -> "OpenAIEngine":
        """The evaluator's engine: ``model_cfg`` names the policy the server runs (its tokenizer and shapes
        load here; its weights do not)."""
        tok = load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
        return cls(tok, cfg, model=model_skeleton(model_cfg, tok), served_model=cfg.served_model or model_cfg.name_or_path,
                   name=name, seed=seed, device=device)

    def close(self) -> None:
        """Unload a trainer's last adapter from the server (and delete its folder); close the client."""
        if self._publisher is not None and self.adapter is not None:
            self._lora_call("unload_lora_adapter", {"lora_name": self.adapter}, check=False)
            self._publisher.retire(self.adapter)
            self.adapter = None
        self._pool.shutdown(wait=True)
        self.client.close()

    def __repr__(self) -> str:  # never the client (it holds the key)
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.served_model!r})"

    # ------------------------------------------------------------------ the Engine protocol
    @property
    def device(self) -> torch.device:
        """Where the evaluator's own models (PRM, SSR's draft) run; the policy is the server's."""
        return self._device

    def clear_cache(self) -> None:
        """Forget the templated prompts and their ids (the server's prefix cache evicts on its own)."""
        self.core.clear()

    def extend(self, problems: Sequence[dict], cands: Sequence[Candidate], max_tokens: Optional[int] = None,
               stop_at_step: bool = True, greedy: bool = False) -> list[Candidate]:
        """See :meth:`frugal.inference.engine.Engine.extend`: one request per candidate."""
        return self.core.extend(problems, cands, max_tokens, stop_at_step, greedy, self._run_rows)

    def score(self, problems, cands, conts, batch_size: Optional[int] = None):
        """See :meth:`frugal.inference.engine.Engine.score` (the server's prompt log-probs)."""
        return served_score(self, problems, cands, conts, self._score_tokens)

    # ------------------------------------------------------------------ requests
    def _run_rows(self, items, max_new, stop_at_step, greedy, streams, limits):
        """All rows' requests, ``max_concurrency`` at a time; per row its generated ids and prompt length."""
        jobs = [(self.core.prompt_ids(prompt)[:-1] + list(tail), stream, limit, stop_at_step, greedy)
                for (prompt, tail), stream, limit in zip(items, streams, limits)]
        if self.format == "auto" and jobs:  # the first request decides ids or text, before the others go
            first = [self._complete(*jobs[0])]
            rest = list(self._pool.map(lambda job: self._complete(*job), jobs[1:]))
            results = first + rest
        else:
            results = list(self._pool.map(lambda job: self._complete(*job), jobs))
        self.counts.calls += 1
        rows = []
        for ids, new_ids, prompt_tokens, cached in results:
            self.counts.cached += cached
            self.counts.add(prompt_tokens - cached, context=cached)
            rows.append((new_ids, len(ids)))
        return rows

    def _complete(self, ids: list[int], stream, limit: int, stop_at_step: bool, greedy: bool):
        """One completion: (prompt ids, generated ids, prompt tokens charged, cached prompt tokens)."""
        openai = _client_module()
        seed = request_seed(stream)
        if self.format in ("auto", "ids"):
            try:
                return self._complete_ids(ids, seed, limit, stop_at_step, greedy)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as err:
                if self.format == "ids":
                    raise RuntimeError(f"engine.base_url={self.base_url}: the server refused a token-id prompt "
                                       f"({err}); set engine.prompt_format=text for a text-only server") from err
                with self._format_lock:
                    if self.format == "auto":
                        log.warning("engine.base_url=%s refused token ids as the prompt (%s): sending text from now "
                                    "on; continuations are re-tokenised, so they are not exactly what was sampled",
                                    self.base_url, err)
                        self.format = "text"
        return self._complete_text(ids, seed, limit, greedy)

    def _complete_ids(self, ids, seed, limit, stop_at_step, greedy):
        sampling, extra = request_sampling(self.cfg, greedy)
        extra.update(return_token_ids=True, include_stop_str_in_output=True, skip_special_tokens=False,
                     stop_token_ids=list(self.eos_ids))
        stops = self.core.stops(stop_at_step)
        if stops:
            sampling["stop"] = stops
        if seed is not None:
            sampling["seed"] = seed
        response = self._call(prompt=ids, max_tokens=limit, extra_body=extra,
                              **sampling)
        choice = response.choices[0]
        with self._format_lock:
            if self.format == "auto":
                self.format = "ids"
        new_ids = _extra(choice, "token_ids")
        if new_ids is None:  # the server took the ids but returns no token ids: tokenise its text, and (auto)
            new_ids = self._retokenize(choice, stops)  # send text from now on: it may drop matched stop strings
            with self._format_lock:
                if self.format != "text" and self.cfg.prompt_format == "auto":
                    log.warning("engine.base_url=%s returns no token ids (vLLM's return_token_ids): using text "
                                "prompts from now on (engine.prompt_format=text)", self.base_url)
                    self.format = "text"
        prompt_tokens, cached = _usage(response, len(ids))
        return ids, list(new_ids), prompt_tokens, cached

    def _complete_text(self, ids, seed, limit, greedy):
        sampling, _ = request_sampling(self.cfg, greedy)  # a text-only server gets the OpenAI fields only
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if seed is not None:
            sampling["seed"] = seed
        response = self._call(prompt=text, max_tokens=limit, **sampling)
        prompt_tokens, cached = _usage(response, len(ids))
        return ids, self._retokenize(response.choices[0]), prompt_tokens, cached

    def _retokenize(self, choice, stops: Sequence[str] = ()) -> list[int]:
        """The completion's text tokenised; a "stop" finish that no sent stop string explains is the EOS."""
        new_ids = self.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
        by_string = any(choice.text.endswith(s) for s in stops)
        if choice.finish_reason == "stop" and not by_string and self.eos_ids and not any(t in self.eos_ids for t in new_ids):
            new_ids = new_ids + [self.eos_ids[0]]
        return new_ids

    def _call(self, **kwargs):
        openai = _client_module()
        try:
            return self.client.completions.create(model=self.adapter or self.served_model, **kwargs)
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise ConnectionError(f"engine.base_url={self.base_url}: the server is unreachable after "
                                  f"{self.cfg.max_retries} retries ({type(err).__name__}: {err}); start it (e.g. "
                                  "`vllm serve <model>`) or fix engine.base_url") from err
        except openai.NotFoundError as err:
            raise RuntimeError(f"engine.base_url={self.base_url}: {err} (is engine.served_model={self.served_model!r} "
                               "the name the server serves?)") from err

    # ------------------------------------------------------------------ SSR's verification
    def _score_tokens(self, seqs, starts):
        """Prompt log-probs via ``echo`` + ``logprobs=1`` (vLLM's server returns them for token-id prompts)."""
        def one(job):
            seq, start = job
            response = self._call(prompt=list(seq), max_tokens=1, temperature=0.0, echo=True, logprobs=1,
                                  extra_body={"return_token_ids": True})
            lp = response.choices[0].logprobs
            logp = [float(x) for x in lp.token_logprobs[start:len(seq)]]
            top = [max(d.values()) if d else v for d, v in zip(lp.top_logprobs[start:len(seq)], logp)]
            return logp, [max(float(t), v) for t, v in zip(top, logp)]

        return list(self._pool.map(one, zip(seqs, starts)))


    # ------------------------------------------------------------------ training (server mode)
    def attach_trainer(self, publisher) -> None:
        """Take policies from a trainer (:meth:`update`): each adapter version is written by ``publisher`` to a
        folder the server can read and loaded through vLLM's runtime LoRA endpoints
        (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve <base> --enable-lora``). The served base model's name
        comes from the server when ``engine.served_model`` is not set."""
        openai = _client_module()
        try:
            models = self.client.models.list()
        except (openai.APIConnectionError, openai.APITimeoutError, openai.APIStatusError) as err:
            raise ConnectionError(f"vllm.server_url: no vLLM server answers at {self._root()} ({err}); start one with "
                                  "`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve <base model> --enable-lora`") from err
        if self.served_model is None:
            self.served_model = models.data[0].id
        self._publisher = publisher

    def update(self, peft_model) -> None:
        """Load the trainer's current adapter into the server under a new name and unload the previous one."""
        name, _, path = self._publisher.publish(peft_model)
        error = self._lora_call("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if error is not None:
            self._publisher.retire(name)
            raise RuntimeError(f"the vLLM server at {self._root()} rejected adapter {path} ({error})")
        previous, self.adapter = self.adapter, name
        if previous is not None:
            self._lora_call("unload_lora_adapter", {"lora_name": previous}, check=False)
            self._publisher.retire(previous)

    def sample(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> list[tuple[list[int], list[float]]]:
        """``num_samples`` completions of each token-id prompt (prompt-major) at ``engine.*`` settings, with the
        server's log-prob of each sampled token (``return_tokens_as_token_ids``: tokens come back as ids)."""
        sampling, extra = request_sampling(self.cfg, False)
        extra.update(return_tokens_as_token_ids=True, skip_special_tokens=False)
        response = self._call(prompt=prompt_ids, n=num_samples, max_tokens=self.cfg.max_new_tokens,
                              stop=list(self.cfg.stop_strings) or None, logprobs=0, seed=seed, extra_body=extra,
                              **sampling)
        return [(_token_ids(c.logprobs.tokens), [float(x) for x in c.logprobs.token_logprobs])
                for c in sorted(response.choices, key=lambda c: c.index)]

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        sampling, extra = request_sampling(self.cfg, True)
        response = self._call(prompt=prompt_ids, max_tokens=max_tokens, logprobs=0,
                              extra_body={**extra, "return_tokens_as_token_ids": True}, **sampling)
        return [_token_ids(c.logprobs.tokens) for c in sorted(response.choices, key=lambda c: c.index)]

    def _root(self) -> str:
        return self.base_url.rstrip("/").removesuffix("/v1")

    def _lora_call(self, endpoint: str, body: dict, check: bool = True) -> Optional[str]:
        """POST one of vLLM's LoRA endpoints; the refusal as text (status and body), or None."""
        import httpx

        openai = _client_module()
        try:
            self.client.post(f"/{endpoint}", body=body, cast_to=httpx.Response)
        except openai.APIStatusError as err:
            if check:
                return f"{err.status_code}: {err.response.text[:500]}"
        return None


# Sampling fields engine.* has no key for, sent at their neutral values: `vllm serve` fills every field a
# request leaves out from the model's generation_config.json (e.g. a repetition_penalty of 1.05), so a request
# without them would sample from another distribution than the HF backend (greedy too).
NEUTRAL_SAMPLING = {"min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
NOT_OPENAI = ("top_k", "min_p", "repetition_penalty")  # vLLM's extensions of the OpenAI completions schema


def request_sampling(cfg: EngineConfig, greedy: bool) -> tuple[dict, dict]:
    """(OpenAI keyword arguments, extra body fields) of a request at ``engine.*`` settings
    (:func:`~frugal.inference.engine.sampling_settings` plus :data:`NEUTRAL_SAMPLING`)."""
    sampling = {**sampling_settings(cfg, greedy), **NEUTRAL_SAMPLING}
    return sampling, {key: sampling.pop(key) for key in NOT_OPENAI if key in sampling}


def _token_ids(tokens: Sequence[str]) -> list[int]:
    """``return_tokens_as_token_ids``: each token comes back as "token_id:<id>"."""
    return [int(t.split(":", 1)[1]) for t in tokens]


def _extra(obj, key):
    """A field the OpenAI schema lacks (vLLM's ``token_ids``), from the client's pydantic model."""
    value = getattr(obj, key, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(key)
    return value


def _usage(response, fallback_prompt: int) -> tuple[int, int]:
    """(prompt tokens, cached prompt tokens) from ``usage`` (the prompt's length when a server omits it)."""
    usage = getattr(response, "usage", None)
    if usage is None:
        return fallback_prompt, 0
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if cached is None and isinstance(details, dict):
        cached = details.get("cached_tokens")
    prompt = int(usage.prompt_tokens)
    return prompt, min(int(cached or 0), prompt)

"""``engine.backend=openai``: the policy behind any OpenAI-compatible completions endpoint (``vllm serve``,
SGLang, TGI, a hosted API), through the ``openai`` client package (``pip install "frugal-rl[openai]"``).

    frugal eval engine.backend=openai engine.base_url=http://127.0.0.1:8000/v1 engine.served_model=<name> ...

One ``/completions`` request per candidate (each carries its own seed: (run seed, prompt, candidate
stream, tokens so far), :class:`frugal.inference.backends.ServedEngine`), at most
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
  so each request generates up to its token limit and ``Engine._apply`` cuts at the step end.
* ``auto`` (default) — ``ids``, switching to ``text`` with a warning when the server refuses the first
  ids request (HTTP 400 / 422).

Accounting from each response's ``usage``: ``prompt_tokens_details.cached_tokens`` (where the server
reports it; ``vllm serve --enable-prompt-tokens-details``) → ``Counts.cached``, the rest of
``prompt_tokens`` → ``prefill``; generated tokens → ``decode`` as kept by ``Engine._apply``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import torch

from frugal.inference.backends import ServedEngine
from frugal.inference.engine import EngineConfig

log = logging.getLogger("frugal.eval")

EXTRA = "openai"  # pyproject's optional dependency


def _client_module():
    try:
        import openai
    except ImportError as err:
        raise ImportError(f'engine.backend=openai needs the openai client package: pip install "frugal-rl[{EXTRA}]" '
                          f'(or pip install openai): {err}') from err
    return openai


class OpenAIEngine(ServedEngine):
    """The policy behind an OpenAI-compatible server at ``engine.base_url``."""

    def __init__(self, model_cfg, cfg: EngineConfig, device: Optional[torch.device] = None, name: str = "policy",
                 seed: int = 0):
        import os

        openai = _client_module()
        super().__init__(model_cfg, cfg, device, name=name, seed=seed)
        self.base_url = cfg.base_url
        self.served_model = cfg.served_model or model_cfg.name_or_path
        # A local server needs no key; the client insists on one, so a placeholder stands in.
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                    timeout=cfg.timeout_s, max_retries=cfg.max_retries)
        self.format = cfg.prompt_format
        self._format_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix=f"{name}-openai")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def __repr__(self) -> str:  # never the client (it holds the key)
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.served_model!r})"

    # ------------------------------------------------------------------ requests
    def _generate(self, items: list[tuple[str, list[int]]], max_new: int, stop_at_step: bool, greedy: bool,
                  streams: Sequence[tuple[int, int]], limits: Optional[Sequence[int]] = None, **kwargs):
        """All rows' requests, ``max_concurrency`` at a time; per row its generated ids and prompt length."""
        limits = limits or [max_new] * len(items)
        jobs = [(self.full_ids(prompt, tail), stream, limit, stop_at_step, greedy)
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
        seed = self.request_seed(stream)
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
        sampling = self.sampling(greedy)
        extra = {"return_token_ids": True, "include_stop_str_in_output": True, "skip_special_tokens": False,
                 "stop_token_ids": list(self.eos_ids)}
        if "top_k" in sampling:
            extra["top_k"] = sampling.pop("top_k")
        stops = self.stops(stop_at_step)
        if stops:
            sampling["stop"] = stops
        if seed is not None:
            sampling["seed"] = seed
        response = self._call(prompt=ids, max_tokens=self.token_budget(len(ids), limit), extra_body=extra,
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
        sampling = self.sampling(greedy)
        sampling.pop("top_k", None)  # not an OpenAI parameter
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if seed is not None:
            sampling["seed"] = seed
        response = self._call(prompt=text, max_tokens=self.token_budget(len(ids), limit), **sampling)
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
            return self.client.completions.create(model=self.served_model, **kwargs)
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise ConnectionError(f"engine.base_url={self.base_url}: the server is unreachable after "
                                  f"{self.cfg.max_retries} retries ({type(err).__name__}: {err}); start it (e.g. "
                                  "`vllm serve <model>`) or fix engine.base_url") from err
        except openai.NotFoundError as err:
            raise RuntimeError(f"engine.base_url={self.base_url}: {err} (is engine.served_model={self.served_model!r} "
                               "the name the server serves?)") from err

    # ------------------------------------------------------------------ SSR's verification
    def score_tokens(self, seqs, starts):
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

"""Engine backends: ``engine.backend=hf|vllm|openai`` behind the one :class:`~frugal.inference.engine.Engine`
interface, and :func:`make_engine`, which every recipe and script that evaluates a policy builds its
engine with.

* ``hf`` — :class:`~frugal.inference.engine.Engine` itself (Frugal's decoding core, a model in this
  process).
* ``vllm`` — :class:`frugal.inference.vllm_engine.VLLMEngine`: an in-process ``vllm.LLM``.
* ``openai`` — :class:`frugal.inference.openai_engine.OpenAIEngine`: any OpenAI-compatible completions
  server (``vllm serve``, SGLang, TGI, a hosted API).

The served backends subclass :class:`ServedEngine`, which keeps everything of ``Engine.extend`` that does
not depend on where the model runs — candidate bookkeeping, cutting the new tokens at the step delimiter
or a stop string (``Engine._apply``), continuing from the ids a candidate was sampled with
(``Engine._partial_ids``: never re-encoded text, which BPE does not round-trip), the candidates' random
stream keys and the :class:`~frugal.inference.engine.Counts` — and overrides only the model-running seam
``Engine._generate`` (plus the HF prompt-KV store, which a server's own prefix cache replaces).

Sampling on a served backend: a candidate's request carries the seed

    seed = mix(stream key, tokens the candidate generated before this call)

with the stream key of ``Engine`` "Sampling" (run seed, prompt, ``Candidate.stream``), so a run reproduces
and strategies at one seed share their first samples (common random numbers), as on ``hf``. The draws are
the server's own (its per-request generator), not ``StreamSampling``'s, so ``hf`` and ``vllm`` write
different samples from the same seed: their accuracies agree in distribution, not problem by problem.

FLOPs need the policy's shape (:func:`frugal.evaluator.flops.policy_shape`): a served engine's ``model`` is
the policy built on PyTorch's ``meta`` device from its ``config.json`` (a local folder or a Hub id; the
LoRA adapter's factors added from its ``adapter_config.json``): shapes only, no weights loaded or
allocated in this process.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from frugal.inference.engine import Engine, EngineConfig
from frugal.inference.decoding import mix


def make_engine(model_cfg, cfg: EngineConfig, device: Optional[torch.device] = None, name: str = "policy",
                seed: int = 0) -> Engine:
    """The policy's engine for ``cfg.backend`` (``model_cfg``: a ``frugal.inference.models.ModelConfig``)."""
    if cfg.backend == "hf":
        from frugal.inference.models import load_model

        model, tok = load_model(model_cfg, device)
        return Engine(model, tok, cfg, name=name, seed=seed)
    if cfg.backend == "vllm":
        from frugal.inference.vllm_engine import VLLMEngine

        return VLLMEngine(model_cfg, cfg, device, name=name, seed=seed)
    if cfg.backend == "openai":
        from frugal.inference.openai_engine import OpenAIEngine

        return OpenAIEngine(model_cfg, cfg, device, name=name, seed=seed)
    raise ValueError(f"engine.backend must be hf|vllm|openai, got {cfg.backend!r}")


def hf_config(cfg: EngineConfig) -> EngineConfig:
    """``cfg`` for an HF engine beside a served one (SSR's draft model): the same generation keys, the
    backend keys at their defaults."""
    from dataclasses import replace

    from frugal.inference.engine import BACKEND_KEYS

    defaults = EngineConfig()
    served = [k for b, keys in BACKEND_KEYS.items() for k in keys]
    return replace(cfg, backend="hf", **{k: getattr(defaults, k) for k in served})


def model_skeleton(model_cfg, tokenizer):
    """The policy on the ``meta`` device (shapes, config and generation config; no weights), its LoRA
    adapter's factors included, for FLOPs and the EOS ids."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from frugal.inference.models import tiny_random_model

    if model_cfg.name_or_path == "builtin:tiny-random":
        with torch.device("meta"):
            model = tiny_random_model(len(tokenizer), tokenizer)
    else:
        from frugal.inference.vllm_setup import vllm_model_path

        where = vllm_model_path(model_cfg.name_or_path)
        config = AutoConfig.from_pretrained(where, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        try:
            model.generation_config = GenerationConfig.from_pretrained(where, revision=model_cfg.revision)
        except OSError:
            pass  # no generation_config.json: the config's EOS id (from_config) stands
    if model_cfg.adapter:
        from peft import LoraConfig, get_peft_model

        with torch.device("meta"):
            model = get_peft_model(model, LoraConfig.from_pretrained(adapter_folder(model_cfg)))
    return model


def adapter_folder(model_cfg) -> str:
    if not Path(model_cfg.adapter).is_dir():
        raise FileNotFoundError(f"model.adapter: no adapter folder at {model_cfg.adapter}")
    return str(model_cfg.adapter)


def adapter_rank(model_cfg) -> int:
    """The LoRA rank in the adapter's ``adapter_config.json`` (vLLM reserves its LoRA slots by rank)."""
    path = Path(adapter_folder(model_cfg)) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"model.adapter: cannot read the LoRA rank `r` from {path}: {err}") from err


class ServedEngine(Engine):
    """An :class:`Engine` whose policy runs elsewhere (vLLM in process, or a server): ``Engine.extend``'s
    logic with ``_generate`` overridden by the subclass.

    ``batch_size`` and ``shared_prefix_min_tokens`` are the HF backend's (``EngineConfig`` refuses them
    here): every unfinished candidate of an ``extend`` call goes to the backend at once and the backend
    batches and caches prompt prefixes itself, charging ``Counts.cached`` for the prompt tokens its prefix
    cache served and ``prefill`` for the rest."""

    def __init__(self, model_cfg, cfg: EngineConfig, device: Optional[torch.device] = None, name: str = "policy",
                 seed: int = 0):
        from frugal.inference.models import load_tokenizer

        tok = load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
        cfg = copy.copy(cfg)  # not `replace`: __post_init__ refuses batch_size on a served backend, by design
        cfg.batch_size = 1 << 30  # one backend call per extend (the backend schedules its own batches)
        super().__init__(model_skeleton(model_cfg, tok), tok, cfg, name=name, seed=seed)
        self.model_cfg = model_cfg
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """Where the evaluator's own models (PRM, SSR's draft) run; the policy is the backend's."""
        return self._device

    def clear_prompt_cache(self) -> None:
        """Nothing to clear: the backend's prefix cache evicts on its own (and says what it served)."""

    def full_ids(self, prompt: str, tail: Sequence[int]) -> list[int]:
        """The whole sequence to continue: the templated prompt's ids then ``tail`` (its last token +
        the candidate's ids), as ``Engine.extend`` splits them for the HF prompt-KV store."""
        return self._prompt_ids(prompt)[:-1] + list(tail)

    def stops(self, stop_at_step: bool) -> list[str]:
        return list(self.cfg.stop_strings) + ([self.cfg.step_delimiter] if stop_at_step else [])

    @staticmethod
    def request_seed(stream: tuple[Optional[int], int]) -> Optional[int]:
        """The request's seed from (stream key, tokens generated before); None for greedy (no key)."""
        key, before = stream
        return None if key is None else mix(key, before)

    def sampling(self, greedy: bool) -> dict:
        """Temperature / top-p / top-k of ``engine.*`` (greedy: temperature 0)."""
        if greedy:
            return {"temperature": 0.0}
        return {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "top_k": self.cfg.top_k or -1}

    def token_budget(self, n_prompt: int, limit: int) -> int:
        """``limit`` new tokens, fewer when the prompt leaves less room in the context window."""
        room = self.context_window() - n_prompt
        if room < 1:
            raise ValueError(f"a prompt + partial solution of {n_prompt} tokens fills the {self.context_window()}-token "
                             f"context window: raise engine.max_model_len (vllm) or lower engine.max_new_tokens")
        return min(limit, room)

    def context_window(self) -> int:
        return 1 << 30

    def score(self, problems, cands, conts, batch_size: Optional[int] = None):
        """:meth:`Engine.score` (SSR's verification) on a served policy: the backend's prompt log-probs over
        [prompt + the candidate's ids + ``conts[i]``], one request per row (the backend batches them), every
        token charged as prefill and the LM head at the ``len(conts[i])`` scored positions."""
        out: list[tuple[list[float], list[float], int]] = [([], [], 0) for _ in cands]
        todo = [i for i, cont in enumerate(conts) if cont]
        if not todo:
            return out
        seqs, starts = [], []
        for i in todo:
            prompt = self.prompt_text(problems[cands[i].problem]["prompt"])
            head = self._prompt_ids(prompt) + self._partial_ids(cands[i])
            seqs.append(head + list(conts[i]))
            starts.append(len(head))
        for i, seq, start, (logp, top) in zip(todo, seqs, starts, self.score_tokens(seqs, starts)):
            out[i] = (logp, top, len(seq))
            self.counts.add(len(seq), scored=len(seq) - start)
        self.counts.calls += 1
        return out

    def score_tokens(self, seqs: Sequence[list[int]], starts: Sequence[int]) -> list[tuple[list[float], list[float]]]:
        """For SSR's verification: per sequence, the log-prob of each token from ``starts[i]`` on given the
        tokens before it, and the highest log-prob at that position (``evaluator/strategies/ssr.py``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score tokens")

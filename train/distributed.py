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
``forward``; ``train.policy_loss.selected_logprobs`` deliberately calls the decoder and the LM head of the
unwrapped model (to apply the head at selected positions only), which would bypass them and silently train
unsynchronised replicas. One explicit all-reduce of the (small) LoRA gradient vector per optimizer step is
simpler and independent of how the forward pass is organised.
"""

from __future__ import annotations

from typing import Any

import torch

# FSDP and ZeRO-3 shard the parameters and gather them in hooks around the wrapped model's forward, which
# the selected-position forward above bypasses; ZeRO-2/DDP-style configs run as plain data parallelism.
UNSUPPORTED = ("FSDP", "DEEPSPEED_ZERO3")


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
    if kind in UNSUPPORTED:
        raise NotImplementedError(
            f"accelerate config with {kind}: parameter sharding is not supported by frugal train yet (the loss "
            "calls the decoder directly, bypassing the sharded forward hooks). Use "
            "conf/accelerate/ddp.yaml (or zero2.yaml): LoRA training replicates the frozen base on every GPU "
            "and synchronises only the adapter's gradients.")
    _check_even(prompts_per_step, accelerator)
    return accelerator


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

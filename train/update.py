"""One policy-gradient step of ``frugal train`` after sampling and rewards: which tokens enter the loss
(:func:`select_tokens`) and the update on them (:func:`update_policy`, micro-batched by :func:`row_chunks`).
The training recipe (``frugal.recipes.train``) and ``scripts/bench_length.py`` call the same functions."""

from __future__ import annotations

import torch

from frugal.train import distributed as dist
from frugal.train.config import TrainConfig
from frugal.train.policy_loss import clipped_pg_loss, reference_logprobs, selected_logprobs
from frugal.train.token_selection import Selection


def select_tokens(cfg: TrainConfig, rollout, rewards: list[float], advantages: torch.Tensor) -> Selection:
    """The ``(row, position, advantage)`` triples of the step's loss: ``cfg.algo``'s own selection (every
    completion token for GRPO, S-GRPO's early-plus-sampled tokens, T-SPMO's trie transitions; train/config.py)."""
    return cfg.algo.select(rollout, rewards, advantages)


def update_policy(model, optimizer, scheduler, rollout, selection: Selection, cfg: TrainConfig, accelerator=None) -> dict:
    """``num_iterations`` passes over the batch; each pass accumulates gradients over micro-batches of rows
    and takes one optimizer step. The loss is normalised by the step's total selected tokens (over all
    ranks), so the result depends neither on the micro-batch size nor on how the batch is sharded."""
    model.train()
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    width = rollout.prompt_ids.shape[1]
    chunks = row_chunks(selection, cfg.optim.micro_batch_size)
    total = max(int(dist.sum_over_ranks([len(selection)], accelerator)[0]), 1)
    old_logp, ref_logp = {}, {}
    if cfg.algo.num_iterations > 1 or cfg.algo.beta > 0:
        with torch.no_grad():
            for i, sel in enumerate(chunks):
                if cfg.algo.num_iterations > 1:
                    old_logp[i] = selected_logprobs(model, input_ids, attention_mask, width, sel)
                if cfg.algo.beta > 0:
                    ref_logp[i] = reference_logprobs(model, input_ids, attention_mask, width, sel)
    # vLLM sampled the tokens: its log-probs are the behaviour policy of the truncated IS weights.
    behaviour = rollout.behaviour_logprobs
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.algo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, kl_sum, clip_sum, gap_sum, w_sum = 0.0, 0.0, 0.0, 0.0, 0.0
        for i, sel in enumerate(chunks):
            logp = selected_logprobs(model, input_ids, attention_mask, width, sel)
            out = clipped_pg_loss(logp, old_logp.get(i), ref_logp.get(i), sel.advantages.to(logp.device),
                                  cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.beta, normalizer=total,
                                  behaviour_logp=None if behaviour is None else behaviour[sel.rows, sel.positions],
                                  is_cap=cfg.generation.vllm_is_cap)
            out.loss.backward()
            loss_sum += out.loss.item()
            kl_sum += out.kl * len(sel) / total
            clip_sum += out.clip_fraction * len(sel) / total
            gap_sum += out.logprob_gap
            w_sum += out.is_weight * len(sel)
        params = [p for p in model.parameters() if p.requires_grad]
        # Sum the LoRA gradients over ranks explicitly: selected_logprobs bypasses DDP's forward hooks.
        dist.sync_gradients(params, accelerator)
        loss_sum, kl_sum, clip_sum, gap_sum, w_sum = dist.sum_over_ranks(
            [loss_sum, kl_sum, clip_sum, gap_sum, w_sum], accelerator)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        stats = {"loss": loss_sum, "kl": kl_sum, "clip_frac": clip_sum, "grad_norm": float(grad_norm)}
        if behaviour is not None and len(selection):  # over the loss's tokens (none: nothing to report)
            stats.update({"vllm/logprob_gap": gap_sum / total, "vllm/is_weight": w_sum / total})
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def row_chunks(selection: Selection, rows_per_chunk: int) -> list[Selection]:
    """Split the selected triples into micro-batches of at most ``rows_per_chunk`` distinct rows."""
    rows = torch.unique(selection.rows)
    chunks = []
    for start in range(0, rows.numel(), rows_per_chunk):
        keep = torch.isin(selection.rows, rows[start:start + rows_per_chunk])
        chunks.append(Selection(selection.rows[keep], selection.positions[keep], selection.advantages[keep]))
    return chunks

"""Selected-position log-probs and the clipped policy-gradient loss shared by GRPO, S-GRPO and T-SPMO.

**LM head only where it is needed.** A causal LM's logits cost ``tokens × vocab`` (49k for SmolLM2, more
than the whole decoder for a small model); S-GRPO trains on a subset of tokens, so we run the decoder,
gather the hidden states that predict the selected tokens, and apply the LM head to those rows only.
Because attention is causal, each row is cropped after its own last selected position (later tokens cannot
influence earlier log-probs), and rows of similar length run together so little padding is computed
(:func:`length_buckets`). The G completions of a group share their prompt, so the prompt is run once per
group into a KV cache that its rows reuse (``frugal.inference.decoding.PromptKV``, the helper the sampler, the
evaluator and the PRM use too; exact, gradients included).

**Loss** (GRPO's clipped surrogate, DeepSeekMath eq. 3, restricted to the selected set S):

    r_k   = exp(log π_θ(y_k | ·) − log π_old(y_k | ·))
    L_pg  = −(1/|S|) Σ_{k∈S} min(r_k A_k, clip(r_k, 1−ε_low, 1+ε_high) A_k)
    L_kl  = (β/|S|) Σ_{k∈S} [exp(ref_k − logp_k) − (ref_k − logp_k) − 1]      (k3 estimator, Schulman 2020)

With one optimisation pass per batch π_old = π_θ (detached), so r_k = 1 and the gradient is the plain
policy gradient A_k ∇log π_θ; the clip matters when ``num_iterations > 1``.

**Off-policy correction** (``generation.backend=vllm``). The tokens were drawn by vLLM, whose
probabilities μ differ slightly from the trainer's (other kernels, often another dtype). With vLLM's
per-token log-probs as the behaviour policy, each token's term is weighted by a truncated importance
weight (truncated IS, Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy RL
training"; TRL's ``vllm_importance_sampling_correction``):

    w_k   = min(exp(log π_old(y_k | ·) − log μ(y_k | ·)), C)        (detached; C = generation.vllm_is_cap)
    L_pg  = −(1/|S|) Σ_{k∈S} w_k · min(r_k A_k, clip(r_k, 1−ε_low, 1+ε_high) A_k)
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from frugal.inference.decoding import PromptKV, cache_kw
from frugal.train.token_selection import Selection


def decoder_and_head(model):
    """The transformer body and the output projection of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class PolicyLogprobs(torch.nn.Module):
    """``selected_logprobs`` of a causal LM as a module's ``forward``.

    FSDP gathers a sharded module's weights in hooks around its ``forward``; ``selected_logprobs`` calls
    the decoder and the LM head directly (never the LM's own ``forward``), so it is this module that gets
    sharded (``frugal.train.distributed.shard_policy``): its hooks then wrap exactly the computation that runs.
    One process and DDP never build it. Sharded, the prompts are not shared: a layer's weights are freed
    after its backward pass, but the prompt's cached K/V (computed by the same layer in the first of its
    two calls) still needs them afterwards, and FSDP does not track that second path.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, prompt_width: int, selection: Selection) -> torch.Tensor:
        return selected_logprobs(self.model, input_ids, attention_mask, prompt_width, selection, share_prompts=False)

    def disable_adapter(self):
        """The adapter switched off (``reference_logprobs``), as on the wrapped peft model."""
        return self.model.disable_adapter()


def selected_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      selection: Selection, *, share_prompts: bool = True) -> torch.Tensor:
    """log π(y | prefix) for each selected completion token; ``[K]``.

    The token at completion position ``p`` sits at column ``prompt_width + p`` and is predicted by the
    hidden state one column earlier. ``model`` may be a ``PolicyLogprobs`` (FSDP-sharded); with
    ``share_prompts=False`` every row runs its own prompt (the sharded path; same values).
    """
    if isinstance(model, PolicyLogprobs):  # FSDP: through its forward, around which the shards are gathered
        return model(input_ids, attention_mask, prompt_width, selection)
    if len(selection) == 0:
        return torch.zeros(0, device=input_ids.device)
    # Only rows that own a selected token need the forward pass at all.
    used_rows, row_index = torch.unique(selection.rows, return_inverse=True)
    cols = prompt_width + selection.positions - 1  # the column whose hidden state predicts each token
    ids, mask = input_ids[used_rows], attention_mask[used_rows]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
    # A row needs its columns up to its own last selected one (causal attention: later tokens cannot
    # change earlier log-probs). Rows of similar length run together so little padding is computed.
    row_last = torch.zeros(len(used_rows), dtype=torch.long, device=cols.device).scatter_reduce(
        0, row_index, cols, reduce="amax")
    decoder, head = decoder_and_head(model)
    prompts, which, start = _shared_prompts(decoder, ids, mask, prompt_width) if share_prompts else (None, None, 0)
    logp = torch.empty(len(selection), device=input_ids.device)
    for bucket in length_buckets(row_last.tolist()):
        rows = torch.tensor(bucket, device=ids.device)
        end = int(row_last[rows].max()) + 1
        sub_cache = None if prompts is None else prompts.rows(which[rows])
        hidden = decoder(input_ids=ids[rows, start:end], attention_mask=mask[rows, :end],
                         position_ids=position_ids[rows, start:end], **{cache_kw(): sub_cache},
                         use_cache=sub_cache is not None).last_hidden_state
        local = torch.full((len(used_rows),), -1, dtype=torch.long, device=ids.device)
        local[rows] = torch.arange(len(bucket), device=ids.device)
        mine = (local[row_index] >= 0).nonzero().squeeze(1)  # the selected tokens of this bucket's rows
        logits = head(hidden[local[row_index[mine]], cols[mine] - start]).float()
        targets = ids[row_index[mine], cols[mine] + 1]
        logp = logp.index_put((mine,), torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))
    return logp


# What one more decoder call costs, in padded columns (per-layer launch and Python overhead), set from a
# CPU measurement (docs/benchmarks.md).
BUCKET_OVERHEAD = 16


def length_buckets(lengths: list[int], per_call_overhead: int | None = None) -> list[list[int]]:
    """Split rows into groups that run as one padded batch each, minimising the padded columns computed,
    Σ_bucket |bucket| · max length, plus ``per_call_overhead`` column-equivalents per extra decoder call
    (exact dynamic programme over rows sorted by length; a step has tens of rows)."""
    overhead = BUCKET_OVERHEAD if per_call_overhead is None else per_call_overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # last bucket = sorted rows i..j-1, padded to the longest (row j-1)
            cost = best[i] + (j - i) * (lengths[order[j - 1]] + 1) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def _shared_prompts(decoder, ids, mask, prompt_width: int):
    """The KV of each distinct prompt (all but its last token) as a :class:`PromptKV`, which prompt each row
    uses, and the first column the rows still run; ``(None, None, 0)`` when no prompt repeats (rows then run
    whole).

    The G rows of a group repeat one prompt: it is run once and its KV rows are gathered for its
    completions, so only the rest runs per row. The result is the same function of the weights (gradients
    flow into the LoRA weights through the shared cache), but the prompt's share of the forward pass, the
    backward pass and the saved activations shrinks G-fold.
    """
    head = prompt_width - 1
    # Activation checkpointing drops the cache in training mode, so it takes the plain path.
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())
    if head < 1 or checkpointing:
        return None, None, 0
    prompts = torch.cat([ids[:, :head], mask[:, :head]], dim=1)
    distinct, which = torch.unique(prompts, dim=0, return_inverse=True)
    if distinct.shape[0] == ids.shape[0]:
        return None, None, 0
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((distinct.shape[0],), ids.shape[0], device=ids.device)
    first = first.scatter_reduce(0, which, rows, reduce="amin")  # one representative row per prompt
    shared, _ = PromptKV.prefill(decoder, ids[first, :head], mask[first, :head])
    return shared, which, head


def full_logits_logprobs(model, input_ids, attention_mask, prompt_width: int, selection: Selection):
    """Reference implementation: full-vocabulary logits for every token, then pick. Tests only."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = input_ids[:, 1:]
    per_token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return per_token[selection.rows, prompt_width + selection.positions - 1]


@dataclass
class LossOutput:
    loss: torch.Tensor
    policy_loss: float
    kl: float
    clip_fraction: float
    num_tokens: int
    logprob_gap: float = 0.0  # Σ_k |log π_old − log μ| over the tokens (0 without a behaviour policy)
    is_weight: float = 1.0  # mean truncated importance weight w_k


def clipped_pg_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                    advantages: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                    beta: float = 0.0, normalizer: Optional[float] = None,
                    behaviour_logp: Optional[torch.Tensor] = None, is_cap: float = 2.0) -> LossOutput:
    """The loss above over K selected tokens. ``normalizer`` defaults to K (token mean).
    ``behaviour_logp``: the sampler's log-probs of the same tokens (vLLM); None = the policy sampled them."""
    k = logp.numel()
    if k == 0:
        zero = logp.sum()  # keeps the graph valid when nothing was selected
        return LossOutput(zero, 0.0, 0.0, 0.0, 0)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    pg_term = -torch.minimum(unclipped, clipped)
    gap, is_weight = 0.0, 1.0
    if behaviour_logp is not None:
        diff = old.detach() - behaviour_logp.to(old.dtype)
        weight = torch.exp(diff).clamp(max=is_cap)
        pg_term = pg_term * weight
        gap, is_weight = float(diff.abs().sum()), float(weight.mean())
    per_token = pg_term
    kl_term = torch.zeros_like(per_token)
    if beta > 0 and ref_logp is not None:
        delta = ref_logp - logp
        kl_term = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl_term
    norm = float(normalizer) if normalizer else float(k)
    loss = per_token.sum() / norm
    clip_frac = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float().mean().item()
    return LossOutput(loss, float(pg_term.detach().sum() / norm), float(kl_term.detach().mean()), clip_frac, k,
                      gap, is_weight)


def reference_logprobs(model, input_ids, attention_mask, prompt_width: int, selection: Selection):
    """Log-probs under the base model: the same weights with the LoRA adapter switched off, so no second
    copy of the model is held in memory."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), ctx:
        return selected_logprobs(model, input_ids, attention_mask, prompt_width, selection)

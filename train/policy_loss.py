"""Selected-position log-probs and the clipped policy-gradient loss shared by GRPO, S-GRPO and T-SPMO.

**LM head only where it is needed.** A causal LM's logits cost ``tokens × vocab`` (49k for SmolLM2, more
than the whole decoder for a small model); S-GRPO trains on a subset of tokens, so we run the decoder,
gather the hidden states that predict the selected tokens, and apply the LM head to those rows only.
Because attention is causal, we also crop the batch after the last selected position: later tokens cannot
influence earlier log-probs. The G completions of a group share their prompt, so the prompt is run once
per group into a KV cache that its rows reuse (``_decode_sharing_prompts``; exact, gradients included).

**Loss** (GRPO's clipped surrogate, DeepSeekMath eq. 3, restricted to the selected set S):

    r_k   = exp(log π_θ(y_k | ·) − log π_old(y_k | ·))
    L_pg  = −(1/|S|) Σ_{k∈S} min(r_k A_k, clip(r_k, 1−ε_low, 1+ε_high) A_k)
    L_kl  = (β/|S|) Σ_{k∈S} [exp(ref_k − logp_k) − (ref_k − logp_k) − 1]      (k3 estimator, Schulman 2020)

With one optimisation pass per batch π_old = π_θ (detached), so r_k = 1 and the gradient is the plain
policy gradient A_k ∇log π_θ; the clip matters when ``num_iterations > 1``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from train.token_selection import Selection


def _decoder_and_head(model):
    """The transformer body and the output projection of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def selected_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      selection: Selection) -> torch.Tensor:
    """log π(y | prefix) for each selected completion token; ``[K]``.

    The token at completion position ``p`` sits at column ``prompt_width + p`` and is predicted by the
    hidden state one column earlier.
    """
    if len(selection) == 0:
        return torch.zeros(0, device=input_ids.device)
    last_col = prompt_width + int(selection.positions.max())
    input_ids, attention_mask = input_ids[:, : last_col + 1], attention_mask[:, : last_col + 1]
    # Only rows that own a selected token need the forward pass at all.
    used_rows, row_index = torch.unique(selection.rows, return_inverse=True)
    decoder, head = _decoder_and_head(model)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
    hidden, first_col = _decode_sharing_prompts(decoder, input_ids[used_rows], attention_mask[used_rows],
                                                position_ids[used_rows], prompt_width)
    cols = prompt_width + selection.positions - 1
    picked = hidden[row_index, cols - first_col]  # [K, H]
    logits = head(picked).float()
    targets = input_ids[used_rows][row_index, cols + 1]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _decode_sharing_prompts(decoder, ids, mask, position_ids, prompt_width: int) -> tuple[torch.Tensor, int]:
    """The decoder's last hidden states for ``ids``, and the first column they cover.

    The G rows of a group repeat one prompt. Each distinct prompt (all but its last token, whose hidden
    state predicts the first completion token) is run once into a KV cache whose rows are then gathered
    for its completions, and only the rest runs per row. The result is the same function of the weights
    (gradients flow into the LoRA weights through the shared cache), but the prompt's share of the forward
    pass, the backward pass and the saved activations shrinks G-fold (for a 38-token prompt and ~28-token
    completions, about half of the decoder's work). Rows with distinct prompts take the plain path.
    """
    head = prompt_width - 1
    # Activation checkpointing drops the cache in training mode, so it takes the plain path.
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())
    if head >= 1 and not checkpointing:
        prompts = torch.cat([ids[:, :head], mask[:, :head]], dim=1)
        distinct, which = torch.unique(prompts, dim=0, return_inverse=True)
        if distinct.shape[0] < ids.shape[0]:
            from transformers import DynamicCache

            rows = torch.arange(ids.shape[0], device=ids.device)
            first = torch.full((distinct.shape[0],), ids.shape[0], device=ids.device)
            first = first.scatter_reduce(0, which, rows, reduce="amin")  # one representative row per prompt
            cache = DynamicCache(config=decoder.config)
            decoder(input_ids=ids[first, :head], attention_mask=mask[first, :head],
                    position_ids=position_ids[first, :head], cache=cache, use_cache=True)
            cache.batch_select_indices(which)
            hidden = decoder(input_ids=ids[:, head:], attention_mask=mask, position_ids=position_ids[:, head:],
                             cache=cache, use_cache=True).last_hidden_state
            return hidden, head
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    return hidden, 0


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


def clipped_pg_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                    advantages: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                    beta: float = 0.0, normalizer: Optional[float] = None) -> LossOutput:
    """The loss above over K selected tokens. ``normalizer`` defaults to K (token mean)."""
    k = logp.numel()
    if k == 0:
        zero = logp.sum()  # keeps the graph valid when nothing was selected
        return LossOutput(zero, 0.0, 0.0, 0.0, 0)
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    kl_term = torch.zeros_like(per_token)
    if beta > 0 and ref_logp is not None:
        delta = ref_logp - logp
        kl_term = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl_term
    norm = float(normalizer) if normalizer else float(k)
    loss = per_token.sum() / norm
    clip_frac = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float().mean().item()
    return LossOutput(loss, float(-torch.minimum(unclipped, clipped).detach().sum() / norm), float(kl_term.detach().mean()),
                      clip_frac, k)


def reference_logprobs(model, input_ids, attention_mask, prompt_width: int, selection: Selection):
    """Log-probs under the base model: the same weights with the LoRA adapter switched off, so no second
    copy of the model is held in memory."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), ctx:
        return selected_logprobs(model, input_ids, attention_mask, prompt_width, selection)

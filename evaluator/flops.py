"""Token counts → FLOPs, per model.

Forward FLOPs of a decoder-only transformer (Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", Table 1): a token at context length c costs

    C(c) ≈ 2·N + 2·n_layer·c·d_attn  (+ 2·N_head when the token's logits are computed)

where N counts the parameters of the decoder blocks that take part in a matrix multiply for that token
(every weight matrix, LoRA factors included; the input embedding is a lookup and is free), N_head the
LM head's, and the second term is attention scores and the weighted sum of values. Summed over
processed tokens:

    FLOPs = 2·N·(prefill + decode) + 2·N_head·(decode + scored) + 2·n_layer·d_attn·Σ c

with Σ c = ``Counts.attention`` from :mod:`frugal.inference.engine`. The LM head runs only for generated
tokens: the decoding core (``frugal.inference.decoding``) keeps the logits of the last position of a prefill
only (``logits_to_keep=1``), and that position's logits are the first generated token's. ``scored`` counts prefill tokens whose logits are
computed as well (SSR's target verification of a drafted step). (For SmolLM2-135M the tied head is 28M of its
135M matrix parameters, so charging it to every prefill token would overstate prefill by ~26%.) A PRM
reads hidden states: N = its decoder blocks, LoRA and scoring head, and N_head = 0, unless it has
``logprob_features`` (then its LM head runs on every step token: ``scored`` = those tokens). Backward passes are not involved (inference only). Norms, activations and softmax are
ignored (< 1% at these sizes). Counted, not counted: a row that stops early leaves the batch (nothing
runs for it after its end, as in a serving engine with continuous batching), so it is charged for no
padding steps; every generated token is charged one pass of the decoder body, though the last one of a call
only runs through it if a later call continues the candidate (charged there as prefill, once per distinct
candidate with per-candidate KV reuse): one token per row and call too many, so the counts are a slight
upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugal.inference.engine import Counts


@dataclass
class ModelShape:
    params: int  # N: decoder parameters in matrix multiplies per token (no LM head)
    layers: int
    d_attn: int  # n_heads · head_dim (query width)
    head: int = 0  # N_head: LM head parameters, applied per generated token only

    def flops(self, counts: Counts) -> float:
        return (2.0 * self.params * counts.tokens + 2.0 * self.head * (counts.decode + counts.scored)
                + 2.0 * self.layers * self.d_attn * counts.attention)


def _hf_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base.config


def _attn_shape(config) -> tuple[int, int]:
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def policy_shape(model) -> ModelShape:
    """Shape of a causal LM that computes logits for every generated token (and only those)."""
    base, config = _hf_config(model)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied matrix is listed once
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    tied = head is not None and head.weight is embed
    # The lookup is free; the head (a tied matrix is still multiplied once, as the head) is its own term.
    params = sum(unique.values()) - embed.numel() - (0 if tied else head_params)
    layers, d_attn = _attn_shape(config)
    return ModelShape(params, layers, d_attn, head_params)


def prm_shape(prm) -> ModelShape:
    """Shape of a ``frugal.train.prm.PRM`` (or anything with ``model`` and ``num_nonembedding_parameters``): the
    decoder blocks (LoRA factors included) and the scoring head; the LM head (N_head) only for a PRM with
    ``logprob_features``, which runs it on every step token (only its candidate rows: ``PRM.lm_head_rows``)."""
    base, config = _hf_config(prm.model)
    extra = sum(p.numel() for n, p in prm.model.named_parameters() if "lora_" in n)
    extra += sum(p.numel() for p in prm.head.parameters()) if hasattr(prm, "head") else 0
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if lm_head is not None and lm_head.weight is not base.get_input_embeddings().weight:
        extra -= lm_head.weight.numel()  # counted in num_nonembedding_parameters, but never run
    layers, d_attn = _attn_shape(config)
    uses_lm_head = lm_head is not None and getattr(prm, "evidence", None) is not None  # logprob_features
    return ModelShape(int(prm.num_nonembedding_parameters) + extra, layers, d_attn,
                      prm.lm_head_rows * lm_head.weight.shape[1] if uses_lm_head else 0)

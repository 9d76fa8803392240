"""Token counts → FLOPs, per model.

Forward FLOPs of a decoder-only transformer (Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", Table 1): a token at context length c costs

    C(c) ≈ 2·N + 2·n_layer·c·d_attn

where N counts the parameters that take part in a matrix multiply for that token (every weight matrix of
the blocks, plus the LM head when logits are computed; the input embedding is a lookup and is free) and
the second term is attention scores and the weighted sum of values. Summed over processed tokens:

    FLOPs = 2·N·(prefill + decode) + 2·n_layer·d_attn·Σ c

with Σ c = ``Counts.attention`` from :mod:`evaluator.engine`. For the policy N includes the LM head
(tied embeddings: the shared matrix counted once); for a PRM it is ``num_nonembedding_parameters`` (the
PRM reads hidden states, it never applies the LM head) plus its LoRA and head weights. Backward passes
are not involved (inference only). Norms, activations and softmax are ignored (< 1% at these sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluator.engine import Counts


@dataclass
class ModelShape:
    params: int  # N: parameters in matrix multiplies per token
    layers: int
    d_attn: int  # n_heads · head_dim (query width)

    def flops(self, counts: Counts) -> float:
        return 2.0 * self.params * counts.tokens + 2.0 * self.layers * self.d_attn * counts.attention


def _hf_config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, base.config


def _attn_shape(config) -> tuple[int, int]:
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def policy_shape(model) -> ModelShape:
    """Shape of a causal LM that computes logits for every generated token."""
    base, config = _hf_config(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    embed = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    tied = head is not None and head.weight is embed
    # The lookup is free; a tied matrix is still multiplied once, as the LM head.
    params = sum(unique.values()) - (0 if tied else embed.numel())
    layers, d_attn = _attn_shape(config)
    return ModelShape(params, layers, d_attn)


def prm_shape(prm) -> ModelShape:
    """Shape of a ``train.prm.PRM`` (or anything with ``model`` and ``num_nonembedding_parameters``)."""
    _, config = _hf_config(prm.model)
    extra = sum(p.numel() for n, p in prm.model.named_parameters() if "lora_" in n)
    extra += sum(p.numel() for p in prm.head.parameters()) if hasattr(prm, "head") else 0
    layers, d_attn = _attn_shape(config)
    return ModelShape(int(prm.num_nonembedding_parameters) + extra, layers, d_attn)

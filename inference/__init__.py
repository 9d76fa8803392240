"""The inference layer that training and search share: the engine protocol and its sibling backends
(``hf``, ``vllm``, ``openai``), the decoding core, the per-candidate KV store, model and tokenizer
loading, and the one vLLM constructor."""

"""Frugal: compute-frugal RL fine-tuning (S-GRPO, T-SPMO, GRPO), process reward models and a
compute-accounted evaluator for LLM reasoning.

One import name. The repository keeps its folders at the top level (``conf/ tasks/ rewards/ runtime/
inference/ train/ evaluator/ recipes/``); ``pyproject.toml`` maps each to a subpackage of ``frugal``
(listed lowest layer first: a module imports its own layer or lower ones, ``tests/test_layers.py``):

    frugal.conf       Hydra configs
    frugal.tasks      datasets and generated tasks
    frugal.rewards    answer extraction, verification, reward functions (TRL's signature)
    frugal.runtime    config machinery, run dirs, atomic IO, checkpoint discovery, secrets, threads and seeds
    frugal.inference  model loading, the decoding core, the KV store, the generation engines and backends
    frugal.train      rollouts, S-GRPO / T-SPMO / GRPO losses and update, LoRA, PRM, checkpoints, configs
    frugal.evaluator  FLOPs, search strategies, TTSPM, harness
    frugal.recipes    the ``frugal <recipe>`` entry points (``python -m frugal.recipes.train``)
"""

__version__ = "0.1.0"

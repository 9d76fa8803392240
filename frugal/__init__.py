"""Frugal: compute-frugal RL fine-tuning (S-GRPO, T-SPMO, GRPO), process reward models and a
compute-accounted evaluator for LLM reasoning.

One import name. The repository keeps its folders at the top level (``train/ rewards/ tasks/
evaluator/ recipes/ conf/``); ``pyproject.toml`` maps each to a subpackage of ``frugal``:

    frugal.train      models, rollouts, S-GRPO / T-SPMO / GRPO losses, PRM, checkpoints, configs
    frugal.rewards    answer extraction, verification, reward functions (TRL's signature)
    frugal.tasks      datasets and generated tasks
    frugal.evaluator  engine with token accounting, FLOPs, search strategies, TTSPM, harness
    frugal.recipes    the ``frugal <recipe>`` entry points (``python -m frugal.recipes.train``)
    frugal.conf       Hydra configs
"""

__version__ = "0.1.0"

"""Group-relative advantages (GRPO / S-GRPO).

For a prompt q with G sampled completions o_1..o_G and rewards R_1..R_G (Shao et al., 2024, DeepSeekMath,
eq. 3; S-GRPO: Lee & Tong, 2025, "Token-Efficient RL for LLM Reasoning", arXiv:2504.20834):

    A_i = (R_i − mean_j R_j) / (std_j R_j + eps)

A group whose rewards are all equal carries no preference between its completions: every A_i is 0, so it
contributes nothing to the loss. We count such groups because a run full of them is not learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupAdvantages:
    advantages: torch.Tensor  # [N] one per completion, rows ordered prompt-major
    zero_variance_groups: int
    num_groups: int


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale_by_std: bool = True) -> GroupAdvantages:
    """``rewards``: [N] with N = num_groups * group_size, rows of one prompt adjacent."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    # Population std (unbiased=False) keeps A well defined for G=2 and matches the paper's formula.
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    centered = grouped - mean
    adv = centered / (std + eps) if scale_by_std else centered
    zero_var = std.squeeze(1) < 1e-8
    adv[zero_var] = 0.0
    return GroupAdvantages(adv.view(-1), int(zero_var.sum()), grouped.shape[0])

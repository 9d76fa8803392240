"""Which completion tokens enter the policy-gradient loss.

Every algorithm produces the same thing: a set of ``(row, position, advantage)`` triples, where
``position`` indexes the completion (0 = first generated token). ``frugal.train.policy_loss`` turns them into
log-probabilities by evaluating the LM head only there.

* GRPO (full-token baseline): every completion token, each with its sequence's advantage.
* S-GRPO (Lee & Tong, 2025, arXiv:2504.20834): the first ``k_early`` tokens of each completion are
  always kept; each later token t is kept independently with probability

      p(t) = p_keep · decay^(t − k_early)            (decay = 1: uniform p_keep)

  Early tokens are where a short reasoning trace commits to its approach, so they are prioritised; the
  rest are subsampled, which cuts the LM-head and backward cost roughly in proportion to the tokens
  dropped and, because attention is causal, lets us crop each batch after its last kept position.
* T-SPMO (Lee & Tong, 2025): one triple per token transition at a branch point of the prefix trie over
  a group's completions, with advantage A(p, v) = V(p·v) − V(p); see ``frugal.train.tspmo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    rows: torch.Tensor  # [K] long
    positions: torch.Tensor  # [K] long, index into the completion
    advantages: torch.Tensor  # [K] float

    def __len__(self) -> int:
        return int(self.rows.numel())


def select_all(completion_mask: torch.Tensor, advantages: torch.Tensor) -> Selection:
    """GRPO: every real completion token of every row with a non-zero advantage."""
    keep = completion_mask.bool() & (advantages != 0).unsqueeze(1)
    rows, positions = keep.nonzero(as_tuple=True)
    return Selection(rows, positions, advantages[rows])


def select_stochastic(completion_mask: torch.Tensor, advantages: torch.Tensor, k_early: int,
                      p_keep: float, decay: float = 1.0, generator: torch.Generator | None = None) -> Selection:
    """S-GRPO: keep the first ``k_early`` tokens, later ones with probability ``p_keep·decay^(t−k_early)``."""
    n, width = completion_mask.shape
    t = torch.arange(width, device=completion_mask.device).float()
    prob = torch.where(t < k_early, torch.ones_like(t), p_keep * decay ** (t - k_early).clamp(min=0))
    draws = torch.rand((n, width), generator=generator, device="cpu").to(completion_mask.device)
    keep = (draws < prob) & completion_mask.bool() & (advantages != 0).unsqueeze(1)
    rows, positions = keep.nonzero(as_tuple=True)
    return Selection(rows, positions, advantages[rows])


def expected_keep_fraction(length: int, k_early: int, p_keep: float, decay: float = 1.0) -> float:
    """Expected share of a ``length``-token completion that S-GRPO keeps (for docs and tests)."""
    if length <= 0:
        return 0.0
    kept = sum(1.0 if t < k_early else p_keep * decay ** (t - k_early) for t in range(length))
    return kept / length

"""Which completion tokens enter the policy-gradient loss.

Every algorithm produces the same thing: a set of ``(row, position, advantage)`` triples, where
``position`` indexes the completion (0 = first generated token). ``frugal.train.policy_loss`` turns them into
log-probabilities by evaluating the LM head only there.

* GRPO (full-token baseline): every completion token, each with its sequence's advantage.
* S-GRPO (Lee & Tong, 2025, arXiv:2504.20834): the first ``k_early`` tokens of each completion are
  always kept; each later token t is kept independently with probability

      p(t) = p_keep · decay^(t − k_early)            (decay = 1: uniform p_keep)

  Early tokens are where a short reasoning trace commits to its approach, so they are prioritised; the
  rest are subsampled, which cuts the LM-head cost in proportion to the tokens dropped. The decoder's
  forward and backward passes are cut only by cropping: attention is causal, so a row's tokens after its
  last kept position cannot change any kept log-prob and are never run (``frugal.train.policy_loss``).
  With ``decay = 1`` the last kept token of a long completion sits near its end, so the crop saves almost
  nothing; with ``decay < 1`` it comes early (:func:`expected_last_position`), and that is where S-GRPO
  saves time, not only memory, at reasoning lengths.
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


def keep_probabilities(length: int, k_early: int, p_keep: float, decay: float = 1.0) -> list[float]:
    """``p(t)`` for completion positions ``t = 0 .. length-1`` (the schedule above)."""
    return [1.0 if t < k_early else p_keep * decay ** (t - k_early) for t in range(length)]


def expected_keep_fraction(length: int, k_early: int, p_keep: float, decay: float = 1.0) -> float:
    """Expected share of a ``length``-token completion that S-GRPO keeps (for docs and tests)."""
    if length <= 0:
        return 0.0
    return sum(keep_probabilities(length, k_early, p_keep, decay)) / length


def expected_last_position(length: int, k_early: int, p_keep: float, decay: float = 1.0) -> float:
    """Expected position of the last kept token of a ``length``-token completion (0-based), given that at
    least one is kept: the decoder runs a row up to there, so ``(E[last] + 1) / length`` is about the share
    of the full-token forward and backward work that S-GRPO's update does on that row.

    Draws are independent, so the last kept position is j with probability p(j) · Π_{t>j} (1 − p(t)).
    """
    probs = keep_probabilities(length, k_early, p_keep, decay)
    none_after, weighted, total = 1.0, 0.0, 0.0  # none_after = Π_{t>j} (1 − p(t)), built from the end
    for j in range(length - 1, -1, -1):
        last_here = probs[j] * none_after
        weighted += j * last_here
        total += last_here
        none_after *= 1.0 - probs[j]
    return weighted / total if total > 0 else float("nan")

"""The PRM side of search: :class:`CountingPRM` wraps a PRM (``frugal.train.prm.PRM``, a Hub family from
:mod:`frugal.evaluator.hub_prm`, or anything with the same ``score`` / ``score_partial`` API) and keeps the
same :class:`~frugal.inference.engine.Counts` for it that engines keep for the policy.

The counts come from the PRM's own ``last_tokens`` and ``last_attention`` when it reports them (what it
ran: ``frugal.train.prm.PRM.score`` runs each distinct prompt once per call and every solution's step
tokens over that prompt's KV cache, and ``last_lm_tokens`` counts its LM head for log-prob features);
a PRM that reports only ``last_tokens`` is charged one key per token.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from frugal.inference.engine import Candidate, Counts


@runtime_checkable
class PRMLike(Protocol):
    """What the evaluator needs from a PRM (``frugal.train.prm.PRM`` satisfies it). A PRM may also report
    what its last call ran (:class:`CountsTokens`, :class:`CountsAttention`, :class:`CountsLMHead`);
    :class:`CountingPRM` counts from that (a PRM that reports nothing is counted by its calls only)."""

    def score(self, prompts: Sequence[Any], steps_batch: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def score_partial(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[list[float]]: ...


@runtime_checkable
class CountsTokens(Protocol):
    """A PRM that reports how many tokens its last call ran."""

    last_tokens: int


@runtime_checkable
class CountsAttention(CountsTokens, Protocol):
    """... and Σ over them of the keys each one attended to (the attention FLOPs term)."""

    last_attention: int


@runtime_checkable
class CountsLMHead(Protocol):
    """A PRM whose last call also ran its LM head at ``last_lm_tokens`` positions (log-prob features)."""

    last_lm_tokens: int


class CountingPRM:
    """A PRM plus its token counts. ``score_candidates`` sets ``cand.scores`` for a batch of candidates in
    one ``score_partial`` call (a trailing unfinished step counts as a step)."""

    def __init__(self, prm: PRMLike, name: str = "prm"):
        self.prm, self.name = prm, name
        self.counts = Counts()

    def score_partial(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[list[float]]:
        scores = self.prm.score_partial(prompts, texts)
        self._charge(prompts, texts)
        return scores

    def score_candidates(self, problems: Sequence[dict], cands: Sequence[Candidate]) -> None:
        if not cands:
            return
        scores = self.score_partial([problems[c.problem]["prompt"] for c in cands], [c.text for c in cands])
        for cand, s in zip(cands, scores):
            cand.scores = list(s)

    def _charge(self, prompts, texts) -> None:
        self.counts.calls += 1
        if isinstance(self.prm, CountsAttention):  # the PRM counted what it ran (train.prm, hub_prm)
            self.counts.prefill += int(self.prm.last_tokens)
            self.counts.attention += int(self.prm.last_attention)
            if isinstance(self.prm, CountsLMHead):  # its LM head at step tokens (logprob_features)
                self.counts.scored += int(self.prm.last_lm_tokens)
        elif isinstance(self.prm, CountsTokens):  # tokens only: attention charged one key per token
            self.counts.prefill += int(self.prm.last_tokens)
            self.counts.attention += int(self.prm.last_tokens)

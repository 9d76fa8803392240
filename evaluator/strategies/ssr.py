"""SSR: speculative parallel scaling reasoning (Chu, Wang, Liu, Chen, Liu & Hu 2025, "SSR: Speculative
Parallel Scaling Reasoning in Test-time", arXiv:2505.15340): a selective parallel module picks a few
reasoning strategies per problem, and step-level speculative decoding lets a small draft model write the
steps that the target model only has to check.

Selective parallel module (SPM). A pool of strategy hints H (``DEFAULT_HINTS``; a hint is appended to the
problem's user message). For problem x and hint h the draft writes a first step d_h; the target scores it

    s(h) = (1/|d_h|) Σ_t log p_target(d_h,t | x ⊕ h, d_h,<t)        (mean token log-likelihood)

and the top-k hints by s(h) become the k parallel paths (k = the search budget). The drafted first steps
are kept: they are the paths' first proposals (already scored).

Step-level speculative decoding (SSD). Each round, every unfinished path gets one step (text up to the
step delimiter) from the draft, and the target verifies all drafted steps in one batched forward pass over
the drafted tokens only, on its cached KV of prompt + path (:func:`score_steps`; it generates nothing). Criteria (``score``, ``threshold`` τ):

    mean     accept the whole step iff (1/T) Σ_t log p_T(d_t | ·) ≥ τ        (the issue's step-level test)
    min      token t passes iff log p_T(d_t | ·) ≥ τ
    margin   token t passes iff log p_T(d_t | ·) − max_v log p_T(v | ·) ≥ τ   (τ = 0: d_t is the target's
             greedy token)

    prm      accept the whole step iff PRM(x, path ⊕ d)_last ≥ τ (τ a probability): the target does not
             read the step at all (reward-guided speculative decoding: Liao et al. 2025, "Reward-Guided
             Speculative Decoding for Efficient LLM Reasoning", arXiv:2501.19324)

A mean dilutes the one token that matters: in "3 + 4 = 8" every token but the wrong digit is likely, so a
step with a wrong answer can clear a mean threshold that a correct step's mean barely clears. The
token-level criteria judge each token, and ``margin`` with τ = 0 is the greedy case of the acceptance test
of token-level speculative decoding (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling"): with a
greedy target, the text it keeps is the text the target would have written itself (up to re-tokenisation
at the step boundary), so accuracy is the target's by construction and only the share of target-written
tokens depends on the draft. τ < 0 trades accuracy for fewer target tokens.

Refinement over the SSR paper (``keep_prefix``, default on): a rejected step is not thrown away whole —
as in token-level speculative decoding, the drafted tokens before the first failing token are kept (cut
at that token's first character, from the tokens' decoded pieces) and the target writes from there to the end
of the step (``regen_tokens=None``), or only ``regen_tokens`` tokens, after which the draft continues the
open step (``regen_tokens=1``, the default, is token-level speculative decoding with step-sized draft
blocks: on the demo pairing the base draft's first token is usually rejected — the adapter answers
tersely — but once steered by the target's token the draft writes the rest as the target would). The
target's generated tokens then count only what it wrote after a rejection. Fast-mode answers are read
only at step ends, so a number cut mid-step is never taken for an answer. Steps travel as text, so draft
and target may use different tokenizers; with the same tokenizer the draft's ids are handed to the target
(and the target's back to the draft), so nothing is re-encoded. Verification is one target pass over the
drafted tokens only, on the target's cached prefix (:func:`score_steps`): it counts as target prefill
tokens and FLOPs, not as generated tokens.

PRM-gated mode (``score=prm``). Every criterion above has the target read each drafted token, and reading a
token costs a transformer about the FLOPs of writing it (2·params per token either way), so those modes
cut the target's *generated* tokens but not its FLOPs. With ``score=prm`` the PRM (a separate, counted
model, usually much smaller than the target) judges each drafted step instead, and the SPM ranks hints by
the PRM's score of their first step; the target runs only when a step is rejected: it then reads the path's
text it has not read yet (its KV store continues from what it read or wrote last, so each token once) and
rewrites the step whole (``keep_prefix`` and ``regen_tokens`` do not apply: a PRM judges steps, not
tokens). A path whose drafted steps all pass never touches the target. Accuracy is then the PRM's trade-off,
no longer the target's by construction: τ sets it (a higher τ rejects more steps, so more of the text is
the target's).

Fast modes (per problem, checked after every round; a path "has an answer" once ``extract_answer`` finds
one in its text — for ``answer_format=number`` that is the first step containing a number):

    fast=0   run every path to its end, answer by majority vote over the paths' answers
    fast=1   stop as soon as any path has an answer; that answer (best-ranked hint first)
    fast=2   stop as soon as two paths' answers agree; if none ever do, majority over the finished paths

Accounting: one :class:`frugal.inference.engine.Engine` per model. The draft engine counts draft tokens, the
target engine counts target tokens — its generated tokens (what it wrote after rejections) and, as
prefill, every token it ran while verifying (the drafted tokens and the one before them: the prompt and
the accepted path come from its KV store); with ``score=prm`` the PRM counts what it read. The harness
builds the draft per run (``strategies.prepare``) and sums every model into ``flops_total``; :func:`report`
turns the counts into FLOPs (:mod:`frugal.evaluator.flops`).

Measured figures (``scripts/bench_ssr.py``): docs/benchmarks.md, "SSR".

GPU pairings worth trying (same-family tokenizers are not required): Qwen2.5-0.5B-Instruct → Qwen2.5-7B-
Instruct, Qwen2.5-Math-1.5B → Qwen2.5-Math-7B, SmolLM2-360M → Llama-3.1-8B. Offline demo: draft = the
embedded SmolLM2-135M, target = the same model + a LoRA adapter from ``frugal train recipe=demo``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from frugal.evaluator.config import BudgetedConfig
from frugal.runtime.registry import register
from frugal.inference.engine import Candidate, Engine, TokenIds
from frugal.inference.hf_engine import HFEngine, HFEngineConfig
from frugal.evaluator.strategies.common import Result, vote
from frugal.rewards.verify import answers_match, extract_answer


# ---------------------------------------------------------------------- config (search=ssr)

DEFAULT_HINTS = (
    "",  # the plain problem is always a candidate strategy
    "Compute it step by step.",
    "Write the calculation as an equation first.",
    "Work it out with the numbers one at a time.",
    "Give the result directly.",
    "Check the result before answering.",
)


# SSR's own knobs (the module docstring explains each), under `search.ssr.*` of search=ssr.
@dataclass
class SSRConfig:
    draft_model: str = "builtin:smollm2-135m-instruct"  # the draft (`run` loads it; the target is the policy)
    draft_adapter: Optional[str] = None
    # > 0: self-speculative draft, the target cut to its first k decoder layers (LayerSkip; ssr.self_draft),
    # sharing its weights and tokenizer; draft_model / draft_adapter are then not loaded.
    draft_layers: int = 0
    # Tokens the draft proposes per round (null: up to the end of the step, SSR's step-level blocks). A
    # weak draft (few tokens accepted) wastes less target verification with short blocks (γ of token-level
    # speculative decoding).
    draft_tokens: Optional[int] = None
    hints: list[str] = field(default_factory=lambda: list(DEFAULT_HINTS))  # the strategy pool
    # How the target verifies a drafted step (ssr.py `Scored.judge`): mean (step mean log-prob >= threshold) |
    # min (every token's log-prob >= threshold) | margin (every token within `threshold` nats of the target's
    # greedy token; 0 = exactly the greedy token, lossless for a greedy target) | prm (the PRM of `prm_path`
    # judges each step, the target only rewrites rejected ones: reward-guided speculative decoding).
    score: str = "margin"
    threshold: float = 0.0  # log-prob units (<= 0); with score=prm a PRM probability in [0, 1]
    keep_prefix: bool = True  # token-level criteria: keep the accepted prefix of a rejected step
    regen_tokens: Optional[int] = 1  # after a rejection the target writes this many tokens (None: rest of the step)
    fast: int = 1  # 0: majority over all paths | 1: first answer | 2: two agreeing answers
    speculative: bool = True  # false: the target writes every step (the target-only baseline)
    greedy: bool = True  # greedy steps (false: sample at the engines' temperature)
    score_batch_size: int = 32  # rows per target scoring forward pass

    def __post_init__(self):
        if not self.hints:
            raise ValueError("search.ssr.hints must hold at least one strategy hint")
        if self.fast not in (0, 1, 2):
            raise ValueError(f"search.ssr.fast must be 0, 1 or 2, got {self.fast}")
        if self.score not in ("mean", "min", "margin", "prm"):
            raise ValueError(f"search.ssr.score must be mean|min|margin|prm, got {self.score!r}")
        if self.score == "prm" and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"search.ssr.threshold with score=prm is a PRM probability in [0, 1], got {self.threshold}")
        if self.regen_tokens is not None and self.regen_tokens < 1:
            raise ValueError(f"search.ssr.regen_tokens must be >= 1 or null, got {self.regen_tokens}")
        if self.score_batch_size < 1:
            raise ValueError(f"search.ssr.score_batch_size must be >= 1, got {self.score_batch_size}")
        if self.draft_tokens is not None and self.draft_tokens < 1:
            raise ValueError(f"search.ssr.draft_tokens must be >= 1 or null, got {self.draft_tokens}")
        if self.draft_layers < 0:
            raise ValueError(f"search.ssr.draft_layers must be >= 0 (0 = load draft_model), got {self.draft_layers}")


@register("search")
@dataclass
class SSRSearchConfig(BudgetedConfig):
    """SSR (this module); budgets = k, the strategy paths kept per problem."""

    name: str = "ssr"
    budgets: list[int] = field(default_factory=lambda: [2])
    ssr: SSRConfig = field(default_factory=SSRConfig)

    def prepare(self, engine, prm) -> tuple:
        """The run with its draft bound (:func:`draft_engine`, built fresh per run); the policy is the target."""
        draft = draft_engine(self.ssr, engine)
        models = {"target": engine, "draft": draft}
        if prm is not None:
            models["prm"] = prm
        return functools.partial(run, draft=draft), models

    def needs_prm(self) -> Optional[str]:
        return "search.ssr.score=prm judges drafted steps with a PRM" if self.ssr.score == "prm" else None


@dataclass
class Path:
    """One (problem, hint) path and what it cost."""

    problem: int
    hint: str
    cand: Candidate
    spm_score: float = 0.0
    draft_tokens: int = 0  # generated by the draft
    target_tokens: int = 0  # generated by the target
    scored_tokens: int = 0  # tokens the target processed to score this path's drafted steps
    proposed: int = 0  # drafted steps verified (the first step included)
    accepted: int = 0  # drafted steps accepted whole
    accepted_tokens: int = 0  # drafted tokens kept (whole steps and accepted prefixes of rejected ones)
    scored: Optional["Scored"] = None  # the SPM's target scores of the pending first step


# ---------------------------------------------------------------------- verifying with the target

@dataclass
class Verdict:
    """What a criterion decided about one drafted step: ``score`` (accepted iff ≥ threshold), ``keep``
    (characters of the step accepted: ``len(step)`` when the whole step passes, else where the first
    failing token starts; 0 for the step-level ``mean``) and ``kept_tokens`` (target tokens in that prefix)."""

    score: float
    keep: int
    kept_tokens: int

    def accepted(self, step: str) -> bool:
        return self.keep >= len(step)


@dataclass
class Gated:
    """The PRM's judgement of one drafted step (``score=prm``): ``score``, the PRM's probability that the
    path is still correct after the step (its last step score), and ``tokens``, the drafted tokens in the
    step. The target ran nothing (``processed`` = 0)."""

    score: float
    tokens: int
    processed: int = 0

    @property
    def mean(self) -> float:
        """The SPM's ranking score: the PRM score."""
        return self.score

    def judge(self, step: str, how: str, threshold: float) -> Verdict:
        ok = bool(step.strip()) and self.score >= threshold
        return Verdict(self.score, len(step) if ok else 0, self.tokens if ok else 0)


def gate_steps(prm, questions: Sequence, prefixes: Sequence[str], steps: Sequence[str],
               tokens: Sequence[int]) -> list[Gated]:
    """Judge each drafted ``steps[i]`` with the PRM: one ``score_partial`` call over the partial solutions
    ``prefixes[i] + steps[i]`` under the problems' own prompts (``questions``, without the SPM hint the PRM
    was not trained on); the score is the last step's (an unfinished step counts as a step). The PRM's
    tokens and FLOPs go to its own counts (:class:`frugal.evaluator.prm_counts.CountingPRM`)."""
    rows = [i for i, s in enumerate(steps) if s.strip()]
    scores = prm.score_partial([questions[i] for i in rows], [prefixes[i] + steps[i] for i in rows]) if rows else []
    out = [Gated(float("-inf"), n) for n in tokens]
    for i, s in zip(rows, scores):
        out[i] = Gated(float(s[-1]) if len(s) else float("-inf"), tokens[i])
    return out


@dataclass
class Scored:
    """The target's reading of one drafted step (criterion-free, so one pass serves every criterion):
    per step token its log-prob ``logp``, the log-prob ``top`` of the target's own greedy token there, and
    ``starts``, the character in the step where the token starts; ``processed``: tokens the pass ran."""

    logp: list[float]
    top: list[float]
    starts: list[int]
    processed: int

    @property
    def mean(self) -> float:
        """Mean token log-prob (the SPM's ranking score); −inf for an empty step."""
        return sum(self.logp) / len(self.logp) if self.logp else float("-inf")

    def judge(self, step: str, how: str, threshold: float) -> Verdict:
        if not self.logp:
            return Verdict(float("-inf"), 0, 0)
        if how == "mean":
            ok = self.mean >= threshold
            return Verdict(self.mean, len(step) if ok else 0, len(self.logp) if ok else 0)
        s = token_scores(torch.tensor(self.logp), torch.tensor(self.top), how)
        bad = (s < threshold).nonzero()
        if len(bad) == 0:
            return Verdict(float(s.min()), len(step), len(self.logp))
        first = int(bad[0])
        return Verdict(float(s.min()), self.starts[first], first)


def token_scores(logp: torch.Tensor, top: torch.Tensor, how: str) -> torch.Tensor:
    """Per-token criterion scores from the target's log-prob of each drafted token (``logp``) and of its
    own greedy choice at that position (``top``): ``min`` → log p(token); ``margin`` → log p(token) −
    max log p (0 iff the drafted token is the target's greedy choice)."""
    return logp if how == "min" else logp - top


def score_steps(engine: Engine, prompts: Sequence[list[dict]], prefixes: Sequence, steps: Sequence[str],
                batch_size: int = 32, step_ids: Optional[Sequence[Optional[list[int]]]] = None) -> list[Scored]:
    """Score each drafted ``steps[i]`` under the target ``engine`` after the templated prompt and
    ``prefixes[i]`` (a :class:`Candidate`, whose ids the engine continues from when they are its own or
    were handed to it, or a text); ``Scored.judge`` then applies a criterion.

    Standard speculative verification: one forward pass (:meth:`Engine.score`) over the drafted tokens
    only, on the target's cached prefix. The target's KV of the prompt and of the path so far comes from
    the engine's stores (kept across calls: the path's accepted text is the prefix the target verified or
    wrote before), so the pass runs the drafted tokens plus the one token before them whose logits judge
    the first (its KV is stored, its logits are not); every token it runs is charged to ``engine.counts``
    as prefill, the LM head at the scored positions as ``scored``. A rejected suffix is rolled back by
    key: the path continues from its accepted ids, a prefix of what was stored, so the rejected tokens'
    KV is never attended to again (it sits in a leaf of its own until evicted).

    The drafted tokens are ``step_ids[i]`` when given (the draft's own ids: same tokenizer), else the
    step encoded by the target's tokenizer (steps travel as text). Criteria (:meth:`Scored.judge`, ``how``):

        mean     s = (1/T) Σ_t log p(d_t)          the whole step is accepted iff s ≥ threshold, else none of it
        min      s_t = log p(d_t)                  token t passes iff s_t ≥ threshold
        margin   s_t = log p(d_t) − max_v log p(v)  token t passes iff s_t ≥ threshold (threshold 0: d_t is the
                                                     target's greedy token — lossless for a greedy target)

    For the token-level criteria the step's score is min_t s_t and the accepted prefix ends where the first
    failing token starts (``Verdict.keep``, in characters of the step, from the tokens' decoded pieces). An
    empty step is rejected (there is nothing to accept); trailing whitespace-only tokens (the step
    delimiter) are run but not scored, so a target that would have ended the solution there does not
    reject an otherwise identical step."""
    tok = engine.tokenizer
    problems = [{"prompt": p} for p in prompts]
    cands, conts, starts, scored_n = [], [], [], []
    for i, (prefix, step) in enumerate(zip(prefixes, steps)):
        cand = Candidate(i, prefix.text, ids=prefix.ids) if isinstance(prefix, Candidate) else Candidate(i, prefix)
        ids = list(step_ids[i]) if step_ids is not None and step_ids[i] is not None else (
            tok(step, add_special_tokens=False)["input_ids"] if step else [])
        pieces = [tok.decode([t]) for t in ids]
        at, offsets = 0, []
        for piece in pieces:
            offsets.append(min(at, len(step)))
            at += len(piece)
        n = len(ids)
        while n and not pieces[n - 1].strip():
            n -= 1
        cands.append(cand)
        conts.append(ids if step.strip() else [])
        starts.append(offsets[:n])
        scored_n.append(n if step.strip() else 0)
    read = engine.score(problems, cands, conts, batch_size)
    out = []
    for (logp, top, ran), n, st in zip(read, scored_n, starts):
        out.append(Scored(logp[:n], top[:n], st, ran))
    return out


# ---------------------------------------------------------------------- the two modules

def with_hint(problem: dict, hint: str) -> dict:
    """The problem with ``hint`` appended to its last user message (a new row; the input is not changed)."""
    prompt = [dict(m) for m in problem["prompt"]]
    if hint:
        last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
        prompt[last]["content"] = f"{prompt[last]['content']}\n{hint}".strip()
    return {**problem, "prompt": prompt}


def _score(scorer, target: Engine, prompts, prefixes, steps, cfg: SSRConfig, step_ids=None, prm=None,
           questions=None, tokens=None) -> list:
    """The verdict material for drafted ``steps``: the PRM's (``score=prm``: :func:`gate_steps`, over the
    problems' ``questions``, ``tokens`` drafted per step) or the target's (:func:`score_steps`)."""
    if cfg.score == "prm":
        return gate_steps(prm, questions, [c.text for c in prefixes], steps, tokens)
    if scorer is not None:  # tests: a scripted scorer reads texts
        return scorer(target, prompts, [c.text for c in prefixes], steps, cfg.score_batch_size)
    return score_steps(target, prompts, [_handed(target, c, True) for c in prefixes], steps, cfg.score_batch_size,
                       step_ids)


def same_tokenizer(a: Engine, b: Engine) -> bool:
    """Whether two engines' tokenizers give the same ids (then token ids travel between them; else text)."""
    ta, tb = getattr(a, "tokenizer", None), getattr(b, "tokenizer", None)
    if ta is None or tb is None:
        return False
    return ta is tb or (type(ta) is type(tb) and len(ta) == len(tb) and ta.get_vocab() == tb.get_vocab())


def _handed(engine: Engine, cand: Candidate, share: bool) -> Candidate:
    """``cand`` with its token ids made ``engine``'s (same tokenizer: the engine continues from them and
    finds their KV, instead of re-encoding the text); unchanged when the ids do not spell its text."""
    if not share or cand.ids is None or not cand.ids.spells(cand.text) or cand.ids.owner is engine:
        return cand
    out = cand.copy()
    out.ids = cand.ids.handed_to(engine)
    return out


def _drafted(draft: Engine, before: Candidate, proposal: Candidate) -> Optional[list[int]]:
    """The ids the draft wrote for ``proposal``'s new text (None when its ids do not spell it)."""
    if proposal.ids is None or not proposal.ids.valid_for(draft, proposal.text):
        return None
    old = draft.core.continuation_ids(before) if before.text else []
    new = list(proposal.ids.ids)
    return new[len(old):] if new[:len(old)] == old else None


def select_strategies(problems: Sequence[dict], k: int, draft: Engine, target: Engine, cfg: SSRConfig,
                      scorer=None, prm=None) -> list[list[Path]]:
    """SPM: draft a first step for every (problem, hint), score it with the target, keep the top k per
    problem by mean token log-likelihood (ties: pool order); with ``score=prm`` the PRM scores the first
    steps instead and the target is not run. The kept paths hold their drafted first step and its verdict
    as a pending proposal (one pass both ranks and verifies it)."""
    hints = list(dict.fromkeys(cfg.hints))
    rows = [with_hint(p, h) for p in problems for h in hints]
    starts = [Candidate(i) for i in range(len(rows))]
    firsts = draft.extend(rows, starts, stop_at_step=True, greedy=cfg.greedy)
    share = same_tokenizer(draft, target)
    if cfg.score == "prm":  # one PRM call for every row; the target is not run
        verdicts = _score(scorer, target, None, [Candidate(j) for j in range(len(rows))], [f.text for f in firsts],
                          cfg, prm=prm, questions=[problems[j // len(hints)]["prompt"] for j in range(len(rows))],
                          tokens=[f.tokens for f in firsts])
    else:  # one target pass per problem: its hints share its prompt's prefill (HFEngine._prefill)
        verdicts = []
        for p in range(len(problems)):
            block = range(p * len(hints), (p + 1) * len(hints))
            verdicts += _score(scorer, target, [rows[j]["prompt"] for j in block], [Candidate(j) for j in block],
                               [firsts[j].text for j in block], cfg,
                               [_drafted(draft, Candidate(j), firsts[j]) if share else None for j in block])
    chosen = []
    for p in range(len(problems)):
        block = range(p * len(hints), (p + 1) * len(hints))
        order = sorted(block, key=lambda j: (-verdicts[j].mean, j))[:max(1, k)]
        paths = []
        for j in order:
            path = Path(p, hints[j - p * len(hints)], firsts[j], spm_score=verdicts[j].mean, scored=verdicts[j])
            path.draft_tokens, path.scored_tokens = firsts[j].tokens, verdicts[j].processed
            paths.append(path)
        # the hints that were drafted and scored but not kept still cost: charge them to the best path
        dropped = [j for j in block if j not in order]
        paths[0].draft_tokens += sum(firsts[j].tokens for j in dropped)
        paths[0].scored_tokens += sum(verdicts[j].processed for j in dropped)
        chosen.append(paths)
    return chosen


def decode(problems: Sequence[dict], paths: list[list[Path]], draft: Optional[Engine], target: Engine,
           cfg: SSRConfig, scorer=None, prm=None) -> list[Result]:
    """SSD over all paths of all problems, one draft call, one verification pass and one target call per
    round.

    With ``cfg.speculative`` the paths' pending first steps (from :func:`select_strategies`) are judged
    first with their SPM scores; without it every path starts empty and the target writes every step.
    A rejected step keeps its accepted prefix when ``cfg.keep_prefix`` (token-level criteria); the target
    then writes from the first rejected token to the end of the step, or only ``cfg.regen_tokens`` tokens
    (after which the draft takes over again); with ``score=prm`` the ``prm`` judges the steps and the
    target rewrites a rejected step whole. ``scorer`` (default :func:`score_steps`) has its signature;
    tests pass a fake one."""
    # Work on copies (the same SPM paths can be decoded twice: speculatively and target-only). The
    # target-only baseline starts from empty paths and is not charged for SPM.
    paths = [[replace(path, cand=path.cand.copy()) if cfg.speculative else
              Path(path.problem, path.hint, Candidate(path.problem), path.spm_score) for path in group]
             for group in paths]
    flat = [path for group in paths for path in group]
    rows = [with_hint(problems[path.problem], path.hint) for path in flat]
    share = draft is not None and same_tokenizer(draft, target)
    for j, path in enumerate(flat):
        path.cand.problem = j
    pending: dict[int, tuple[Candidate, Candidate, Scored]] = {}  # path -> (before, proposal, target scores)
    if cfg.speculative:  # the SPM's drafted first steps are the first proposals (already verified)
        for j, path in enumerate(flat):
            pending[j] = (Candidate(j), path.cand, path.scored)
            path.proposed += 1
    stopped = [False] * len(problems)
    stop_reason = ["end"] * len(problems)
    # Every round adds at least one token (or finishes) each active path: this bound is never the reason to stop.
    for _ in range(target.cfg.max_new_tokens + target.cfg.max_steps + 2):
        # 1. judge the pending proposals; 2. the target writes the rejected remainders (and, without
        # speculation, every step)
        redo = []
        for j, (before, proposal, scored) in pending.items():
            step = proposal.text[len(before.text):]
            verdict = scored.judge(step, cfg.score, cfg.threshold)
            if verdict.accepted(step):
                flat[j].cand = proposal
                flat[j].accepted += 1
                flat[j].accepted_tokens += verdict.kept_tokens
                continue
            if cfg.keep_prefix and verdict.keep > 0:
                kept = Candidate(j, before.text + step[:verdict.keep], before.tokens + verdict.kept_tokens)
                drafted = _drafted(draft, before, proposal) if share else None
                start = ([] if not before.text else
                         list(before.ids.ids) if before.ids is not None and before.ids.spells(before.text) else None)
                if drafted is not None and start is not None:
                    # the draft's ids up to the first rejected token spell the kept text (same tokenizer)
                    kept.ids = TokenIds(target, kept.text, tuple(start + drafted[:verdict.kept_tokens]))
                before = kept
                flat[j].accepted_tokens += verdict.kept_tokens
            redo.append((j, before))
        if not cfg.speculative:
            redo = [(j, flat[j].cand) for j, path in enumerate(flat)
                    if not path.cand.finished and not stopped[path.problem]]
        if redo:
            cap = cfg.regen_tokens if cfg.speculative and cfg.score != "prm" else None
            regen = target.extend(rows, [_handed(target, c, share) for _, c in redo], max_tokens=cap,
                                  stop_at_step=True, greedy=cfg.greedy)
            for (j, before), new in zip(redo, regen):
                flat[j].target_tokens += new.tokens - before.tokens
                flat[j].cand = new
        pending = {}
        # 3. fast-mode stopping
        for p, group in enumerate(paths):
            if not stopped[p]:
                reason = _stop(group, problems[p], cfg.fast, target.cfg.step_delimiter)
                if reason:
                    stopped[p], stop_reason[p] = True, reason
        active = [j for j, path in enumerate(flat) if not path.cand.finished and not stopped[path.problem]]
        if not active:
            break
        if not cfg.speculative:
            continue
        # 4. the draft proposes the next step (or the rest of the open one) of every active path; the target
        # verifies all of them in one pass
        befores = [_handed(draft, flat[j].cand, share) for j in active]
        proposals = draft.extend(rows, befores, max_tokens=cfg.draft_tokens, stop_at_step=True, greedy=cfg.greedy)
        steps = [new.text[len(old.text):] for old, new in zip(befores, proposals)]
        verdicts = _score(scorer, target, [rows[j]["prompt"] for j in active], befores, steps, cfg,
                          [_drafted(draft, b, c) if share else None for b, c in zip(befores, proposals)],
                          prm=prm, questions=[problems[flat[j].problem]["prompt"] for j in active],
                          tokens=[new.tokens - old.tokens for old, new in zip(befores, proposals)])
        for j, old, new, v in zip(active, befores, proposals, verdicts):
            flat[j].draft_tokens += new.tokens - old.tokens
            flat[j].scored_tokens += v.processed
            flat[j].proposed += 1
            pending[j] = (old, new, v)
    return [_result(p, group, problems, cfg.fast, stop_reason[p], target.cfg.step_delimiter)
            for p, group in enumerate(paths)]


def _answer(path: Path, problem: dict, delimiter: Optional[str] = None) -> Optional[str]:
    """The path's answer; with ``delimiter`` only once its text ends a step (or the solution), so that a
    number cut mid-step ("1" of "12", after a one-token regeneration) is never taken as an answer."""
    if delimiter is not None and not (path.cand.finished or path.cand.text.endswith(delimiter)):
        return None
    return extract_answer(path.cand.text, problem.get("answer_format", "boxed"))


def _stop(group: list[Path], problem: dict, fast: int, delimiter: str = "\n\n") -> Optional[str]:
    answers = [_answer(path, problem, delimiter) for path in group]
    if fast == 1 and any(a is not None for a in answers):
        return "first_answer"
    if fast == 2:
        found = [a for a in answers if a is not None]
        if any(answers_match(a, b) for i, a in enumerate(found) for b in found[i + 1:]):
            return "two_agree"
    if all(path.cand.finished for path in group):
        return "all_finished"
    return None


def _result(p: int, group: list[Path], problems: Sequence[dict], fast: int, reason: str,
            delimiter: str = "\n\n") -> Result:
    answers = [_answer(path, problems[p], delimiter) for path in group]  # what `_stop` saw
    pick = None
    if fast == 1 and reason == "first_answer":
        pick = next(i for i, a in enumerate(answers) if a is not None)
    elif fast == 2 and reason == "two_agree":
        found = [(i, a) for i, a in enumerate(answers) if a is not None]
        pick = next(i for n, (i, a) in enumerate(found) if any(answers_match(a, b) for _, b in found[n + 1:]))
    cands = []
    for path in group:
        cand = path.cand.copy()
        cand.problem = p  # back to the caller's problem index
        cands.append(cand)
    if pick is None:  # majority over the paths (fast=0, or no early stop happened)
        chosen = vote(cands, problems)
    else:
        chosen = cands[pick]
    info = {
        "hints": [path.hint for path in group], "spm_scores": [path.spm_score for path in group],
        "stop": reason, "draft_tokens": sum(x.draft_tokens for x in group),
        "target_tokens": sum(x.target_tokens for x in group), "scored_tokens": sum(x.scored_tokens for x in group),
        "proposed": sum(x.proposed for x in group), "accepted": sum(x.accepted for x in group),
        "accepted_tokens": sum(x.accepted_tokens for x in group),
    }
    return Result(chosen, cands, info)


# ---------------------------------------------------------------------- entry points

def ssr(problems: Sequence[dict], k: int, draft: Engine, target: Engine, cfg: SSRConfig, prm=None) -> list[Result]:
    """SPM then SSD (or, with ``cfg.speculative=False``, SPM then target-only decoding of the same paths);
    ``prm`` (a :class:`frugal.evaluator.prm_counts.CountingPRM`) is read only with ``score=prm``."""
    if cfg.score == "prm" and prm is None:
        raise ValueError("search.ssr.score=prm judges drafted steps with a PRM: set prm_path=<PRM folder or Hub id>")
    paths = select_strategies(problems, k, draft, target, cfg, prm=prm)
    return decode(problems, paths, draft, target, cfg, prm=prm)


def run(problems, budget, engine, prm, cfg, draft: Optional[Engine] = None) -> list[Result]:
    """``search=ssr`` in the harness: ``engine`` is the target (the evaluated policy); ``draft`` the draft
    engine (the harness builds it once per run with :func:`draft_engine` and counts it: see
    ``strategies.prepare``; built here, uncounted, when not given); ``budget`` = k parallel paths; ``prm``
    judges the drafted steps with ``search.ssr.score=prm`` (and is otherwise not run)."""
    return ssr(problems, budget, draft if draft is not None else draft_engine(cfg.ssr, engine), engine, cfg.ssr, prm)


def draft_engine(scfg: SSRConfig, target: Engine) -> Engine:
    """A new draft engine (with its own counts) for one run: ``draft_layers`` > 0 cuts the target to its
    first k decoder layers (:func:`self_draft`, sharing the target's weights and tokenizer); else
    ``draft_model`` / ``draft_adapter`` is loaded."""
    if scfg.draft_layers:
        if target.cfg.backend != "hf":  # the cut target is a view of weights in this process
            raise ValueError(f"search.ssr.draft_layers needs engine.backend=hf (the target's own weights), not "
                             f"engine.backend={target.cfg.backend}; name a draft_model instead")
        return HFEngine(self_draft(target.model, scfg.draft_layers), target.tokenizer, target.cfg, name="draft",
                      seed=target.seed)
    from frugal.inference.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name_or_path=scfg.draft_model, adapter=scfg.draft_adapter), target.device)
    # the draft runs here (HF), with the target's generation knobs
    return HFEngine(model, tok, HFEngineConfig(**target.cfg.shared()), name="draft", seed=target.seed)


def self_draft(model, keep: int):
    """Self-speculative draft (LayerSkip: Elhoushi et al. 2024, "LayerSkip: Enabling Early Exit Inference
    and Self-Speculative Decoding"): the target model cut to its first ``keep`` decoder layers, reading
    the last kept layer's hidden state through the target's final norm and LM head.

    A view, not a copy: the modules on the path to the layer list are copied shallowly (the weights,
    the LoRA adapter included, are the target's own tensors) and the copy's config says ``keep`` layers
    (``frugal.train.prm.truncate_layers`` cuts the copy, the target keeps all its layers). Its FLOPs per
    token are about keep / n_layers of the target's body plus the full LM head
    (:func:`frugal.evaluator.flops.policy_shape` counts the copy's own parameters). LayerSkip trains the
    model with layer dropout and an early-exit loss so that early layers predict well; an untrained
    model's early exits are weaker drafts, so fewer drafted tokens are accepted."""
    import copy

    from transformers import PretrainedConfig

    from frugal.train.prm import truncate_layers

    path = next((name for name, m in model.named_modules() if name.endswith("layers")
                 and isinstance(m, torch.nn.ModuleList)), None)
    if path is None:
        raise ValueError("search.ssr.draft_layers: this model has no `.layers` ModuleList to cut; set draft_layers=0")
    total = len(model.get_submodule(path))
    if not 0 < keep < total:
        raise ValueError(f"search.ssr.draft_layers={keep}: the target has {total} decoder layers; keep 1..{total - 1}")
    config = None
    top = copy.copy(model)
    top._modules = dict(model._modules)
    node = top
    for part in path.split(".")[:-1]:  # shallow copies down to the module that holds the layer list
        child = copy.copy(node._modules[part])
        child._modules = dict(child._modules)
        node._modules[part] = child
        node = child
    for m in [top] + [top.get_submodule(".".join(path.split(".")[:i])) for i in range(1, len(path.split(".")))]:
        if isinstance(m.__dict__.get("config"), PretrainedConfig):  # one config of its own for the copy
            config = config or copy.deepcopy(m.config)
            m.config = config
    truncate_layers(top, keep)
    return top


@dataclass
class Report:
    """Per run: tokens and FLOPs per model, acceptance rate, accuracy."""

    problems: int
    accuracy: float
    acceptance_rate: float
    steps_proposed: int
    steps_accepted: int
    draft_generated: int
    draft_prefill: int
    target_generated: int
    target_prefill: int  # includes every token processed to score drafted steps
    target_scored: int
    flops_draft: float
    flops_target: float
    prm_prefill: int = 0  # tokens the PRM ran (score=prm)
    flops_prm: float = 0.0


def report(problems: Sequence[dict], results: Sequence[Result], draft_counts, target_counts,
           draft_shape, target_shape, prm_counts=None, prm_shape=None) -> Report:
    """Counts are the engines' (and the PRM's) ``Counts`` for this run (``counts.since(before)``); shapes
    from :func:`frugal.evaluator.flops.policy_shape` (:func:`~frugal.evaluator.flops.prm_shape`)."""
    from frugal.rewards.verify import is_correct

    correct = [is_correct(r.chosen.text, str(p["answer"]), p.get("answer_format", "boxed")) for p, r in zip(problems, results)]
    proposed = sum(r.info["proposed"] for r in results)
    accepted = sum(r.info["accepted"] for r in results)
    return Report(
        problems=len(problems), accuracy=sum(correct) / max(1, len(problems)),
        acceptance_rate=accepted / proposed if proposed else 0.0, steps_proposed=proposed, steps_accepted=accepted,
        draft_generated=draft_counts.decode, draft_prefill=draft_counts.prefill,
        target_generated=target_counts.decode, target_prefill=target_counts.prefill,
        target_scored=sum(r.info["scored_tokens"] for r in results),
        flops_draft=draft_shape.flops(draft_counts) if draft_shape else 0.0,
        flops_target=target_shape.flops(target_counts),
        prm_prefill=prm_counts.prefill if prm_counts is not None else 0,
        flops_prm=prm_shape.flops(prm_counts) if prm_counts is not None and prm_shape is not None else 0.0,
    )

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
prompt + path + step (:func:`score_steps`; it generates nothing). Criteria (``score``, ``threshold`` τ):

    mean     accept the whole step iff (1/T) Σ_t log p_T(d_t | ·) ≥ τ        (the issue's step-level test)
    min      token t passes iff log p_T(d_t | ·) ≥ τ
    margin   token t passes iff log p_T(d_t | ·) − max_v log p_T(v | ·) ≥ τ   (τ = 0: d_t is the target's
             greedy token)

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
at that token's first character via the tokenizer's offsets) and the target writes from there to the end
of the step (``regen_tokens=None``), or only ``regen_tokens`` tokens, after which the draft continues the
open step (``regen_tokens=1``, the default, is token-level speculative decoding with step-sized draft
blocks: on the demo pairing the base draft's first token is usually rejected — the adapter answers
tersely — but once steered by the target's token the draft writes the rest as the target would). The
target's generated tokens then count only what it wrote after a rejection. Fast-mode answers are read
only at step ends, so a number cut mid-step is never taken for an answer. Steps travel as text, so draft
and target may use different tokenizers. Verification is a prefill: it counts as target prefill tokens
and FLOPs, not as generated tokens.

Fast modes (per problem, checked after every round; a path "has an answer" once ``extract_answer`` finds
one in its text — for ``answer_format=number`` that is the first step containing a number):

    fast=0   run every path to its end, answer by majority vote over the paths' answers
    fast=1   stop as soon as any path has an answer; that answer (best-ranked hint first)
    fast=2   stop as soon as two paths' answers agree; if none ever do, majority over the finished paths

Accounting: one :class:`frugal.evaluator.engine.Engine` per model. The draft engine counts draft tokens, the
target engine counts target tokens — its generated tokens (what it wrote after rejections) and, as
prefill, every token it processed while verifying (the prompt is re-encoded by every verification pass:
no KV reuse there yet, so SSR's target FLOPs exceed target-only decoding on this CPU demo even though
its generated tokens fall). :func:`report` turns both into FLOPs (:mod:`frugal.evaluator.flops`).

Measured (``scripts/bench_ssr.py``, 40 held-out ± problems, k = 2, fast=1, target = SmolLM2-135M + a
10-step demo adapter at 75 % greedy accuracy, draft = the base model): target generated tokens ÷
target-only and accuracy change — ``margin:0:regen=1`` 0.131 / +0.0; ``margin:0`` (target writes the rest
of a rejected step) 0.744 / +0.0; ``mean:-0.3`` 0.793 / −2.5; ``min:-2:regen=1`` 0.076 / −30.0.

GPU pairings worth trying (same-family tokenizers are not required): Qwen2.5-0.5B-Instruct → Qwen2.5-7B-
Instruct, Qwen2.5-Math-1.5B → Qwen2.5-Math-7B, SmolLM2-360M → Llama-3.1-8B. Offline demo: draft = the
embedded SmolLM2-135M, target = the same model + a LoRA adapter from ``frugal train recipe=demo``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from frugal.evaluator.config import DEFAULT_HINTS, SSRConfig  # noqa: F401  (re-exported for callers)
from frugal.evaluator.engine import Candidate, Engine
from frugal.evaluator.strategies.common import Result, vote
from frugal.rewards.verify import answers_match, extract_answer

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


@torch.inference_mode()
def score_steps(engine: Engine, prompts: Sequence[list[dict]], prefixes: Sequence[str], steps: Sequence[str],
                batch_size: int = 32) -> list[Scored]:
    """Score each drafted ``steps[i]`` under ``engine.model`` given the templated prompt and ``prefixes[i]``;
    ``Scored.judge`` then applies a criterion. A served policy (``engine.backend=vllm|openai``) computes
    the same log-probs itself (``ServedEngine.score_tokens``: its prompt log-probs, one request per row).

    One forward pass per batch (rows laid out as [left-padded prompt + prefix | right-padded step], the
    LM head only at the step's positions via ``logits_to_keep``); every processed token is charged to
    ``engine.counts`` as prefill (verification generates nothing). Criteria (:meth:`Scored.judge`, ``how``):

        mean     s = (1/T) Σ_t log p(d_t)          the whole step is accepted iff s ≥ threshold, else none of it
        min      s_t = log p(d_t)                  token t passes iff s_t ≥ threshold
        margin   s_t = log p(d_t) − max_v log p(v)  token t passes iff s_t ≥ threshold (threshold 0: d_t is the
                                                     target's greedy token — lossless for a greedy target)

    For the token-level criteria the step's score is min_t s_t and the accepted prefix ends where the first
    failing token starts (``Verdict.keep``, in characters, via the tokenizer's offsets). An empty step is
    rejected (there is nothing to accept); trailing whitespace (the step delimiter) is not scored, so a
    target that would have ended the solution there does not reject an otherwise identical step."""
    tok, model = engine.tokenizer, engine.model
    rows = []  # (ids, index where the step's tokens start, char offsets of the ids, len(context))
    for prompt, prefix, step in zip(prompts, prefixes, steps):
        context = engine.prompt_text(prompt) + prefix
        head = tok(context, add_special_tokens=False)["input_ids"]
        enc = tok(context + step.rstrip(), add_special_tokens=False, return_offsets_mapping=True)
        full = enc["input_ids"]
        common = 0  # the step's tokens start where the two tokenisations part (boundary merges)
        while common < min(len(head), len(full)) and head[common] == full[common]:
            common += 1
        rows.append((full, max(common, 1), enc["offset_mapping"], len(context)))
    out = [Scored([], [], [], 0) for _ in rows]
    todo = [i for i, (full, start, _, _) in enumerate(rows) if len(full) > start and steps[i].strip()]
    if hasattr(engine, "score_tokens"):  # a served policy (engine.backend=vllm|openai): its prompt log-probs
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            scored = engine.score_tokens([rows[i][0] for i in batch], [rows[i][1] for i in batch])
            for i, (logp, top) in zip(batch, scored):
                full, start, offsets, ctx_len = rows[i]
                starts = [max(0, offsets[start + t][0] - ctx_len) for t in range(len(full) - start)]
                out[i] = Scored(logp, top, starts, len(full))
                engine.counts.add(len(full), scored=len(full) - start)
            engine.counts.calls += 1
        return out
    was_training = model.training
    model.eval()
    pad, dev = tok.pad_token_id, engine.device
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        width = max(rows[i][1] for i in batch)
        tail_width = max(len(rows[i][0]) - rows[i][1] for i in batch)
        ids, mask = [], []
        for i in batch:
            full, start = rows[i][0], rows[i][1]
            left, right = width - start, tail_width - (len(full) - start)
            ids.append([pad] * left + full + [pad] * right)
            mask.append([0] * left + [1] * len(full) + [0] * right)
        ids_t, mask_t = torch.tensor(ids, device=dev), torch.tensor(mask, device=dev)
        keep_cols = torch.arange(width - 1, width - 1 + tail_width, device=dev)  # column c predicts c + 1
        logits = model(input_ids=ids_t, attention_mask=mask_t, position_ids=(mask_t.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep_cols).logits.float()
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, ids_t[:, width:width + tail_width].unsqueeze(-1)).squeeze(-1)  # [B, T]
        top = logp_all.max(-1).values
        for r, i in enumerate(batch):
            full, start, offsets, ctx_len = rows[i]
            n = len(full) - start
            # a token that straddles the prefix/step boundary starts at the step's first character
            starts = [max(0, offsets[start + t][0] - ctx_len) for t in range(n)]
            out[i] = Scored(logp[r, :n].tolist(), top[r, :n].tolist(), starts, len(full))
            engine.counts.add(len(full), scored=n)  # the LM head ran at the step's n positions
        engine.counts.calls += 1
    model.train(was_training)
    return out


# ---------------------------------------------------------------------- the two modules

def with_hint(problem: dict, hint: str) -> dict:
    """The problem with ``hint`` appended to its last user message (a new row; the input is not changed)."""
    prompt = [dict(m) for m in problem["prompt"]]
    if hint:
        last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
        prompt[last]["content"] = f"{prompt[last]['content']}\n{hint}".strip()
    return {**problem, "prompt": prompt}


def _score(scorer, target: Engine, prompts, prefixes, steps, cfg: SSRConfig) -> list[Scored]:
    return (scorer or score_steps)(target, prompts, prefixes, steps, cfg.score_batch_size)


def select_strategies(problems: Sequence[dict], k: int, draft: Engine, target: Engine, cfg: SSRConfig,
                      scorer=None) -> list[list[Path]]:
    """SPM: draft a first step for every (problem, hint), score it with the target, keep the top k per
    problem by mean token log-likelihood (ties: pool order). The kept paths hold their drafted first step
    and its verdict as a pending proposal (one target pass both ranks and verifies it)."""
    hints = list(dict.fromkeys(cfg.hints))
    rows = [with_hint(p, h) for p in problems for h in hints]
    starts = [Candidate(i) for i in range(len(rows))]
    firsts = draft.extend(rows, starts, stop_at_step=True, greedy=cfg.greedy)
    verdicts = _score(scorer, target, [r["prompt"] for r in rows], [""] * len(rows), [c.text for c in firsts], cfg)
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
           cfg: SSRConfig, scorer=None) -> list[Result]:
    """SSD over all paths of all problems, one draft call, one verification pass and one target call per
    round.

    With ``cfg.speculative`` the paths' pending first steps (from :func:`select_strategies`) are judged
    first with their SPM scores; without it every path starts empty and the target writes every step.
    A rejected step keeps its accepted prefix when ``cfg.keep_prefix`` (token-level criteria); the target
    then writes from the first rejected token to the end of the step, or only ``cfg.regen_tokens`` tokens
    (after which the draft takes over again). ``scorer`` (default :func:`score_steps`) has its
    signature; tests pass a fake one."""
    # Work on copies (the same SPM paths can be decoded twice: speculatively and target-only). The
    # target-only baseline starts from empty paths and is not charged for SPM.
    paths = [[replace(path, cand=path.cand.copy()) if cfg.speculative else
              Path(path.problem, path.hint, Candidate(path.problem), path.spm_score) for path in group]
             for group in paths]
    flat = [path for group in paths for path in group]
    rows = [with_hint(problems[path.problem], path.hint) for path in flat]
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
                before = Candidate(j, before.text + step[:verdict.keep], before.tokens + verdict.kept_tokens)
                flat[j].accepted_tokens += verdict.kept_tokens
            redo.append((j, before))
        if not cfg.speculative:
            redo = [(j, flat[j].cand) for j, path in enumerate(flat)
                    if not path.cand.finished and not stopped[path.problem]]
        if redo:
            cap = cfg.regen_tokens if cfg.speculative else None
            regen = target.extend(rows, [c for _, c in redo], max_tokens=cap, stop_at_step=True, greedy=cfg.greedy)
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
        befores = [flat[j].cand for j in active]
        proposals = draft.extend(rows, befores, stop_at_step=True, greedy=cfg.greedy)
        steps = [new.text[len(old.text):] for old, new in zip(befores, proposals)]
        verdicts = _score(scorer, target, [rows[j]["prompt"] for j in active], [c.text for c in befores], steps, cfg)
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

def ssr(problems: Sequence[dict], k: int, draft: Engine, target: Engine, cfg: SSRConfig) -> list[Result]:
    """SPM then SSD (or, with ``cfg.speculative=False``, SPM then target-only decoding of the same paths)."""
    paths = select_strategies(problems, k, draft, target, cfg)
    return decode(problems, paths, draft, target, cfg)


_DRAFTS: dict[tuple, Engine] = {}


def run(problems, budget, engine, prm, cfg) -> list[Result]:
    """``search=ssr`` in the harness: ``engine`` is the target (the evaluated policy), the draft is loaded
    once from ``cfg.ssr.draft_model`` / ``draft_adapter`` (``cfg``: an SSRSearchConfig); ``budget`` = k
    parallel paths. The harness counts the target's tokens; the draft's are in each result's ``info`` (and
    ``draft_engine().counts``)."""
    return ssr(problems, budget, draft_engine(cfg.ssr, engine), engine, cfg.ssr)


def draft_engine(scfg: SSRConfig, target: Engine) -> Engine:
    from frugal.train.models import ModelConfig, load_model

    key = (scfg.draft_model, scfg.draft_adapter, str(target.device))
    if key not in _DRAFTS:
        model, tok = load_model(ModelConfig(name_or_path=scfg.draft_model, adapter=scfg.draft_adapter), target.device)
        from frugal.evaluator.backends import hf_config

        _DRAFTS[key] = Engine(model, tok, hf_config(target.cfg), name="draft")  # the draft runs here (HF)
    return _DRAFTS[key]


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


def report(problems: Sequence[dict], results: Sequence[Result], draft_counts, target_counts,
           draft_shape, target_shape) -> Report:
    """Counts are the engines' ``Counts`` for this run (``counts.since(before)``); shapes from
    :func:`frugal.evaluator.flops.policy_shape`."""
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
    )

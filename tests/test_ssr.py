"""SSR (evaluator/strategies/ssr.py): acceptance logic with a fake draft / target / scorer, fast-mode
stopping, strategy selection, token accounting, and the target scorer against full logits."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frugal.inference.engine import Counts
from frugal.inference.hf_engine import HFEngine, HFEngineConfig
from frugal.evaluator.strategies.ssr import SSRConfig, Scored, decode, score_steps, select_strategies, with_hint
from frugal.rewards.steps import split_steps


class FakeEngine:
    """Writes scripted steps: ``script(user_message, steps_done) -> (step_text, finishes)``; one token per
    word; counts generated tokens like the real engine."""

    def __init__(self, script, max_steps=6):
        self.script = script
        self.cfg = SimpleNamespace(max_steps=max_steps, max_new_tokens=64, step_delimiter="\n\n")
        self.counts = Counts()
        self.calls = 0

    def extend(self, problems, cands, stop_at_step=True, greedy=False, max_tokens=None):
        self.calls += 1
        out = []
        for c in cands:
            c = c.copy()
            if not c.finished:
                message = problems[c.problem]["prompt"][-1]["content"]
                step, finishes = self.script(message, len(split_steps(c.text, "\n\n")))
                n = len(step.split())
                c.text, c.tokens, c.finished = c.text + step, c.tokens + n, finishes
                self.counts.add(0, n)
            out.append(c)
        return out


def words(step, logp_of):
    """One token per word: its log-prob ``logp_of(word)``, the target's greedy log-prob 0, its start."""
    starts, at = [], 0
    for w in step.split():
        at = step.index(w, at)
        starts.append(at)
        at += len(w)
    return Scored([logp_of(w) for w in step.split()], [0.0] * len(starts), starts, len(starts))


def fake_scorer(engine, prompts, prefixes, steps, batch_size=32):
    """Step level: every token of a step that says "good" is the target's greedy token, every token of any
    other step is 5 nats below it; charges one token per word to the target."""
    out = []
    for s in steps:
        engine.counts.add(len(s.split()))
        out.append(words(s, lambda w, ok="good" in s: 0.0 if ok else -5.0))
    return out


def word_scorer(engine, prompts, prefixes, steps, batch_size=32):
    """Token level: every word is the target's greedy token except "bad" (5 nats below)."""
    out = []
    for s in steps:
        engine.counts.add(len(s.split()))
        out.append(words(s, lambda w: -5.0 if w == "bad" else 0.0))
    return out


def problem(q, answer="5"):
    return {"prompt": [{"role": "user", "content": q}], "answer": answer, "answer_format": "number"}


def three_step(prefix):
    """Steps 0, 1 without numbers, step 2 with the answer 5 (finishes)."""
    def script(message, done):
        if done < 2:
            return (f"{prefix} {'good' if done == 0 else 'bad'} step\n\n", False)
        return (f"{prefix} so it is 5", True)
    return script


def test_accepted_steps_are_kept_and_rejected_ones_regenerated_by_the_target():
    cfg = SSRConfig(hints=[""], threshold=-1.0, fast=0)
    draft, target = FakeEngine(three_step("draft")), FakeEngine(three_step("target"))
    paths = select_strategies([problem("What is 2 + 3?")], 1, draft, target, cfg, scorer=fake_scorer)
    [res] = decode([problem("What is 2 + 3?")], paths, draft, target, cfg, scorer=fake_scorer)
    # step 0 "draft good step" accepted; step 1 "draft bad step" rejected -> the target writes its step 1;
    # step 2 "draft so it is 5" has no "good": rejected -> the target's final step
    assert res.chosen.text == "draft good step\n\ntarget bad step\n\ntarget so it is 5"
    assert res.info["proposed"] == 3 and res.info["accepted"] == 1
    assert res.info["draft_tokens"] == 3 + 3 + 5  # every drafted step
    assert res.info["target_tokens"] == 3 + 5  # only the regenerated ones
    assert target.counts.decode == 8 and draft.counts.decode == 11
    assert target.counts.prefill == 3 + 3 + 5  # scoring the three drafted steps
    assert res.chosen.problem == 0 and res.chosen.finished


def test_target_only_mode_never_calls_the_draft_and_counts_every_step():
    draft, target = FakeEngine(three_step("draft")), FakeEngine(three_step("target"))
    cfg = SSRConfig(hints=["", "Hint A."], threshold=-1.0, fast=0)
    probs = [problem("What is 2 + 3?")]
    paths = select_strategies(probs, 2, draft, target, cfg, scorer=fake_scorer)
    calls_before = draft.calls
    [res] = decode(probs, paths, None, target, SSRConfig(hints=cfg.hints, fast=0, speculative=False),
                   scorer=fake_scorer)
    assert draft.calls == calls_before
    assert res.info["draft_tokens"] == 0 and res.info["accepted"] == 0 and res.info["proposed"] == 0
    assert res.info["target_tokens"] == 2 * (3 + 3 + 5)
    assert all(c.text.startswith("target good step") for c in res.candidates)


def test_spm_keeps_the_top_k_hints_by_target_score():
    def script(message, done):
        good = "Hint B." in message or "Hint C." in message
        return (("good" if good else "meh") + " 5", True)

    draft, target = FakeEngine(script), FakeEngine(script)
    cfg = SSRConfig(hints=["Hint A.", "Hint B.", "Hint C.", "Hint D."], fast=1)
    [paths] = select_strategies([problem("q")], 2, draft, target, cfg, scorer=fake_scorer)
    assert [p.hint for p in paths] == ["Hint B.", "Hint C."]  # ties keep pool order
    assert [p.spm_score for p in paths] == [0.0, 0.0]
    # the dropped hints' drafting and scoring cost is charged too (to the best path)
    assert sum(p.draft_tokens for p in paths) == 4 * 2
    assert with_hint(problem("q"), "Hint B.")["prompt"][-1]["content"] == "q\nHint B."


def test_fast_1_stops_at_the_first_answer():
    def slow(message, done):  # "Hint A." path answers at step 0; the other one never answers
        if "Hint A." in message:
            return ("good it is 5\n\n", False)
        return ("good thinking\n\n", False)

    draft, target = FakeEngine(slow), FakeEngine(slow)
    cfg = SSRConfig(hints=["", "Hint A."], fast=1)
    probs = [problem("q")]
    paths = select_strategies(probs, 2, draft, target, cfg, scorer=fake_scorer)
    [res] = decode(probs, paths, draft, target, cfg, scorer=fake_scorer)
    assert res.info["stop"] == "first_answer"
    assert res.chosen.text == "good it is 5\n\n"
    assert draft.calls == 1  # the SPM drafts only: stopped before any further round


def test_fast_2_waits_for_two_agreeing_answers_and_fast_0_votes():
    answers = {"": ["7", "9"], "Hint A.": ["3", "9"], "Hint B.": ["4", "4"]}

    def script(message, done):
        hint = next((h for h in ("Hint A.", "Hint B.") if h in message), "")
        seq = answers[hint]
        return (f"good {seq[min(done, 1)]}\n\n", done >= 1)

    probs = [problem("q", answer="9")]
    cfg2 = SSRConfig(hints=["", "Hint A.", "Hint B."], fast=2)
    draft, target = FakeEngine(script), FakeEngine(script)
    paths = select_strategies(probs, 3, draft, target, cfg2, scorer=fake_scorer)
    [res] = decode(probs, paths, draft, target, cfg2, scorer=fake_scorer)
    # round 1 answers 7, 3, 4 (no two agree); round 2: 9, 9, 4 -> the first two agree on 9
    assert res.info["stop"] == "two_agree" and res.chosen.text.endswith("9\n\n")
    cfg0 = SSRConfig(hints=["", "Hint A.", "Hint B."], fast=0)
    draft, target = FakeEngine(script), FakeEngine(script)
    paths = select_strategies(probs, 3, draft, target, cfg0, scorer=fake_scorer)
    [res0] = decode(probs, paths, draft, target, cfg0, scorer=fake_scorer)
    assert res0.info["stop"] == "all_finished" and res0.chosen.text.endswith("9\n\n")  # majority 9, 9, 4
    cfg1 = SSRConfig(hints=["", "Hint A.", "Hint B."], fast=1)
    draft, target = FakeEngine(script), FakeEngine(script)
    [res1] = decode(probs, select_strategies(probs, 3, draft, target, cfg1, scorer=fake_scorer), draft, target, cfg1,
                    scorer=fake_scorer)
    assert res1.info["stop"] == "first_answer" and res1.chosen.text == "good 7\n\n"


def test_config_validation():
    with pytest.raises(ValueError, match="ssr.fast"):
        SSRConfig(fast=3)
    with pytest.raises(ValueError, match="hints"):
        SSRConfig(hints=[])
    with pytest.raises(ValueError, match="ssr.score"):
        SSRConfig(score="max")
    with pytest.raises(ValueError, match="ssr.regen_tokens"):
        SSRConfig(regen_tokens=0)
    with pytest.raises(ValueError, match="ssr.draft_tokens"):
        SSRConfig(draft_tokens=0)
    with pytest.raises(ValueError, match="ssr.draft_layers"):
        SSRConfig(draft_layers=-1)
    with pytest.raises(ValueError, match="PRM probability"):
        SSRConfig(score="prm", threshold=-0.3)


def test_self_draft_is_the_targets_first_layers_sharing_its_weights():
    from conftest import tiny_lora

    from frugal.evaluator.flops import policy_shape
    from frugal.evaluator.strategies.ssr import self_draft

    model, _ = tiny_lora(1.0)
    draft = self_draft(model, 1)
    assert draft.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    second = sum(p.numel() for p in model.get_base_model().model.layers[1].parameters())
    assert policy_shape(draft).layers == 1 and policy_shape(draft).params == policy_shape(model).params - second
    target_weights = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in target_weights for p in draft.parameters())  # a view: no second model
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        body = model.get_base_model().model
        hidden = body.embed_tokens(ids)
        hidden = body.layers[0](hidden, position_embeddings=body.rotary_emb(hidden, torch.arange(3)[None]))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expect = model.get_base_model().lm_head(body.norm(hidden))
        assert torch.allclose(draft(input_ids=ids).logits, expect, atol=1e-5)
    with pytest.raises(ValueError, match="draft_layers=2"):
        self_draft(model, 2)


def test_rejected_step_keeps_its_accepted_prefix_and_the_target_writes_the_rest():
    def script(prefix):
        def run(message, done):
            if done == 0:
                return (f"{prefix} says 2 plus bad 3\n\n", False)  # the draft's "bad" token is rejected
            return (f"{prefix} so it is 5", True)
        return run

    class Continue(FakeEngine):  # the target continues an open step with "and 3\n\n"
        def extend(self, problems, cands, stop_at_step=True, greedy=False, max_tokens=None):
            self.calls += 1
            out = []
            for c in cands:
                c = c.copy()
                if c.text and not c.text.endswith("\n\n"):
                    words = ["and", "3\n\n"][:max_tokens or 2]
                    c.text, c.tokens = c.text + " ".join(words), c.tokens + len(words)
                    self.counts.add(0, len(words))
                    out.append(c)
                else:
                    out.append(super().extend(problems, [c], stop_at_step, greedy, max_tokens)[0])
            return out

    probs = [problem("What is 2 + 3?")]
    cfg = SSRConfig(hints=[""], score="min", fast=0, regen_tokens=None)
    draft, target = FakeEngine(script("draft")), Continue(script("target"))
    paths = select_strategies(probs, 1, draft, target, cfg, scorer=word_scorer)
    [res] = decode(probs, paths, draft, target, cfg, scorer=word_scorer)
    # step 0: "draft says 2 plus " kept (3 tokens), the target writes "and 3\n\n"; step 1 accepted whole
    assert res.chosen.text == "draft says 2 plus and 3\n\ndraft so it is 5"
    assert res.info["target_tokens"] == 2 and res.info["accepted"] == 1 and res.info["proposed"] == 2
    assert res.info["accepted_tokens"] == 4 + 5
    # without the prefix the target rewrites the whole step
    cfg_whole = SSRConfig(hints=[""], score="min", fast=0, keep_prefix=False, regen_tokens=None)
    draft, target = FakeEngine(script("draft")), Continue(script("target"))
    paths = select_strategies(probs, 1, draft, target, cfg_whole, scorer=word_scorer)
    [res] = decode(probs, paths, draft, target, cfg_whole, scorer=word_scorer)
    assert res.chosen.text == "target says 2 plus bad 3\n\ndraft so it is 5"
    assert res.info["target_tokens"] == 6
    # regen_tokens=1: the target writes one token, then the draft proposes the rest of the open step
    cfg_one = SSRConfig(hints=[""], score="min", fast=0, regen_tokens=1)
    draft, target = FakeEngine(script("draft")), Continue(script("target"))
    paths = select_strategies(probs, 1, draft, target, cfg_one, scorer=word_scorer)
    [res] = decode(probs, paths, draft, target, cfg_one, scorer=word_scorer)
    assert res.info["target_tokens"] == 1
    assert res.chosen.text.startswith("draft says 2 plus and")


def _reference_logps(model, engine, prompt, ids, step_ids):
    """Log-probs of ``step_ids`` after the templated prompt and ``ids`` by one full forward pass."""
    full = engine.core.prompt_ids(engine.core.prompt_text(prompt)) + list(ids) + list(step_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    at = len(full) - len(step_ids)
    lp = torch.stack([logp[t - 1, full[t]] for t in range(at, len(full))])
    top = torch.stack([logp[t - 1].max() for t in range(at, len(full))])
    return lp, top


def test_judge_criteria_by_hand():
    step = "it is 7 now"
    sc = Scored([-0.1, -0.2, -3.0, -0.1], [-0.1, -0.1, -0.5, -0.1], [0, 3, 6, 8], 10)
    assert sc.mean == pytest.approx(-0.85)
    v = sc.judge(step, "mean", -1.0)  # whole step: mean -0.85 >= -1
    assert v.accepted(step) and v.kept_tokens == 4
    assert sc.judge(step, "mean", -0.5).keep == 0  # all or nothing
    v = sc.judge(step, "min", -1.0)  # "7" (-3.0) fails: keep "it is "
    assert (v.keep, v.kept_tokens, v.score) == (6, 2, pytest.approx(-3.0)) and step[:v.keep] == "it is "
    v = sc.judge(step, "margin", 0.0)  # "is" is not the greedy token (-0.2 vs -0.1): keep "it "
    assert (v.keep, v.kept_tokens) == (3, 1) and v.score == pytest.approx(-2.5)
    assert sc.judge(step, "margin", -3.0).accepted(step)
    assert not Scored([], [], [], 0).judge("", "margin", 0.0).accepted(" ")


def test_score_steps_matches_full_logits_on_tiny_model():
    """Verification is one pass over the drafted tokens on the target's cached prefix: hand-counted tokens
    run, and the log-probs of a full forward pass over prompt + path + step."""
    from frugal.inference.engine import Candidate, Engine, EngineConfig
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.inference.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    engine = HFEngine(model, tok, HFEngineConfig(max_step_tokens=5))
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}]]
    problems = [{"prompt": p} for p in prompts]
    # path 0: five tokens the target wrote itself (their KV is cached); path 1: text it never saw
    written = engine.extend(problems, [Candidate(0, stream=0)])[0]
    prefixes = [written, "First,"]
    steps = [" add them: 5\n\n", "Hello there, friend"]
    step_ids = [tok(x, add_special_tokens=False)["input_ids"] for x in steps]
    first = len(tok("First,", add_special_tokens=False)["input_ids"])
    before = engine.counts.snapshot()
    scored = score_steps(engine, prompts, prefixes, steps, step_ids=[step_ids[0], None])
    spent = engine.counts.since(before)
    # hand count: path 0 runs its last token (its logits judge the first drafted token) + the drafted ones;
    # path 1 runs the prompt's last token, the text "First," and the step
    assert [sc.processed for sc in scored] == [1 + len(step_ids[0]), 1 + first + len(step_ids[1])]
    new_prompt = len(engine.core.prompt_ids(engine.core.prompt_text(prompts[1]))) - 1  # "Hi" is prefilled once, first
    assert spent.prefill == sum(sc.processed for sc in scored) + new_prompt
    # the trailing delimiter token is run (its KV is the path's, if accepted) but not judged
    assert len(scored[0].logp) == len(step_ids[0]) - 1 and spent.scored == len(step_ids[0]) + len(step_ids[1])
    for prompt, prefix, ids, sc in zip(prompts, prefixes, step_ids, scored):
        prefix_ids = prefix.ids.ids if isinstance(prefix, Candidate) else tok(prefix, add_special_tokens=False)["input_ids"]
        lp, top = _reference_logps(model, engine, prompt, prefix_ids, ids)
        np.testing.assert_allclose(sc.logp, lp[:len(sc.logp)].numpy(), atol=1e-5)
        np.testing.assert_allclose(sc.top, top[:len(sc.top)].numpy(), atol=1e-5)
    for step, ids, sc in zip(steps, step_ids, scored):  # each token's start, in characters of the step
        for t, start in enumerate(sc.starts):
            assert step[:start] == tok.decode(ids[:t])
    # the same path verified again with another step: only its last token and the new step run now
    again = score_steps(engine, prompts[1:], ["First,"], [" bye"])[0]
    assert again.processed == 1 + len(tok(" bye", add_special_tokens=False)["input_ids"])
    [empty] = score_steps(engine, prompts[:1], [""], ["  \n\n"])  # nothing to accept
    assert empty.mean == float("-inf") and not empty.judge("  \n\n", "margin", -100.0).accepted("  \n\n")
    # margin 0 on the tiny model: the accepted prefix ends at the first non-greedy token
    step, sc = steps[1], scored[1]
    gaps = np.array(sc.logp) - np.array(sc.top)
    first_bad = int(np.argmax(gaps < 0)) if (gaps < 0).any() else len(gaps)
    v = sc.judge(step, "margin", 0.0)
    assert v.kept_tokens == first_bad and (v.accepted(step) == (first_bad == len(gaps)))


def test_fast_mode_reads_answers_only_at_step_ends():
    from frugal.inference.engine import Candidate
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.evaluator.strategies.ssr import Path, _stop

    cut = Path(0, "", Candidate(0, "so it is 1"))  # a one-token regeneration stopped inside "12"
    assert _stop([cut], problem("q", "12"), fast=1) is None
    done = Path(0, "", Candidate(0, "so it is 12\n\n"))
    assert _stop([cut, done], problem("q", "12"), fast=1) == "first_answer"
    assert _stop([Path(0, "", Candidate(0, "so it is 1", finished=True))], problem("q"), fast=1) == "first_answer"


def test_frugal_eval_ssr_counts_the_draft_in_summary(tmp_path, monkeypatch):
    """`frugal eval search=ssr`: the draft (here the self-speculative one, the target's first layer) is
    listed in summary.json with its tokens and FLOPs and summed into flops_total; a second run in the same
    process counts the same (no engine or count survives a run)."""
    import json
    import sys

    from frugal.recipes.cli import main

    monkeypatch.setattr(sys, "argv", ["frugal"])
    rows = []
    for run in ("a", "b"):
        out = tmp_path / run
        rc = main(["eval", "model=tiny_random", "search=ssr", "search.budgets=[2]", "search.ssr.draft_layers=1",
                   "search.ssr.hints=['','Think.','Be brief.']", "limit=2", "engine.max_new_tokens=10",
                   "engine.max_step_tokens=4", "plots=false", f"output_dir={out}",
                   f"hydra.run.dir={tmp_path / 'hydra' / run}"])
        assert rc == 0
        rows.append(json.loads((out / "summary.json").read_text())["rows"][0])
    row = rows[0]
    assert set(row["models"]) == {"target", "draft"}
    draft, target = row["models"]["draft"], row["models"]["target"]
    assert draft["generated"] > 0 and draft["flops"] > 0 and target["prefill"] > 0
    assert row["flops_total"] == pytest.approx(draft["flops"] + target["flops"])
    assert row["flops_policy"] == target["flops"]
    assert rows[1]["models"] == rows[0]["models"] and rows[1]["flops_total"] == row["flops_total"]


def test_draft_identical_to_target_is_accepted_whole_and_verification_runs_only_drafted_tokens():
    """With the target itself as the draft (greedy, margin 0) every drafted step is the target's own greedy
    text: all accepted, the target writes nothing, and each verification pass runs the drafted tokens plus
    the one token before them (the accepted path is in the target's KV store), never the path again."""
    from conftest import tiny_lora

    from frugal.inference.engine import Engine, EngineConfig
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig

    model, tok = tiny_lora(1.0)
    problems = [{"prompt": [{"role": "user", "content": f"What is {a} + 3?"}], "answer": "5",
                 "answer_format": "number"} for a in range(3)]
    cfg = SSRConfig(hints=["", "Think."])
    ecfg = HFEngineConfig(max_step_tokens=4, max_new_tokens=16)
    draft, target = HFEngine(model, tok, ecfg, "draft"), HFEngine(model, tok, ecfg, "target")
    paths = select_strategies(problems, 2, draft, target, cfg)
    d0, t0 = draft.counts.snapshot(), target.counts.snapshot()
    res = decode(problems, paths, draft, target, cfg)
    drafted, verified = draft.counts.since(d0), target.counts.since(t0)
    rounds = sum(r.info["proposed"] for r in res) - sum(len(g) for g in paths)  # the SPM's first steps are not here
    assert all(r.info["accepted"] == r.info["proposed"] and r.info["target_tokens"] == 0 for r in res)
    assert verified.decode == 0 and drafted.decode > 0 and rounds > 0
    assert verified.prefill == drafted.decode + rounds  # hand count: drafted tokens + one per verified step
    assert verified.scored == drafted.decode


def test_spm_hints_share_their_problems_prompt_prefill():
    """The selective parallel module scores one problem's hints in one target pass: the prompt they share
    (system prompt + question) is prefilled once, each hint's own tokens over it."""
    from frugal.inference.engine import Engine, EngineConfig
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.inference.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))
    ecfg = HFEngineConfig(max_step_tokens=3, max_new_tokens=6)
    draft, target = HFEngine(model, tok, ecfg, "draft"), HFEngine(model, tok, ecfg, "target")
    q = problem("A farmer has 12 cows and buys 7 more, then sells 4 of them at the market. How many cows now?")
    hints = ["Think step by step.", "Work backwards.", "Use small numbers."]
    firsts = select_strategies([q], 2, draft, target, SSRConfig(hints=hints, greedy=False))  # (greedy: "\n\n")
    assert all(path.cand.text.strip() for path in firsts[0])
    heads = [target.core.prompt_ids(target.core.prompt_text(with_hint(q, h)["prompt"]))[:-1] for h in hints]
    shared = next(i for i, col in enumerate(zip(*heads)) if len(set(col)) > 1)
    assert shared >= 32
    prompt_prefill = shared + sum(len(h) - shared for h in heads)
    assert target.counts.prefill - target.counts.scored - len(hints) == prompt_prefill  # + each row: last prompt token


class StepPRM:
    """A scripted PRM: a step scores 0.9 when it says "good", else 0.1; records what it was asked."""

    def __init__(self):
        self.asked = []

    def score_partial(self, prompts, texts):
        self.asked += [(p[-1]["content"], t) for p, t in zip(prompts, texts)]
        return [[0.9 if "good" in s else 0.1 for s in split_steps(t, "\n\n")] for t in texts]


def test_prm_gate_accepts_by_prm_score_and_the_target_runs_only_on_rejections():
    """``score=prm`` (reward-guided speculative decoding): the PRM, not the target, judges the drafted
    steps and ranks the SPM's hints; the target is never asked to score, and rewrites a rejected step
    whole (no regen_tokens cap). Hand-worked: step 0 "good" (0.9 ≥ 0.5) kept, step 1 "bad" (0.1) rewritten
    by the target, step 2 has no "good": rewritten."""
    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.evaluator.strategies.ssr import ssr

    def never(*a, **k):
        raise AssertionError("the target must not score drafted steps with score=prm")

    probs = [problem("What is 2 + 3?")]
    cfg = SSRConfig(hints=["", "Hint A."], score="prm", threshold=0.5, fast=0)
    draft, target = FakeEngine(three_step("draft")), FakeEngine(three_step("target"))
    prm = CountingPRM(StepPRM())
    paths = select_strategies(probs, 1, draft, target, cfg, scorer=never, prm=prm)
    assert target.calls == 0 and [p.hint for p in paths[0]] == [""]  # both 0.9: pool order
    assert paths[0][0].spm_score == pytest.approx(0.9)
    [res] = decode(probs, paths, draft, target, cfg, scorer=never, prm=prm)
    assert res.chosen.text == "draft good step\n\ntarget bad step\n\ntarget so it is 5"
    assert res.info["accepted"] == 1 and res.info["proposed"] == 3 and res.info["scored_tokens"] == 0
    assert res.info["target_tokens"] == 3 + 5 and target.calls == 2 and target.counts.prefill == 0
    # the PRM reads the problem's own question (not the hint) and the whole partial solution
    assert prm.prm.asked[-1] == ("What is 2 + 3?", "draft good step\n\ntarget bad step\n\ndraft so it is 5")
    assert prm.counts.calls == 1 + 2  # SPM, then the two later rounds
    with pytest.raises(ValueError, match="prm_path"):
        ssr(probs, 1, draft, target, cfg, prm=None)


def test_prm_gate_all_accepted_never_runs_the_target_and_all_rejected_is_the_target_alone():
    """On a tiny model: a PRM that passes every step leaves the target idle (no token read or written); one
    that passes none makes SSR write the target-only text of the same paths token for token, the target
    reading each token once (its prefill is the target-only run's)."""
    from conftest import tiny_lora

    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.inference.engine import Engine, EngineConfig
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig

    class Constant:
        def __init__(self, p):
            self.p = p

        def score_partial(self, prompts, texts):
            return [[self.p] * max(1, len(split_steps(t, "\n\n"))) for t in texts]

    model, tok = tiny_lora(1.0)
    problems = [{"prompt": [{"role": "user", "content": f"What is {a} + 3?"}], "answer": "5",
                 "answer_format": "number"} for a in range(3)]
    ecfg = HFEngineConfig(max_step_tokens=4, max_new_tokens=12)
    draft_model, _ = tiny_lora(0.5)  # a different draft, so that rejections change the text
    draft, target = HFEngine(draft_model, tok, ecfg, "draft"), HFEngine(model, tok, ecfg, "target")
    cfg = SSRConfig(hints=["", "Think."], score="prm", threshold=0.5, fast=0)
    res = decode(problems, select_strategies(problems, 2, draft, target, cfg, prm=CountingPRM(Constant(0.9))),
                 draft, target, cfg, prm=CountingPRM(Constant(0.9)))
    assert target.counts.prefill == target.counts.decode == 0
    assert all(r.info["accepted"] == r.info["proposed"] > 0 for r in res)

    paths = select_strategies(problems, 2, draft, target, cfg, prm=CountingPRM(Constant(0.1)))
    target.clear_cache()
    t0 = target.counts.snapshot()
    gated = decode(problems, paths, draft, target, cfg, prm=CountingPRM(Constant(0.1)))
    spent = target.counts.since(t0)
    target.clear_cache()
    t1 = target.counts.snapshot()
    alone = decode(problems, paths, None, target, SSRConfig(hints=cfg.hints, fast=0, speculative=False))
    base = target.counts.since(t1)
    assert [c.text for r in gated for c in r.candidates] == [c.text for r in alone for c in r.candidates]
    assert [r.chosen.text for r in res] != [r.chosen.text for r in alone]  # the draft alone writes other text
    assert all(r.info["accepted"] == 0 for r in gated)
    assert spent.decode == base.decode and spent.prefill == base.prefill


def _tiny_prm_folder(path):
    from frugal.train.lora import LoraConfig
    from frugal.inference.models import ModelConfig
    from frugal.train.prm import PRMConfig, build_prm

    torch.manual_seed(0)
    prm = build_prm(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), LoraConfig(r=4, alpha=8),
                    PRMConfig(), torch.device("cpu"))
    return prm.save(path)


def test_frugal_eval_ssr_prm_gate_counts_the_prm_and_needs_one(tmp_path, monkeypatch):
    """`frugal eval search=ssr search.ssr.score=prm`: the PRM that judges the steps is listed in
    summary.json and summed into flops_total; without prm_path the config is refused."""
    import json
    import sys

    from frugal.recipes.cli import main

    monkeypatch.setattr(sys, "argv", ["frugal"])
    folder = _tiny_prm_folder(tmp_path / "prm")
    common = ["eval", "model=tiny_random", "search=ssr", "search.budgets=[2]", "search.ssr.draft_layers=1",
              "search.ssr.hints=['','Think.']", "search.ssr.score=prm", "search.ssr.threshold=0.5",
              "search.ssr.greedy=false", "limit=2",
              "engine.max_new_tokens=10", "engine.max_step_tokens=4", "plots=false"]
    rc = main(common + [f"prm_path={folder}", f"output_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'h'}"])
    assert rc == 0
    row = json.loads((tmp_path / "run" / "summary.json").read_text())["rows"][0]
    assert set(row["models"]) == {"target", "draft", "prm"}
    assert row["models"]["prm"]["flops"] > 0 and row["models"]["draft"]["flops"] > 0
    assert row["flops_total"] == pytest.approx(sum(m["flops"] for m in row["models"].values()))
    from frugal.evaluator.config import EvalConfig, SSRSearchConfig

    with pytest.raises(ValueError, match="score=prm judges drafted steps with a PRM: set prm_path"):
        EvalConfig(search=SSRSearchConfig(ssr=SSRConfig(score="prm", threshold=0.5)))


def test_bench_ssr_smoke_prints_the_gated_and_bench_lines(tmp_path):
    """scripts/bench_ssr.py end to end on the tiny random model (draft = target, a random PRM; sampled steps:
    its greedy steps are blank; a PRM criterion first, the headline): a
    CRITERION line per criterion, the SELF line and the BENCH line, and the PRM's FLOPs in summary.json."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folder = _tiny_prm_folder(tmp_path / "prm")
    out = subprocess.run(
        [sys.executable, str(root / "scripts" / "bench_ssr.py"), "--draft", "builtin:tiny-random", "--target",
         "builtin:tiny-random", "--adapter", "none", "--problems", "2", "--hints", "2", "--criteria",
         "prm:0.5", "margin:0:regen=1", "--prm", str(folder), "--self-draft-layers", "1", "--max-new-tokens", "8",
         "--max-step-tokens", "4", "--sample", "--threads", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("BENCH ssr target_token_ratio=") and "acc_delta=" in lines[-1]
    assert any(x.startswith("CRITERION ssr criterion=prm:0.5 acceptance_rate=") for x in lines)
    assert any(x.startswith("CRITERION ssr criterion=margin:0:regen=1 acceptance_rate=") for x in lines)
    assert any(x.startswith("SELF ssr draft_layers=1 criterion=margin:0:regen=1 ") for x in lines)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    gated = next(x for x in summary["ssr"] if x["spec"] == "prm:0.5")
    assert gated["report"]["flops_prm"] > 0 and gated["report"]["prm_prefill"] > 0
    assert summary["ssr"][1]["report"]["flops_prm"] == 0  # the target-verified criterion runs no PRM

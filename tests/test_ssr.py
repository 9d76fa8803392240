"""SSR (evaluator/strategies/ssr.py): acceptance logic with a fake draft / target / scorer, fast-mode
stopping, strategy selection, token accounting, and the target scorer against full logits."""

from types import SimpleNamespace

import pytest
import torch

from evaluator.engine import Counts
from evaluator.strategies.ssr import SSRConfig, decode, mean_logprobs, select_strategies, with_hint
from train.prm import split_steps


class FakeEngine:
    """Writes scripted steps: ``script(user_message, steps_done) -> (step_text, finishes)``; one token per
    word; counts generated tokens like the real engine."""

    def __init__(self, script, max_steps=6):
        self.script = script
        self.cfg = SimpleNamespace(max_steps=max_steps, step_delimiter="\n\n")
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


def fake_scorer(engine, prompts, prefixes, steps, batch_size=32, how="mean"):
    """Accept exactly the steps that say "good"; charge one token per word to the target."""
    for s in steps:
        engine.counts.add(len(s.split()))
    return [0.0 if "good" in s else -5.0 for s in steps], [len(s.split()) for s in steps]


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


def test_mean_logprobs_matches_full_logits_on_tiny_model():
    from evaluator.engine import Engine, EngineConfig
    from train.models import ModelConfig, load_model

    model, tok = load_model(ModelConfig(name_or_path="builtin:tiny-random"), torch.device("cpu"))
    engine = Engine(model, tok, EngineConfig())
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}]]
    prefixes, steps = ["First,", ""], [" add them: 5\n\n", "Hello there"]
    scores, processed = mean_logprobs(engine, prompts, prefixes, steps)
    for prompt, prefix, step, score, n in zip(prompts, prefixes, steps, scores, processed):
        head = tok(engine.prompt_text(prompt) + prefix, add_special_tokens=False)["input_ids"]
        full = tok(engine.prompt_text(prompt) + prefix + step.rstrip(), add_special_tokens=False)["input_ids"]
        assert full[:len(head)] == head
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
        ref = torch.stack([logp[t - 1, full[t]] for t in range(len(head), len(full))]).mean()
        assert score == pytest.approx(float(ref), abs=1e-4)
        assert n == len(full)
    assert engine.counts.prefill == sum(processed)
    assert mean_logprobs(engine, prompts[:1], [""], ["  \n\n"])[0] == [float("-inf")]  # nothing to accept
    # how="min": the weakest token of the step
    low, _ = mean_logprobs(engine, prompts[1:], [""], ["Hello there"], how="min")
    full = tok(engine.prompt_text(prompts[1]) + "Hello there", add_special_tokens=False)["input_ids"]
    head = tok(engine.prompt_text(prompts[1]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    assert low[0] == pytest.approx(min(float(logp[t - 1, full[t]]) for t in range(len(head), len(full))), abs=1e-4)

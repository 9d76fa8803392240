"""Evaluator: strategies against a scripted fake policy + fake PRM (the right pick is known), resampling
statistics, token / FLOP accounting by hand, the real engine on tiny-random, and `frugal eval` end to end."""

import re

import pytest
import torch

from frugal.evaluator.config import ParticleFilterConfig, search_config
from frugal.inference.engine import TokenIds
from frugal.inference.engine import Candidate, Counts
from frugal.inference.hf_engine import HFEngine, HFEngineConfig
from frugal.evaluator.prm_counts import CountingPRM
from frugal.evaluator.flops import ModelShape, policy_shape
from frugal.evaluator.strategies import get
from frugal.evaluator.strategies.common import best, logit, vote
from frugal.evaluator.strategies.particle_filter import ess, multinomial_resample, smc, systematic_resample
from frugal.rewards.steps import split_steps

DELIM = "\n\n"


# ---------------------------------------------------------------------- fakes

class FakeEngine:
    """Scripted policy. Each call hands row k of its unfinished candidates the step ``v=<value>`` with
    value = ``script(call, k, cand)``; a candidate finishes after ``length`` steps. ``stop_at_step=False``
    without ``max_tokens`` completes the solution; with ``max_tokens`` it writes one unfinished step.
    Every call is recorded, and a finished candidate handed to it is an error."""

    def __init__(self, script, length=3, answer=None):
        self.cfg = HFEngineConfig(max_steps=length)
        self.script, self.length, self.answer = script, length, answer
        self.calls, self.counts = [], Counts()

    def extend(self, problems, cands, max_tokens=None, stop_at_step=True, greedy=False):
        out = [c.copy() for c in cands]
        todo = [c for c in out if not c.finished]
        self.calls.append({"cands": [c.copy() for c in todo], "max_tokens": max_tokens, "stop_at_step": stop_at_step})
        call = len(self.calls) - 1
        for k, c in enumerate(todo):
            assert not c.finished
            if max_tokens is not None and not stop_at_step:  # a τ-token prefix: one open step
                c.text += f"v={self.script(call, k, c)}"
                c.tokens += 1
                continue
            while True:
                if c.text and not c.text.endswith(DELIM):  # finish an open step
                    c.text += DELIM
                else:
                    c.text += f"v={self.script(call, k, c)}" + DELIM
                c.tokens += 1
                n = len(split_steps(c.text, DELIM))
                if n >= self.length:
                    c.finished = True
                    if self.answer:
                        c.text += self.answer(c)
                if stop_at_step or c.finished:
                    break
            self.counts.add(0, 1)
        return out


class FakePRM:
    """Step score = the number after ``v=`` in the step (0.5 if none); ``last_tokens`` = steps scored."""

    def __init__(self):
        self.last_tokens = 0

    def score_partial(self, prompts, texts):
        out = [[_value(s) for s in split_steps(t, DELIM)] for t in texts]
        self.last_tokens = sum(len(s) for s in out)
        return out


def _value(step):
    m = re.search(r"v=([0-9.]+)", step)
    return float(m.group(1)) if m else 0.5


PROBLEMS = [{"prompt": [{"role": "user", "content": "q0"}], "answer": "1", "answer_format": "number"},
            {"prompt": [{"role": "user", "content": "q1"}], "answer": "2", "answer_format": "number"}]


def _cfg(**kw):
    return search_config(kw.pop("name", "best_of_n"), **kw)


# ---------------------------------------------------------------------- strategies on the fakes

def test_best_of_n_picks_highest_aggregate_and_weighted_vote():
    values = [[0.2, 0.9, 0.4, 0.7], [0.6, 0.1, 0.3, 0.5]]  # per problem, per candidate (every step)
    engine = FakeEngine(lambda call, k, c: values[c.problem][k % 4], length=2)
    res = get("best_of_n")(PROBLEMS, 4, engine, CountingPRM(FakePRM()), _cfg())
    assert [_value(r.chosen.steps()[0]) for r in res] == [0.9, 0.6]
    assert len(engine.calls) == 1 and len(engine.calls[0]["cands"]) == 8  # one batched call for all
    # weighted: three weak candidates agreeing on an answer outweigh one strong one (the appended answer
    # is a step scored 0.5, so min aggregation keeps the v= score).
    answers = ["7", "7", "7", "9"]
    engine = FakeEngine(lambda call, k, c: [0.3, 0.3, 0.3, 0.8][k % 4], length=1,
                        answer=lambda c: f"answer {answers[int(c.text[2:5] == '0.8') * 3]}")
    res = get("best_of_n")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()), _cfg(weighted=True, aggregation="min"))
    assert res[0].chosen.text.endswith("answer 7")
    res = get("best_of_n")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()), _cfg(weighted=False, aggregation="min"))
    assert res[0].chosen.text.endswith("answer 9")


BOXED = [{"prompt": [{"role": "user", "content": "q0"}], "answer": "1", "answer_format": "boxed"}]


def test_best_prefers_a_stated_answer_over_a_higher_scored_reply_without_one():
    # A reply that stopped after a right first step (0.9) outscores a complete one whose answer step the
    # PRM doubts (0.6), but it states no answer, so it cannot be graded right: the complete one is chosen.
    unfinished = Candidate(0, "v=0.9" + DELIM, finished=True, scores=[0.9])
    complete = Candidate(0, "v=0.8" + DELIM + "\\boxed{1}", finished=True, scores=[0.8, 0.6])
    weaker = Candidate(0, "v=0.3" + DELIM + "\\boxed{2}", finished=True, scores=[0.3, 0.5])
    assert best([unfinished, weaker, complete], "last", BOXED) is complete
    assert best([unfinished, weaker], "last", BOXED) is weaker
    # with no answer anywhere the score decides; ties go to the earliest candidate
    twin = Candidate(0, "v=0.9" + DELIM, finished=True, scores=[0.9])
    assert best([Candidate(0, "v=0.2", scores=[0.2]), unfinished, twin], "last", BOXED) is unfinished


def test_majority_vote_merges_equal_answers():
    cands = [Candidate(0, "so 6.0"), Candidate(0, "so 5"), Candidate(0, "so 6"), Candidate(0, "no idea")]
    assert vote(cands, PROBLEMS).text == "so 6.0"
    assert vote(cands, PROBLEMS, [0.1, 0.9, 0.1, 5.0]).text == "so 5"


def test_early_rejection_keeps_exactly_the_top_candidates():
    partial = [0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6]
    engine = FakeEngine(lambda call, k, c: partial[k] if call == 0 else 0.5, length=3)
    prm = CountingPRM(FakePRM())
    res = get("early_rejection")(PROBLEMS[:1], 8, engine, prm, _cfg(name="early_rejection", tau=16, beam_width=4))
    first, second = engine.calls
    assert first["max_tokens"] == 16 and len(first["cands"]) == 8
    # only the top 8 // 4 = 2 prefixes (0.9 and 0.8) are completed
    assert sorted(_value(c.text) for c in second["cands"]) == [0.8, 0.9]
    assert {_value(c.steps()[0]) for c in res[0].candidates} == {0.8, 0.9}
    assert res[0].info["rejected"] == 6
    # threshold: everything scoring >= 0.65 survives
    engine = FakeEngine(lambda call, k, c: partial[k] if call == 0 else 0.5, length=3)
    res = get("early_rejection")(PROBLEMS[:1], 8, engine, prm, _cfg(name="early_rejection", threshold=0.65))
    assert sorted(_value(c.text) for c in engine.calls[1]["cands"]) == [0.7, 0.8, 0.9]


def test_early_rejection_rate_and_lone_survivor_not_rescored():
    partial = [0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6]
    prm = CountingPRM(FakePRM())
    # rate 0.75 keeps round(8 · 0.25) = 2: the pair is completed and both completions are scored
    engine = FakeEngine(lambda call, k, c: partial[k] if call == 0 else 0.5, length=3)
    get("early_rejection")(PROBLEMS[:1], 8, engine, prm, _cfg(name="early_rejection", tau=16, rejection_rate=0.75))
    assert sorted(_value(c.text) for c in engine.calls[1]["cands"]) == [0.8, 0.9] and prm.counts.calls == 2
    # rate 0.9 keeps max(1, round(0.8)) = 1: the lone survivor is the answer, so no second PRM call
    prm = CountingPRM(FakePRM())
    engine = FakeEngine(lambda call, k, c: partial[k] if call == 0 else 0.5, length=3)
    res = get("early_rejection")(PROBLEMS[:1], 8, engine, prm, _cfg(name="early_rejection", tau=16, rejection_rate=0.9))
    assert [_value(c.text) for c in engine.calls[1]["cands"]] == [0.9] and prm.counts.calls == 1
    assert res[0].chosen.finished and res[0].chosen.text.startswith("v=0.9") and res[0].info["rejected"] == 7
    with pytest.raises(ValueError, match="rejection_rate"):
        _cfg(name="early_rejection", rejection_rate=1.0)


def test_beam_keeps_the_best_and_expands_them():
    # step-1 values per candidate; later steps score 0.5 except children of the 0.95 beam, which score 0.99
    first = [0.3, 0.95, 0.1, 0.6]

    def script(call, k, c):
        if call == 0:
            return first[k]
        return 0.99 if c.text.startswith("v=0.95") else 0.5

    engine = FakeEngine(script, length=3)
    res = get("beam")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()), _cfg(name="beam", beam_width=2))
    # keep 4 // 2 = 2 beams (0.95 and 0.6), each expanded into 2 children
    assert sorted(c.text.split(DELIM)[0] for c in engine.calls[1]["cands"]) == ["v=0.6", "v=0.6", "v=0.95", "v=0.95"]
    assert res[0].chosen.text.startswith("v=0.95") and res[0].chosen.finished


def test_early_rejection_beam_completes_only_survivors_steps():
    # Every τ call writes an open (unfinished) step "v=<value>"; every later call without max_tokens
    # must finish the open steps of exactly the top budget // beam_width candidates of that τ call, at
    # every step of the search, and the next τ call must extend only those survivors' children.
    tau_values = {0: [0.3, 0.95, 0.1, 0.6], 2: [0.2, 0.7, 0.9, 0.4], 4: [0.85, 0.05, 0.5, 0.65]}

    class OpenStepEngine(FakeEngine):
        def extend(self, problems, cands, max_tokens=None, stop_at_step=True, greedy=False):
            out = [c.copy() for c in cands]
            todo = [c for c in out if not c.finished]
            call = len(self.calls)
            self.calls.append({"cands": [c.copy() for c in todo], "max_tokens": max_tokens,
                               "stop_at_step": stop_at_step})
            for k, c in enumerate(todo):
                if max_tokens is not None:  # τ tokens: an open step
                    assert not c.text or c.text.endswith(DELIM), "a τ call must start a new step"
                    c.text += f"v={tau_values[call][k]}"
                else:  # finish the open step
                    assert c.text and not c.text.endswith(DELIM), "only open steps are completed"
                    c.text += DELIM
                    c.finished = len(split_steps(c.text, DELIM)) >= self.length
                c.tokens += 1
            self.calls[-1]["out"] = [c.copy() for c in todo]
            return out

    engine = OpenStepEngine(None, length=3)
    res = get("early_rejection")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()),
                                 _cfg(name="early_rejection", er_search="beam", beam_width=2, tau=8))
    calls = engine.calls
    assert [c["max_tokens"] for c in calls] == [8, None, 8, None, 8, None]
    assert [len(c["cands"]) for c in calls] == [4, 2, 4, 2, 4, 2]
    for i in range(0, len(calls), 2):
        tau_out, completed = calls[i]["out"], calls[i + 1]["cands"]
        ranked = sorted(tau_out, key=lambda c: -_value(c.steps()[-1]))
        survivors = sorted(c.text for c in ranked[:2])
        assert sorted(c.text for c in completed) == survivors, f"call {i + 1} completed a rejected candidate"
        if i + 2 < len(calls):  # the next τ call extends two children of each survivor, nothing else
            assert sorted(c.text for c in calls[i + 2]["cands"]) == sorted(t + DELIM for t in survivors for _ in range(2))
    # the answer is the best of the last round's completed survivors
    assert res[0].chosen.finished
    assert res[0].chosen.text == max(calls[-1]["out"], key=lambda c: _value(c.steps()[-1])).text


def test_systematic_resampling_is_unbiased_with_floor_or_ceil_counts():
    w = torch.tensor([0.05, 0.35, 0.1, 0.5])
    n, gen = 7, torch.Generator().manual_seed(0)
    totals = torch.zeros(4, dtype=torch.float64)
    trials = 4000
    for _ in range(trials):
        counts = torch.bincount(systematic_resample(w, n, gen), minlength=4).double()
        assert torch.all(counts >= torch.floor(n * w.double())) and torch.all(counts <= torch.ceil(n * w.double()))
        totals += counts
    assert torch.allclose(totals / trials, n * w.double(), atol=0.05)


@pytest.mark.parametrize("resampler", [multinomial_resample, systematic_resample])
def test_resampling_frequencies_match_weights(resampler):
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    idx = resampler(w, 20000, torch.Generator().manual_seed(1))
    freq = torch.bincount(idx, minlength=4).double() / 20000
    assert torch.allclose(freq, w.double(), atol=0.015)
    assert ess(torch.full((4,), 0.25)) == pytest.approx(4.0)


def test_particle_filter_weights_and_finished_particles_persist():
    # 4 particles; particle 0 finishes at step 1 with score 0.9, the others score 0.2 at every step.
    def script(call, k, c):
        return 0.9 if call == 0 and k == 0 else 0.2

    class Engine1(FakeEngine):
        def extend(self, problems, cands, **kw):
            out = super().extend(problems, cands, **kw)
            for c in out:
                if c.text.startswith("v=0.9"):
                    c.finished = True
            return out

    engine = Engine1(script, length=4)
    torch.manual_seed(0)
    res = get("particle_filter")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()),
                                 _cfg(name="particle_filter", resampling="multinomial", ess_threshold=1.0))
    # the finished particle is never extended again (FakeEngine asserts it), stays in the pool and wins
    assert res[0].chosen.text == "v=0.9" + DELIM and res[0].chosen.finished
    assert all(not c.text.startswith("v=0.9") for call in engine.calls[1:] for c in call["cands"])
    # one step of SMC: resampling frequencies follow softmax(logit(r)) = 9 : 0.25 : 0.25 : 0.25
    engine = FakeEngine(lambda call, k, c: 0.9 if k == 0 else 0.2, length=4)
    engine.cfg.max_steps = 0  # loop once: propagate, weight, resample
    hits, trials = 0, 400
    for seed in range(trials):
        sw = smc(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()),
                 _cfg(name="particle_filter", resampling="multinomial", ess_threshold=1.0),
                 generator=torch.Generator().manual_seed(seed))[0]
        hits += sum(c.text.startswith("v=0.9") for c in sw.particles)
    assert hits / (4 * trials) == pytest.approx(9 / 9.75, abs=0.03)


def test_particle_filter_answer_is_the_weighted_vote_by_default():
    # Final particles: three agree on 7 with final scores 0.3 (sum 0.9), one says 9 with 0.8. The default
    # answer (search.final=weighted_majority) is 7; final=best takes the single highest score, 9.
    from frugal.evaluator.strategies.particle_filter import choose

    pool = [Candidate(0, f"v={r}{DELIM}\\boxed{{{a}}}", finished=True, scores=[r])
            for r, a in ((0.3, 7), (0.8, 9), (0.3, 7), (0.3, 7))]
    assert ParticleFilterConfig().final == "weighted_majority"
    assert choose(pool, BOXED, _cfg(name="particle_filter")).text.endswith("\\boxed{7}")
    assert choose(pool, BOXED, _cfg(name="particle_filter", final="best")).text.endswith("\\boxed{9}")
    # and 7 loses the vote once its summed score falls below 9's: 3 × 0.25 = 0.75 < 0.8
    for c in pool:
        c.scores = [0.25] if c.text.endswith("{7}") else c.scores
    assert choose(pool, BOXED, _cfg(name="particle_filter")).text.endswith("\\boxed{9}")


def test_particle_filter_drops_a_particle_that_finished_without_an_answer():
    # Particle 0 stops after one step scored 0.9 without stating an answer; the others go on to a boxed
    # answer with step scores 0.2. Weighted at r = 0, it is resampled away and never chosen.
    class Engine1(FakeEngine):
        def extend(self, problems, cands, **kw):
            out = super().extend(problems, cands, **kw)
            for c in out:
                if c.text.startswith("v=0.9"):
                    c.finished = True
            return out

    engine = Engine1(lambda call, k, c: 0.9 if call == 0 and k == 0 else 0.2, length=2,
                     answer=lambda c: "\\boxed{1}")
    cfg = _cfg(name="particle_filter", resampling="systematic", ess_threshold=1.0)
    sw = smc(BOXED, 4, engine, CountingPRM(FakePRM()), cfg, generator=torch.Generator().manual_seed(0))[0]
    assert not any(c.text == "v=0.9" + DELIM for c in sw.particles)
    res = get("particle_filter")(BOXED, 4, Engine1(engine.script, length=2, answer=engine.answer),
                                 CountingPRM(FakePRM()), cfg)
    assert res[0].chosen.text.endswith("\\boxed{1}")


def test_particle_filter_resamples_only_when_ess_is_low():
    # Equal scores: ESS = N, never below 0.5·N, so no resampling; one particle far ahead (0.99 vs 0.2:
    # odds 99 vs 0.25, ESS ≈ 1.02 < 2) triggers it at the first step.
    cfg = _cfg(name="particle_filter", ess_threshold=0.5)
    flat = smc(PROBLEMS[:1], 4, FakeEngine(lambda call, k, c: 0.6, length=3), CountingPRM(FakePRM()), cfg)[0]
    assert flat.resamples == 0 and len({c.text for c in flat.particles}) == 1  # (the fake is deterministic)
    assert torch.allclose(flat.log_weights, torch.full((4,), 3 * logit(0.6), dtype=torch.float64))
    peaked = smc(PROBLEMS[:1], 4, FakeEngine(lambda call, k, c: 0.99 if k == 0 else 0.2, length=3),
                 CountingPRM(FakePRM()), cfg, generator=torch.Generator().manual_seed(0))[0]
    assert peaked.resamples >= 1


def test_particle_gibbs_keeps_reference_in_slot_zero():
    engine = FakeEngine(lambda call, k, c: round(0.1 + 0.2 * (k % 4), 1), length=2)
    res = get("particle_gibbs")(PROBLEMS[:1], 8, engine, CountingPRM(FakePRM()), _cfg(name="particle_gibbs", sweeps=2))
    assert len(res[0].candidates) == 8  # 2 sweeps x 4 particles
    # second sweep: the reference particle is not regenerated (3 new particles at the first step)
    sweep2 = [c for c in engine.calls if not any(x.text for x in c["cands"])]
    assert [len(c["cands"]) for c in sweep2] == [4, 3]


# ---------------------------------------------------------------------- accounting

def test_counts_and_flops_hand_computed():
    c = Counts()
    c.add(10, 5)  # prefill positions 1..10 (1 + … + 10 keys), generated tokens at positions 11..15
    assert (c.prefill, c.decode, c.attention) == (10, 5, 55 + 65)
    c.add(2, 1, context=10)  # 2 tokens after a 10-token cache (11 + 12 keys), then one at position 13
    assert c.attention == 120 + 23 + 13 and c.tokens == 18
    assert ModelShape(params=100, layers=2, d_attn=8).flops(c) == 2 * 100 * 18 + 2 * 2 * 8 * 156
    # the LM head (10 parameters) runs for the 6 generated tokens only, not for the 12 prefill tokens
    assert ModelShape(params=100, layers=2, d_attn=8, head=10).flops(c) == 2 * 100 * 18 + 2 * 10 * 6 + 2 * 2 * 8 * 156


@pytest.fixture(scope="module")
def tiny():
    from frugal.inference.models import ModelConfig, load_model

    return load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))


def test_policy_shape_counts_tied_head_once(tiny):
    model, _ = tiny
    shape = policy_shape(model)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied: the head is the embedding matrix
    assert shape.head == embed.numel()  # multiplied once, as the head (the lookup is free)
    assert shape.params == sum(p.numel() for p in model.parameters()) - embed.numel()
    assert (shape.layers, shape.d_attn) == (2, 64)


@pytest.mark.parametrize("kv_cache_tokens", [0, 100_000])
def test_engine_counts_tokens_and_shares_prompt_prefill(tiny, kv_cache_tokens):
    model, tok = tiny
    engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=6, max_step_tokens=4, batch_size=64,
                                             kv_cache_tokens=kv_cache_tokens))
    cands = [Candidate(0), Candidate(0, "So"), Candidate(1)]
    torch.manual_seed(0)
    out = engine.extend(PROBLEMS, cands)
    prompt_len = [len(tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
                  for p in PROBLEMS]
    so = len(tok("So", add_special_tokens=False)["input_ids"])
    # each prompt prefilled once (all but its last token), then per row: last prompt token + partial
    assert engine.counts.prefill == (prompt_len[0] - 1) + (prompt_len[1] - 1) + 1 + (1 + so) + 1
    assert engine.counts.decode == sum(c.tokens for c in out) and all(1 <= c.tokens <= 4 for c in out)
    assert out[1].text.startswith("So") and not cands[1].finished and cands[1].text == "So"
    before = engine.counts.prefill
    again = engine.extend(PROBLEMS, out, stop_at_step=False)
    assert all(c.finished and c.tokens <= 6 for c in again)
    # the prompts' KV is reused across calls: only [last prompt token + partial solution] is encoded, and
    # with the per-candidate store only the token each row ended on (its KV was never computed)
    tails = [1 + len(c.ids.ids) if kv_cache_tokens == 0 else 1 for c in out if not c.finished]
    assert engine.counts.prefill - before == sum(tails)


def test_engine_prefix_sharing_matches_plain_generate(tiny):
    from frugal.train.rollout import GenerationConfig, generate

    model, tok = tiny
    engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=8))
    out = engine.extend(PROBLEMS, [Candidate(0), Candidate(1), Candidate(0)], stop_at_step=False, greedy=True)
    plain = generate(model, tok, [p["prompt"] for p in PROBLEMS], GenerationConfig(max_new_tokens=8), greedy=True)
    assert [c.text for c in out] == [plain.texts[0], plain.texts[1], plain.texts[0]]


def test_engine_shared_prefix_prefilled_once_same_output(tiny):
    """Few-shot prompts share most of their tokens: that prefix is prefilled (and charged) once, and the
    generations are the same as with every prompt prefilled whole."""
    model, tok = tiny
    shots = [{"role": "user", "content": "What is 2 + 3 and then minus one?"},
             {"role": "assistant", "content": "2 + 3 = 5\n\n5 - 1 = 4\n\nThe answer is 4."}] * 3
    problems = [{"prompt": shots + [{"role": "user", "content": q}]} for q in ("q0 is short", "what about q1")]
    heads = [tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"][:-1] for p in problems]
    shared = next(i for i, (a, b) in enumerate(zip(*heads)) if a != b)
    assert shared >= 32
    texts, prefill, kv = {}, {}, {}
    for min_tokens in (32, 0):  # 0: sharing off
        engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=8, shared_prefix_min_tokens=min_tokens))
        out = engine.extend(problems, [Candidate(0), Candidate(1), Candidate(0)], stop_at_step=False, greedy=True)
        texts[min_tokens], prefill[min_tokens] = [c.text for c in out], engine.counts.prefill
        kv[min_tokens] = [engine._kv[engine.core.prompt_text(p["prompt"])] for p in problems]
    assert texts[32] == texts[0]
    for with_sharing, without in zip(kv[32], kv[0]):  # each prompt's stored KV, every layer
        for (k1, v1), (k0, v0) in zip(with_sharing, without):
            assert k1.shape == k0.shape and torch.allclose(k1, k0, atol=1e-5) and torch.allclose(v1, v0, atol=1e-5)
    tails = 2  # each distinct row: its prompt's last token (the two candidates of problem 0 run it once)
    assert prefill[0] == len(heads[0]) + len(heads[1]) + tails
    assert prefill[32] == shared + (len(heads[0]) - shared) + (len(heads[1]) - shared) + tails


def test_engine_shared_prefix_carries_over_to_the_next_calls_prompts(tiny):
    """One call per problem, each problem's prompts (its hints) sharing the few-shot examples and the
    question: the second call cuts the kept prefix to the part it shares (the examples) and runs only the
    new question over it once, then each prompt's own tokens — the examples are not prefilled again — and
    the stored KV equals whole-prompt prefills."""
    model, tok = tiny
    shots = [{"role": "user", "content": "What is 2 + 3 and then minus one?"},
             {"role": "assistant", "content": "2 + 3 = 5\n\n5 - 1 = 4\n\nThe answer is 4."}] * 3

    def rows(q):
        return [{"prompt": shots + [{"role": "user", "content": f"{q}\n{hint}"}]} for hint in ("Think.", "Be brief.")]

    def head(p):
        return tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"][:-1]

    def common(a, b):
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)

    first, second = rows("What is 4 + 4?"), rows("And 7 - 2, what is it?")
    h1, h2 = [head(p) for p in first], [head(p) for p in second]
    examples = common(h1[0], h2[0])  # what the two problems share
    assert examples >= 32 and common(*h2) > examples
    kv = {}
    for min_tokens in (32, 0):
        engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=4, shared_prefix_min_tokens=min_tokens))
        engine._prompt_kv([engine.core.prompt_text(p["prompt"]) for p in first], h1)
        before = engine.counts.prefill
        engine._prompt_kv([engine.core.prompt_text(p["prompt"]) for p in second], h2)
        if min_tokens:
            assert engine.counts.prefill - before == common(*h2) - examples + sum(len(h) - common(*h2) for h in h2)
        kv[min_tokens] = [engine._kv[engine.core.prompt_text(p["prompt"])] for p in second]
    for shared, whole in zip(kv[32], kv[0]):
        for (k1, v1), (k0, v0) in zip(shared, whole):
            assert k1.shape == k0.shape and torch.allclose(k1, k0, atol=1e-5) and torch.allclose(v1, v0, atol=1e-5)


def test_engine_cuts_at_step_delimiter_and_eos(tiny):
    model, tok = tiny
    engine = HFEngine(model, tok, HFEngineConfig(max_steps=3))
    ids = tok("2 + 3 = 5\n\nSo the", add_special_tokens=False)["input_ids"]
    cand = Candidate(0)
    engine.core.apply(cand, [], ids, context=20, stop_at_step=True)
    assert cand.text == "2 + 3 = 5\n\n" and not cand.finished
    # the token that completes the delimiter is the last one kept (and charged)
    kept = next(k for k in range(1, len(ids) + 1) if len(tok.decode(ids[:k])) >= len("2 + 3 = 5\n\n"))
    assert cand.tokens == kept
    if len(tok.decode(ids[:kept])) == len(cand.text):  # the cut fell between tokens: the ids are kept
        assert cand.ids == TokenIds(engine, cand.text, tuple(ids[:kept]))
    cand2 = Candidate(0)
    five = tok("5", add_special_tokens=False)["input_ids"]
    engine.core.apply(cand2, [7], five + [tok.eos_token_id] * 3, context=20, stop_at_step=True)
    assert cand2.text == "5" and cand2.finished and cand2.tokens == 2
    assert cand2.ids == TokenIds(engine, "5", tuple([7] + five))  # partial + generated, without the EOS
    assert engine.counts.decode == cand.tokens + 2


def test_engine_continues_from_the_ids_it_generated(tiny):
    """A candidate is continued from the very token ids the engine sampled for it, not from its text
    re-encoded (BPE does not round-trip); text written elsewhere (another model, an edit) is re-encoded."""
    model, tok = tiny
    engine, other = (HFEngine(model, tok, HFEngineConfig(max_new_tokens=16)) for _ in range(2))
    seen = []  # per _generate call: the rows' tails (last prompt token + partial ids) and generated ids

    def spy(real):
        def wrapped(items, *args, **kw):
            rows = real(items, *args, **kw)
            seen.append(([tail for _, tail in items], [ids for ids, _ in rows]))
            return rows
        return wrapped

    engine._run_rows, other._run_rows = spy(engine._run_rows), spy(other._run_rows)
    torch.manual_seed(0)
    first = engine.extend(PROBLEMS, [Candidate(0)], max_tokens=4, stop_at_step=False)[0]
    assert not first.finished and first.tokens == 4
    sampled = seen[0][1][0][:4]
    engine.extend(PROBLEMS, [first], max_tokens=4, stop_at_step=False)
    assert first.ids == TokenIds(engine, first.text, tuple(sampled)) and seen[1][0][0][1:] == sampled
    # ids that differ from the text's encoding (the model sampled "\n" twice, the tokenizer merges them)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    twice = enc("4") + enc("\n") + enc("\n")
    assert twice != enc("4\n\n")
    engine.extend(PROBLEMS, [Candidate(0, "4\n\n", ids=TokenIds(engine, "4\n\n", tuple(twice)))], max_tokens=1, stop_at_step=False)
    assert seen[2][0][0][1:] == twice
    edited = first.copy()
    edited.text += " 7"
    engine.extend(PROBLEMS, [edited], max_tokens=2, stop_at_step=False)
    other.extend(PROBLEMS, [first], max_tokens=2, stop_at_step=False)
    for call in (3, 4):
        text = edited.text if call == 3 else first.text
        assert seen[call][0][0][1:] == tok(text, add_special_tokens=False)["input_ids"]


def test_counting_prm_uses_prm_token_counts():
    prm = CountingPRM(FakePRM())
    prm.score_candidates(PROBLEMS, [Candidate(0, "v=0.3\n\nv=0.7"), Candidate(1, "v=1")])
    assert prm.counts.prefill == 3 and prm.counts.calls == 1


# ---------------------------------------------------------------------- end to end

def test_frugal_eval_end_to_end_on_tiny_random(tmp_path, monkeypatch):
    import json
    import sys

    from frugal.recipes.cli import main
    from frugal.train.lora import LoraConfig
    from frugal.inference.models import ModelConfig
    from frugal.train.prm import PRMConfig, build_prm

    prm = build_prm(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), LoraConfig(), PRMConfig(),
                    torch.device("cpu"))
    prm.save(tmp_path / "prm")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["frugal"])
    rc = main(["eval", "model=tiny_random", f"prm_path={tmp_path / 'prm'}", "search=particle_filter",
               "search.budgets=[2,4]", "limit=3", "engine.max_new_tokens=16", "engine.max_step_tokens=6",
               f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["budget"] for r in summary["rows"]] == [2, 4]
    for r in summary["rows"]:
        assert r["policy_generated_tokens"] > 0 and r["prm_tokens"] > 0 and r["flops_prm"] > 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["candidates"]) == r["budget"] for r in rows)
    assert (out / "accuracy_vs_flops.png").stat().st_size > 0


# ---------------------------------------------------------------------- per-candidate random streams

def test_stream_sampling_draws_from_the_tempered_softmax():
    """Inverse-transform sampling with a keyed uniform per row is an exact sampler: over many streams the
    token frequencies match softmax(z / T), one (stream, position) always gives the same token, and only
    that token is left finite for generate's argmax."""
    from frugal.inference.decoding import StreamSampling
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.inference.decoding import sampling_warpers

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    warp = sampling_warpers(HFEngineConfig(temperature=0.5))
    n = 4000
    sampler = StreamSampling(range(n), [0] * n, width=1, warpers=warp)
    picks = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4).double() / n
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 0.5, 0), atol=0.025), freq
    again = StreamSampling([7, 7], [3, 3], width=1, warpers=warp)(torch.zeros(2, 1, dtype=torch.long),
                                                                    torch.randn(1, 4).expand(2, -1).clone())
    assert again.argmax(-1)[0] == again.argmax(-1)[1] and torch.isfinite(again).sum() == 2
    top1 = StreamSampling(range(50), [0] * 50, width=1, warpers=sampling_warpers(HFEngineConfig(top_k=1)))
    assert (top1(torch.zeros(50, 1, dtype=torch.long), logits.expand(50, -1).clone()).argmax(-1) == 0).all()


def test_engine_sample_depends_on_the_candidate_not_its_batch_or_split(tiny):
    """A candidate's tokens come from its own stream: the same text alone or in a batch, written in one
    call or continued after τ tokens (so early rejection's survivors are best-of-N's candidates); other
    streams and forks write differently."""
    model, tok = tiny
    engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=12))
    together = engine.extend(PROBLEMS, [Candidate(0, stream=0), Candidate(0, stream=1), Candidate(1, stream=0)],
                             stop_at_step=False)
    alone = engine.extend(PROBLEMS, [Candidate(1, stream=0)], stop_at_step=False)[0]
    assert alone.text == together[2].text
    assert together[0].text != together[1].text
    prefix = engine.extend(PROBLEMS, [Candidate(0, stream=1)], max_tokens=5, stop_at_step=False)[0]
    assert engine.extend(PROBLEMS, [prefix], stop_at_step=False)[0].text == together[1].text
    forked = engine.extend(PROBLEMS, [prefix.fork(1)], stop_at_step=False)[0]
    assert forked.text.startswith(prefix.text) and forked.text != together[1].text
    engine.seed = 1  # another run seed: other samples
    assert engine.extend(PROBLEMS, [Candidate(1, stream=0)], stop_at_step=False)[0].text != alone.text


def test_early_rejection_that_rejects_nothing_is_best_of_n(tiny):
    """Paired strategies on the real engine: early rejection keeping every candidate completes exactly
    best-of-N's candidates and so picks the same solutions; best-of-N at 4 holds best-of-N at 2's samples."""
    model, tok = tiny
    engine = HFEngine(model, tok, HFEngineConfig(max_new_tokens=10))
    prm = CountingPRM(FakePRM())
    bon = get("best_of_n")(PROBLEMS, 4, engine, prm, _cfg())
    er = get("early_rejection")(PROBLEMS, 4, engine, prm, _cfg(name="early_rejection", tau=3, rejection_rate=0.0))
    for b, e in zip(bon, er):
        assert [c.text for c in b.candidates] == [c.text for c in e.candidates]
        assert b.chosen.text == e.chosen.text
    smaller = get("best_of_n")(PROBLEMS, 2, engine, prm, _cfg())
    for b, s in zip(bon, smaller):
        assert [c.text for c in s.candidates] == [c.text for c in b.candidates[:2]]


def test_resampled_duplicates_and_beam_children_fork_their_streams():
    """Copies that must continue differently get streams of their own (identical streams on identical text
    would write identical steps); the first copy of an ancestor keeps its stream."""
    engine = FakeEngine(lambda call, k, c: 0.9 if k == 0 else 0.01, length=4)
    engine.cfg.max_steps = 0  # one step: propagate, weight, resample
    sw = smc(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()), _cfg(name="particle_filter", ess_threshold=1.0),
             generator=torch.Generator().manual_seed(0))[0]
    assert all(c.text.startswith("v=0.9") for c in sw.particles)  # all descend from particle 0
    streams = [c.stream for c in sw.particles]
    assert len(set(streams)) == 4 and 0 in streams
    engine = FakeEngine(lambda call, k, c: [0.9, 0.1, 0.2, 0.3][k % 4], length=2)
    get("beam")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()), _cfg(name="beam", beam_width=4))
    children = engine.calls[1]["cands"]
    assert len({c.text for c in children}) == 1 and len({c.stream for c in children}) == 4

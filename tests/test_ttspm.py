"""TTSPM (evaluator/ttspm.py): closed forms, saturation budget edge cases, fits on synthetic Bernoulli
data with known p, the per-problem auto budget, auto best-of-N with a fake engine/PRM, and `frugal plan`."""

import json
import math

import numpy as np
import pytest

from frugal.evaluator.ttspm import (
    AutoBudget, BetaFit, PooledFit, TTSPM, ZIBetaFit, adaptive_sampling, auto_best_of_n, fit_beta, fit_plugin, fit_pooled,
    fit_rethink, fit_zibeta, marginal_gain, mixture_accuracy, parallel_accuracy, pass_at_n, saturation_budget,
)


# ---------------------------------------------------------------------- closed forms

def test_parallel_accuracy_hand_values():
    # F_max = 0.8, p = 0.5: F(1) = 0.4, F(2) = 0.8·0.75 = 0.6, F(3) = 0.8·0.875 = 0.7
    np.testing.assert_allclose(parallel_accuracy([0, 1, 2, 3], 0.5, 0.8), [0.0, 0.4, 0.6, 0.7])
    assert parallel_accuracy(10**6, 0.01, 0.9) == pytest.approx(0.9)  # saturates at F_max


def test_marginal_gain_is_the_difference_of_f():
    n = np.arange(0, 20)
    for p, f in [(0.3, 1.0), (0.05, 0.6), (0.9, 0.2)]:
        np.testing.assert_allclose(marginal_gain(n, p, f), parallel_accuracy(n + 1, p, f) - parallel_accuracy(n, p, f), atol=1e-14)


def test_saturation_budget_hand_examples():
    # Δ(N) = 0.4·0.5^N = 0.4, 0.2, 0.1, 0.05, 0.025 ...
    assert saturation_budget(0.5, 0.8, 0.06) == 3  # ⌈ln(0.15)/ln(0.5)⌉ = ⌈2.74⌉
    # the tie: ln(0.05/0.4)/ln(0.5) = 3 exactly and Δ(3) = 0.05 is not < 0.05, so N* = 4
    assert saturation_budget(0.5, 0.8, 0.05) == 4
    assert saturation_budget(0.5, 0.8, 0.049) == 4
    # the formula for a non-tie case
    p, f, eps = 0.1, 0.7, 0.001
    assert saturation_budget(p, f, eps) == math.ceil(math.log(eps / (f * p)) / math.log(1 - p))


def test_saturation_budget_matches_brute_force_definition():
    for p in (0.01, 0.07, 0.3, 0.5, 0.93):
        for f in (0.1, 0.55, 1.0):
            for eps in (1e-4, 3e-3, 0.02, 0.2):
                brute = next(n for n in range(100_000) if f * p * (1 - p) ** n < eps)
                assert saturation_budget(p, f, eps) == brute, (p, f, eps)


def test_saturation_budget_edge_cases():
    assert saturation_budget(0.0, 0.9, 0.01) == 0  # p = 0: no sample ever helps
    assert saturation_budget(0.4, 0.0, 0.01) == 0  # F_max = 0: nothing is solvable
    assert saturation_budget(1.0, 0.9, 0.01) == 1  # p = 1: the first sample gets everything
    assert saturation_budget(1.0, 0.005, 0.01) == 0  # ... unless even that is worth less than eps
    assert saturation_budget(0.2, 0.5, 0.2) == 0  # eps > F_max·p = 0.1: even the first sample is not worth it
    assert saturation_budget(0.5, 0.8, 0.4) == 1  # eps = F_max·p: Δ(0) = eps is not < eps; Δ(1) = 0.2 is
    with pytest.raises(ValueError, match="eps"):
        saturation_budget(0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="p must be"):
        saturation_budget(1.5, 0.5, 0.1)
    with pytest.raises(ValueError, match="f_max"):
        parallel_accuracy(3, 0.5, -0.1)


def test_mixture_accuracy_and_pass_at_n():
    # p_i = 0, 0.5, 1 at N = 2: mean(0, 0.75, 1)
    assert mixture_accuracy(2, [0.0, 0.5, 1.0]) == pytest.approx(1.75 / 3)
    np.testing.assert_allclose(mixture_accuracy([1, 2], [0.5, 0.5]), [0.5, 0.75])
    assert pass_at_n(4, 1, 2) == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert pass_at_n(4, 0, 2) == 0.0
    assert pass_at_n(4, 3, 2) == 1.0  # fewer than N wrong samples: every subset holds a correct one
    assert pass_at_n(32, 5, 32) == 1.0
    with pytest.raises(ValueError):
        pass_at_n(4, 1, 5)


# ---------------------------------------------------------------------- fits on synthetic data

def test_plugin_fit_by_hand():
    fit = fit_plugin([0, 2, 4, 0], 4)
    assert fit.f_max == 0.5 and fit.p == pytest.approx(6 / 8)
    assert fit_plugin([0, 0], 4) == PooledFit(0.0, 0.0)


def test_pooled_mle_recovers_known_f_max_and_p():
    rng = np.random.default_rng(0)
    f_true, p_true, k, P = 0.6, 0.25, 4, 20_000
    solvable = rng.random(P) < f_true
    counts = np.where(solvable, rng.binomial(k, p_true, P), 0)
    fit = fit_pooled(counts, k)
    assert fit.f_max == pytest.approx(f_true, abs=0.02)
    assert fit.p == pytest.approx(p_true, abs=0.01)
    # the plug-in F_max (share solved in 4 pilots) misses solvable problems: 0.6·(1 − 0.75^4) ≈ 0.41
    assert fit_plugin(counts, k).f_max == pytest.approx(f_true * (1 - 0.75**4), abs=0.02)


def test_beta_fit_recovers_prior_and_mixture_predicts_coverage():
    rng = np.random.default_rng(1)
    a, b, k, P = 0.5, 1.5, 4, 40_000
    p = rng.beta(a, b, P)
    fit = TTSPM.fit(rng.binomial(k, p), k)
    assert fit.beta.mean == pytest.approx(a / (a + b), abs=0.01)
    for n in (8, 16, 32):
        true_cov = float(np.mean(1 - (1 - p) ** n))
        assert fit.predict(n, "beta") == pytest.approx(true_cov, abs=0.015), n
        assert fit.predict(n, "mixture") == pytest.approx(true_cov, abs=0.02), n
    # the plug-in mixture (p_i = c_i / k) under-predicts beyond k: problems with 0/4 pilots count as unsolvable
    assert fit.predict(32, "plugin") < float(np.mean(1 - (1 - p) ** 32)) - 0.1


def test_zero_inflated_beta_fit_recovers_unsolvable_share():
    rng = np.random.default_rng(5)
    f, a, b, k, P = 0.6, 2.0, 3.0, 4, 40_000
    p = np.where(rng.random(P) < f, rng.beta(a, b, P), 0.0)
    fit = fit_zibeta(rng.binomial(k, p), k)
    assert fit.f_max == pytest.approx(f, abs=0.05)
    assert fit.a / (fit.a + fit.b) == pytest.approx(a / (a + b), abs=0.03)
    model = TTSPM.fit(rng.binomial(k, p), k)
    for n in (8, 32):
        assert model.predict(n, "mixture") == pytest.approx(float(np.mean(1 - (1 - p) ** n)), abs=0.02)
    # posterior solvability after failures falls from F_max; the per-sample gain with it
    z = ZIBetaFit(0.5, 1.0, 1.0)
    assert z.solvable_after_failures(0) == pytest.approx(0.5)
    assert z.solvable_after_failures(1) == pytest.approx(0.25 / 0.75)  # B(1,2)/B(1,1) = 1/2
    assert z.gain_after_failures(1) == pytest.approx((1 / 3) * (1 / 3))


def test_beta_fit_without_overdispersion_is_nearly_a_point_mass():
    rng = np.random.default_rng(2)
    fit = fit_beta(rng.binomial(4, 0.3, 5000), 4)
    assert fit.mean == pytest.approx(0.3, abs=0.01)
    assert fit.a + fit.b > 100


def test_rethink_fit_recovers_geometric_rounds():
    rng = np.random.default_rng(3)
    f_true, p_true, R, P = 0.7, 0.2, 10, 20_000
    first = rng.geometric(p_true, P)
    solvable = rng.random(P) < f_true
    t = [int(x) if s and x <= R else None for x, s in zip(first, solvable)]
    fit = fit_rethink(t, R)
    assert fit.f_max == pytest.approx(f_true, abs=0.02)
    assert fit.p == pytest.approx(p_true, abs=0.01)
    with pytest.raises(ValueError, match="problem 0"):
        fit_rethink([11], 10)


def test_bad_pilot_counts_name_the_problem():
    with pytest.raises(ValueError, match="problem 1 has 5 successes out of 4"):
        TTSPM.fit([1, 5], 4)


def test_mixture_saturation_is_the_smallest_n_with_gain_below_eps():
    rng = np.random.default_rng(4)
    fit = TTSPM.fit(rng.binomial(4, rng.beta(0.4, 1.2, 300)), 4)
    for form in ("mixture", "beta", "plugin"):
        for eps in (0.05, 0.01, 0.002):
            n_star = fit.saturation(eps, form)
            gains = fit.gain(np.arange(0, n_star + 1), form)
            assert gains[-1] < eps and (n_star == 0 or gains[-2] >= eps), (form, eps)
    assert fit.saturation(0.01, "pooled") == saturation_budget(fit.pooled.p, fit.pooled.f_max, 0.01)


# ---------------------------------------------------------------------- automatic budget

def test_auto_budget_rule_by_hand():
    # Beta(1, 1): after n failures the next sample succeeds with probability 1 / (2 + n); eps = 0.1
    rule = AutoBudget(BetaFit(1.0, 1.0), eps=0.1, max_n=32)
    assert rule.budget_without_success() == 9  # 1/(2+8) = 0.1 is not < 0.1; 1/11 is
    assert not rule.should_stop(3, 0)
    assert rule.should_stop(3, 1)  # a verified success: coverage cannot grow
    assert rule.should_stop(9, 0)
    assert AutoBudget(BetaFit(1.0, 1.0), eps=0.001, max_n=32).should_stop(32, 0)  # the cap
    assert not AutoBudget(BetaFit(1.0, 1.0), 0.1, 32, min_n=4).should_stop(2, 1)  # min_n first
    # no success signal: the population N*: Δ(N) = B(2, 1+N)/B(1, 1) = 1/((N+1)(N+2)) < 0.1 first at N = 2
    assert rule.population_budget() == 2
    assert rule.should_stop(2, None) and not rule.should_stop(1, None)
    # pooled prior: g_1 = P(solvable | 1 failure)·p = (0.25 / 0.75)·0.5 = 1/6
    assert PooledFit(0.5, 0.5).gain_after_failures(1) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="min_n"):
        AutoBudget(BetaFit(1, 1), 0.1, max_n=2, min_n=3)


def test_adaptive_sampling_stops_each_problem_by_the_rule_and_batches_calls():
    first_success = {0: 2, 1: None, 2: 1}  # sample index (1-based) of the first success per problem
    taken = [1, 1, 1]
    calls = []

    def draw(group, n):
        calls.append(list(group))
        flags = []
        for i in group:
            flags.append([first_success[i] == taken[i] + j + 1 for j in range(n)])
            taken[i] += n
        return flags

    rule = AutoBudget(BetaFit(1.0, 1.0), eps=0.1, max_n=32)
    drawn, wins = adaptive_sampling(draw, rule, drawn=[1, 1, 1], wins=[0, 0, 1], chunk=1)
    assert drawn == [2, 9, 1] and wins == [1, 0, 1]
    assert calls[0] == [0, 1]  # problem 2 already stopped; the active problems share one call


class _FakeEngine:
    """Completes every candidate at once; the text names its problem and draw number."""

    def __init__(self):
        self.drawn = {}

    def extend(self, problems, cands, stop_at_step=False):
        from frugal.inference.engine import Candidate

        out = []
        for c in cands:
            k = self.drawn.get(c.problem, 0)
            self.drawn[c.problem] = k + 1
            out.append(Candidate(c.problem, f"p{c.problem} s{k} answer {k}", tokens=3, finished=True))
        return out


class _FakePRM:
    """Problem 0's second sample scores 0.9 (a verified success); everything else 0.1."""

    def score_candidates(self, problems, cands):
        for c in cands:
            c.scores = [0.9 if c.text.startswith("p0 s1 ") else 0.1]


def test_auto_best_of_n_stops_verified_problems_early():
    from frugal.evaluator.config import BestOfNConfig
    from frugal.evaluator.strategies import best_of_n

    problems = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": "1", "answer_format": "number"}
                for i in range(3)]
    cfg = BestOfNConfig(budget="auto", auto_eps=0.05, auto_threshold=0.5, auto_pilots=2, auto_chunk=1)
    engine = _FakeEngine()
    pools = auto_best_of_n(problems, 16, engine, _FakePRM(), cfg)
    assert len(pools[0]) == 2  # success among its 2 pilots
    fails = AutoBudget(fit_beta([1, 0, 0], 2), 0.05, 16, min_n=2).budget_without_success()
    assert [len(pools[1]), len(pools[2])] == [fails, fails] and 2 < fails <= 16
    # through the strategy: the verified sample is chosen
    results = best_of_n.run(problems, 16, _FakeEngine(), _FakePRM(), cfg)
    assert results[0].chosen.text.startswith("p0 s1 ") and len(results[0].candidates) == 2


def test_forecast_error_is_centred_and_shrinks_with_problems():
    """Parametric bootstrap of the forecast: with the form right (data drawn from a Beta prior) the
    beta forecast is nearly unbiased, its spread falls like 1/sqrt(problems), and a finite measurement
    pool only adds noise."""
    rng = np.random.default_rng(0)

    def spread(problems, pool=None):
        counts = rng.binomial(4, rng.beta(0.8, 5.0, problems))
        err = TTSPM.fit(counts, 4).forecast_error([8, 32], "beta", reps=150, pool=pool, seed=1)
        assert err.shape == (150, 2)
        return err

    small, large = spread(100), spread(1600)
    assert abs(large.mean(0)).max() < 0.01  # centred: the mean error is under one point
    ratio = small.std(0) / large.std(0)
    assert np.all((2.5 < ratio) & (ratio < 6.5)), ratio  # sqrt(1600 / 100) = 4
    assert spread(100, pool=32).std(0)[1] > 0.9 * small.std(0)[1]
    with pytest.raises(ValueError, match="pool=16"):
        TTSPM.fit([1, 2], 4).forecast_error([32], pool=16)


# ---------------------------------------------------------------------- the recipe

def test_plan_recipe_end_to_end_on_tiny_model(tmp_path):
    from hydra import compose, initialize_config_dir

    from frugal.recipes.plan import CONF_DIR, report, run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("plan", overrides=["model=tiny_random", "limit=3", "pilots=2", "engine.max_new_tokens=4",
                                         "max_n=16", "engine.batch_size=8"])
    plan = run(cfg, run_dir=tmp_path)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["curve"]["n"] == [1, 2, 4, 8, 16] and set(saved["n_star"]) == {"mixture", "beta", "pooled", "plugin"}
    assert (tmp_path / "plan.png").stat().st_size > 0
    assert len((tmp_path / "pilots.jsonl").read_text().splitlines()) == 3
    assert saved["policy_tokens"]["generated"] > 0
    assert "N* (eps=0.01)" in report(plan) and "90% band" in report(plan)
    band = saved["band90"]
    assert len(band["low"]) == len(band["high"]) == 5 and all(lo <= hi for lo, hi in zip(band["low"], band["high"]))

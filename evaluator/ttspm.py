"""TTSPM: the test-time scaling performance model, its saturation budget N*, and a per-problem
automatic budget (``search.budget=auto``).

Source: Wang, Zhu, Leong, Li & Li (2025), "Scaling over Scaling: Exploring Test-Time Scaling Plateau in
Large Reasoning Models" (arXiv:2505.20522), §3.

Parallel scaling. N independent samples per problem; a selector (here an oracle verifier, i.e. the
coverage / Hit@N metric) succeeds when at least one sample is correct. With per-sample success
probability p on the problems that can be solved at all (a fraction F_max of them):

    F(N) = F_max · (1 − (1 − p)^N)                                 pooled form (the paper's)
    F(N) = (1/P) · Σ_i [1 − (1 − p_i)^N]                            per-problem mixture form

Sequential scaling. N rounds of rethinking, modelled as a two-state Markov chain whose "correct" state is
absorbing; p_rethink = P(correct after a round | not correct before it). The round of first success is
geometric, so F(N) has the same form with p = p_rethink.

Marginal gain and saturation budget (pooled form):

    Δ(N) = F(N+1) − F(N) = F_max · p · (1 − p)^N
    N*   = min{N ≥ 0 : Δ(N) < ε} = ⌈ln(ε / (F_max·p)) / ln(1 − p)⌉           (0 < p < 1, ε < F_max·p)

(on the measure-zero tie where the ratio is an integer the ceiling gives Δ(N*) = ε, and we return N*+1 so
that Δ(N*) < ε holds strictly). Edge cases, all following from Δ(N) directly:

    p = 0 or F_max = 0   Δ ≡ 0: no sample ever helps               → N* = 0
    p = 1                Δ(0) = F_max, Δ(N ≥ 1) = 0               → N* = 1 if F_max ≥ ε else 0
    ε ≥ F_max · p         Δ(0) = F_max·p ≤ ε already               → N* = 0 (1 on the tie ε = F_max·p)

N* = 0 means "even the first sample gains less than ε"; a strategy still needs one sample to answer, so
the budget rules below never go under ``min_n`` (default 1).

Estimation from pilots (k samples per problem, c_i of them correct):

* plug-in (what the paper does): p_i = c_i / k, F_max = share of problems with c_i > 0, pooled p = the mean
  success rate of those problems. Biased low for N > k: a problem whose k pilots all failed gets p_i = 0.
* pooled maximum likelihood (:func:`fit_pooled`): a zero-inflated binomial — a problem is solvable with
  probability F_max and then c_i ~ Binomial(k, p) — fitted by EM, so F_max can exceed the observed share.
* Beta mixture (:func:`fit_beta`, form ``beta``, the default): p_i ~ Beta(a, b) fitted by maximising the beta-binomial
  likelihood of the pilot counts; each problem's prediction is its posterior expectation
  E[1 − (1 − p_i)^N | c_i] = 1 − B(a + c_i, b + k − c_i + N) / B(a + c_i, b + k − c_i). The Beta-mixture
  view of pass@N scaling is that of Schaeffer et al. (2025), "How Do Large Language Monkeys Get Their
  Power (Laws)?". Averaged over problems this is the prior predictive 1 − B(a, b + N)/B(a, b) refined by
  each problem's own pilots; the Beta's mass near p = 0 plays the role of the paper's 1 − F_max.
* zero-inflated Beta mixture (:func:`fit_zibeta`, form ``mixture``): the paper's F_max and the
  mixture together — solvable with probability F_max, then p_i ~ Beta(a, b); maximum likelihood over
  (F_max, a, b). A problem with c_i > 0 predicts as above; one whose k pilots all failed is solvable with
  posterior probability π_k = F·B(a, b+k)/B(a, b) / (1 − F + F·B(a, b+k)/B(a, b)) and predicts
  π_k · (1 − B(a, b + k + N) / B(a, b + k)).

Which form: ``beta`` is the headline fit, chosen on development splits and checked on held-out problems
with ``scripts/bench_ttspm.py`` (the forecast errors per form: docs/benchmarks.md). With k = 4 the
zero-inflation is weakly identified: the zero-inflated fit can put many problems at p = 0 with a near
point mass for the rest and then flatten the curve. The spread across pilot sets of the same problems is
sampling error of the pilots; it shrinks only with more problems or more pilots per problem.

What k pilots cannot tell. They identify the first k moments of the distribution of p over problems (the
pass@1..k curve) and nothing more, so coverage at N ≫ k is an extrapolation whose accuracy depends on
the task: how much of its mass near p = 0 is "hard but solvable" and how much is "never". On a task
where many problems are never solved, coverage flattens early and ``beta`` over-predicts it. A
logit-normal prior (p_i = σ(z_i), z_i ~ N(μ, σ²)) puts more mass at small but non-zero p and
over-predicts more, so it is not offered (docs/benchmarks.md). Check a forecast on your own task before
trusting N ≫ k.

Automatic budget (:class:`AutoBudget`). For one problem that has drawn n samples without a verified
success, the chance that sample n + 1 is the first success is the posterior predictive

    g_n = π_n · a / (a + b + n)                   (zero-inflated Beta; π_n = 1 for the plain Beta)
    g_n = π_n · p,  π_n = F_max(1−p)^n / (1 − F_max + F_max(1−p)^n)       (pooled: π_n = P(solvable | n fails))

Sampling stops at the first verified success (coverage cannot grow any more), when g_n < ε, or at the cap.
The stopping rule uses the plain Beta prior by default: with 4 pilots the zero-inflated fit can be
over-confident that failing problems are hopeless.
Without a success signal the rule falls back to the population budget N*.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

FORMS = ("mixture", "beta", "pooled", "plugin")


# ---------------------------------------------------------------------- closed forms

def parallel_accuracy(n, p: float, f_max: float = 1.0) -> np.ndarray:
    """F(N) = F_max · (1 − (1 − p)^N) (also the sequential form with p = p_rethink)."""
    _check_prob(p, "p")
    _check_prob(f_max, "f_max")
    return f_max * (1.0 - (1.0 - p) ** np.asarray(n, dtype=float))


def marginal_gain(n, p: float, f_max: float = 1.0) -> np.ndarray:
    """Δ(N) = F(N+1) − F(N) = F_max · p · (1 − p)^N."""
    _check_prob(p, "p")
    _check_prob(f_max, "f_max")
    return f_max * p * (1.0 - p) ** np.asarray(n, dtype=float)


def saturation_budget(p: float, f_max: float, eps: float) -> int:
    """N* = smallest N ≥ 0 with Δ(N) < ε (closed form; edge cases in the module docstring)."""
    _check_prob(p, "p")
    _check_prob(f_max, "f_max")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if p == 0.0 or f_max == 0.0:
        return 0
    if p == 1.0:
        return 1 if f_max >= eps else 0
    if eps > f_max * p:
        return 0
    n = max(0, math.ceil(math.log(eps / (f_max * p)) / math.log(1.0 - p)))
    while f_max * p * (1.0 - p) ** n >= eps:  # the tie (and float rounding): make Δ(N*) < ε strict
        n += 1
    return n


def mixture_accuracy(n, p_i: Sequence[float]) -> np.ndarray:
    """F(N) = mean_i [1 − (1 − p_i)^N] (plug-in per-problem probabilities)."""
    p = np.asarray(p_i, dtype=float)[:, None]
    return 1.0 - np.mean((1.0 - p) ** np.atleast_1d(np.asarray(n, dtype=float))[None, :], axis=0).reshape(np.shape(n))


def pass_at_n(num_samples: int, num_correct: int, n: int) -> float:
    """Unbiased estimate of P(at least one of n samples is correct) from ``num_samples`` ≥ n samples of
    which ``num_correct`` are correct: 1 − C(num_samples − c, n) / C(num_samples, n) (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"); the mean over all n-subsets of the samples."""
    if not 0 < n <= num_samples:
        raise ValueError(f"pass_at_n: need 0 < n <= num_samples, got n={n}, num_samples={num_samples}")
    if num_samples - num_correct < n:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, n) / math.comb(num_samples, n)


# ---------------------------------------------------------------------- fitting

@dataclass
class PooledFit:
    """Zero-inflated binomial / geometric fit of the pooled TTSPM form."""

    f_max: float
    p: float
    iterations: int = 0

    def accuracy(self, n) -> np.ndarray:
        return parallel_accuracy(n, self.p, self.f_max)

    def gain_after_failures(self, n: int) -> float:
        """g_n = P(solvable | n failures) · p."""
        stay = self.f_max * (1.0 - self.p) ** n
        denom = 1.0 - self.f_max + stay
        return 0.0 if denom <= 0 else stay / denom * self.p


@dataclass
class BetaFit:
    """p_i ~ Beta(a, b) across problems (empirical Bayes)."""

    a: float
    b: float

    @property
    def mean(self) -> float:
        return self.a / (self.a + self.b)

    def gain_after_failures(self, n: int) -> float:
        """g_n = E[p | n failures] = a / (a + b + n)."""
        return self.a / (self.a + self.b + n)


def _as_counts(successes: Sequence[int], trials) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(successes, dtype=float)
    k = np.broadcast_to(np.asarray(trials, dtype=float), c.shape).astype(float)
    if c.ndim != 1 or c.size == 0:
        raise ValueError("pilot counts: need a non-empty list of per-problem success counts")
    if np.any(k < 1) or np.any(c < 0) or np.any(c > k) or np.any(c != np.round(c)) or np.any(k != np.round(k)):
        bad = int(np.argmax((k < 1) | (c < 0) | (c > k) | (c != np.round(c)) | (k != np.round(k))))
        raise ValueError(f"pilot counts: problem {bad} has {c[bad]:g} successes out of {k[bad]:g} samples")
    return c, k


def fit_plugin(successes: Sequence[int], trials) -> PooledFit:
    """The paper's plug-in estimate: F_max = share solved at least once, p = mean rate of those."""
    c, k = _as_counts(successes, trials)
    solved = c > 0
    if not solved.any():
        return PooledFit(0.0, 0.0)
    return PooledFit(float(solved.mean()), float(c[solved].sum() / k[solved].sum()))


def fit_pooled(successes: Sequence[int], trials, iters: int = 500, tol: float = 1e-10) -> PooledFit:
    """Maximum likelihood of the zero-inflated binomial (EM). Unsolved-in-pilot problems are solvable with
    responsibility r_i = F(1−p)^k / (1 − F + F(1−p)^k); then F = mean r, p = Σ r c / Σ r k."""
    c, k = _as_counts(successes, trials)
    init = fit_plugin(c, k)
    if init.f_max == 0.0:
        return PooledFit(0.0, 0.0)
    f, p = init.f_max, init.p
    if p >= 1.0:
        return PooledFit(f, 1.0)  # every pilot of every solved problem succeeded: nothing to infer
    it = 0
    for it in range(1, iters + 1):
        stay = f * (1.0 - p) ** k
        r = np.where(c > 0, 1.0, stay / (1.0 - f + stay))
        f_new, p_new = float(r.mean()), float((r * c).sum() / (r * k).sum())
        done = abs(f_new - f) < tol and abs(p_new - p) < tol
        f, p = f_new, p_new
        if done:
            break
    return PooledFit(min(f, 1.0), p, it)


def fit_rethink(first_success: Sequence[Optional[int]], rounds) -> PooledFit:
    """Sequential scaling: ``first_success[i]`` is the 1-based round at which problem i first became
    correct (None if not within ``rounds[i]`` rounds). Zero-inflated geometric MLE by EM:
    solved contribute p(1−p)^(T−1); unsolved (1 − F) + F(1 − p)^R. Returns F_max and p_rethink."""
    t = [None if x is None else int(x) for x in first_success]
    r_max = np.broadcast_to(np.asarray(rounds, dtype=float), (len(t),)).astype(float)
    if not t:
        raise ValueError("fit_rethink: no problems")
    for i, (x, r) in enumerate(zip(t, r_max)):
        if x is not None and not 1 <= x <= r:
            raise ValueError(f"fit_rethink: problem {i} first succeeds at round {x}, outside 1..{r:g}")
    solved = np.array([x is not None for x in t])
    if not solved.any():
        return PooledFit(0.0, 0.0)
    tt = np.array([x if x is not None else 0 for x in t], dtype=float)
    f, p = float(solved.mean()), float(solved.sum() / (tt[solved].sum()))
    it = 0
    for it in range(1, 501):
        stay = f * (1.0 - p) ** r_max
        resp = np.where(solved, 1.0, np.divide(stay, 1.0 - f + stay, out=np.zeros_like(stay), where=(1.0 - f + stay) > 0))
        f_new = float(resp.mean())
        p_new = float(solved.sum() / (tt[solved].sum() + (resp * r_max)[~solved].sum()))
        done = abs(f_new - f) < 1e-10 and abs(p_new - p) < 1e-10
        f, p = f_new, p_new
        if done:
            break
    return PooledFit(min(f, 1.0), p, it)


def _lbeta(a, b) -> np.ndarray:
    """ln B(a, b) = ln Γ(a) + ln Γ(b) − ln Γ(a + b), elementwise (torch's vectorised lgamma, float64)."""
    a = torch.as_tensor(np.asarray(a, dtype=float), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b, dtype=float), dtype=torch.float64)
    return (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)).numpy()


def fit_beta(successes: Sequence[int], trials) -> BetaFit:
    """Empirical-Bayes Beta(a, b) prior over per-problem p: maximise Σ_i ln B(a + c_i, b + k_i − c_i) −
    ln B(a, b) (the beta-binomial likelihood without its constant) over mean μ = a/(a+b) and concentration
    s = a + b, by a coarse grid then two finer grids around the best point. Bounded to μ ∈ [1e-4, 1 − 1e-4],
    s ∈ [1e-2, 1e4] (s → ∞ is the pooled binomial; μ → 0 or 1 when no pilot or every pilot succeeds)."""
    c, k = _as_counts(successes, trials)
    cells, weight = np.unique(np.stack([c, k], 1), axis=0, return_counts=True)
    cc, kk = cells[:, 0][None, :], cells[:, 1][None, :]

    def loglik(mu, s):
        a, b = (mu * s)[:, None], ((1 - mu) * s)[:, None]
        return ((_lbeta(a + cc, b + kk - cc) - _lbeta(a, b)) * weight[None, :]).sum(1)

    lo_mu, hi_mu, lo_s, hi_s = math.log(1e-4 / (1 - 1e-4)), -math.log(1e-4 / (1 - 1e-4)), math.log(1e-2), math.log(1e4)
    best = (0.0, 0.0)
    for _ in range(3):  # zoom: grid over (logit μ, ln s), then re-centre a finer grid on the best cell
        gm, gs = np.meshgrid(np.linspace(lo_mu, hi_mu, 41), np.linspace(lo_s, hi_s, 41))
        mu, s = 1 / (1 + np.exp(-gm.ravel())), np.exp(gs.ravel())
        i = int(np.argmax(loglik(mu, s)))
        best = (gm.ravel()[i], gs.ravel()[i])
        wm, ws = (hi_mu - lo_mu) / 10, (hi_s - lo_s) / 10
        lo_mu, hi_mu = max(best[0] - wm, -9.21), min(best[0] + wm, 9.21)
        lo_s, hi_s = max(best[1] - ws, math.log(1e-2)), min(best[1] + ws, math.log(1e4))
    mu, s = 1 / (1 + math.exp(-best[0])), math.exp(best[1])
    return BetaFit(mu * s, (1 - mu) * s)


@dataclass
class ZIBetaFit:
    """Zero-inflated Beta: a problem is solvable with probability F_max, and then p ~ Beta(a, b)."""

    f_max: float
    a: float
    b: float

    def solvable_after_failures(self, n: int) -> float:
        """π_n = P(solvable | n failures) = F·B(a, b+n)/B(a, b) / (1 − F + F·B(a, b+n)/B(a, b))."""
        stay = self.f_max * math.exp(float(_lbeta(self.a, self.b + n) - _lbeta(self.a, self.b)))
        denom = 1.0 - self.f_max + stay
        return 0.0 if denom <= 0 else stay / denom

    def gain_after_failures(self, n: int) -> float:
        """g_n = π_n · a / (a + b + n)."""
        return self.solvable_after_failures(n) * self.a / (self.a + self.b + n)


def fit_zibeta(successes: Sequence[int], trials) -> ZIBetaFit:
    """Maximum likelihood of the zero-inflated beta-binomial: c_i = 0 has likelihood
    (1 − F) + F·B(a, b + k)/B(a, b), c_i > 0 has F·C(k, c)·B(a + c, b + k − c)/B(a, b). Maximised over
    (logit F_max, logit μ, ln s) by a zooming grid."""
    c, k = _as_counts(successes, trials)
    if not (c > 0).any():
        return ZIBetaFit(0.0, 1e-6, 1e-2)
    cells, weight = np.unique(np.stack([c, k], 1), axis=0, return_counts=True)
    cc, kk = cells[:, 0][None, :], cells[:, 1][None, :]
    zero = (cc == 0)

    def loglik(f, mu, s):
        a, b = (mu * s)[:, None], ((1 - mu) * s)[:, None]
        bb = np.exp(_lbeta(a + cc, b + kk - cc) - _lbeta(a, b))  # without C(k, c): constant in the params
        like = np.where(zero, (1 - f)[:, None] + f[:, None] * bb, f[:, None] * bb)
        return (np.log(np.maximum(like, 1e-300)) * weight[None, :]).sum(1)

    # A grid over (logit F_max, logit μ, ln s), then finer grids re-centred on the best point (the surface
    # has long ridges on which a local optimiser can stall; the grid is robust to them and fast, since
    # the likelihood is vectorised over the grid and the pilots collapse to <= (k+1)·(distinct k) cells).
    lo = np.array([math.log(0.02 / 0.98), -7.0, math.log(1e-2)])
    hi = np.array([9.0, 7.0, math.log(1e5)])
    floor, ceil = lo.copy(), hi.copy()
    best = None
    for _ in range(8):
        axes = [np.linspace(lo[d], hi[d], 21) for d in range(3)]
        gf, gm, gs = (x.ravel() for x in np.meshgrid(*axes, indexing="ij"))
        ll = loglik(1 / (1 + np.exp(-gf)), 1 / (1 + np.exp(-gm)), np.exp(gs))
        i = int(np.argmax(ll))
        best = np.array([gf[i], gm[i], gs[i]])
        width = (hi - lo) / 5  # the next grid spans ±2 cells of this one
        lo, hi = np.maximum(best - width, floor), np.minimum(best + width, ceil)
    f = 1 / (1 + math.exp(-best[0]))
    mu, s = 1 / (1 + math.exp(-best[1])), math.exp(best[2])
    return ZIBetaFit(f, mu * s, (1 - mu) * s)


# ---------------------------------------------------------------------- the model

@dataclass
class TTSPM:
    """Pilot counts plus the fits of each form; ``predict`` and ``saturation`` take ``form`` in FORMS."""

    successes: np.ndarray
    trials: np.ndarray
    mixture: Optional[ZIBetaFit]
    beta: Optional[BetaFit]
    pooled: Optional[PooledFit]
    plugin: Optional[PooledFit]

    @classmethod
    def fit(cls, successes: Sequence[int], trials, forms: Sequence[str] = FORMS) -> "TTSPM":
        """Fit every form in ``forms`` (the others are left None: predicting with them fails)."""
        c, k = _as_counts(successes, trials)
        fitters = {"mixture": fit_zibeta, "beta": fit_beta, "pooled": fit_pooled, "plugin": fit_plugin}
        return cls(c, k, *(fitters[f](c, k) if f in forms else None for f in ("mixture", "beta", "pooled", "plugin")))

    @property
    def f_max_observed(self) -> float:
        """Share of problems solved at least once in the pilots."""
        return float((self.successes > 0).mean())

    def predict(self, n, form: str = "beta") -> np.ndarray:
        """Predicted coverage F(N) for N in ``n`` (a scalar or an array)."""
        n_arr = np.atleast_1d(np.asarray(n, dtype=float))
        if form in ("mixture", "beta"):
            prior = self.mixture if form == "mixture" else self.beta
            c, k = self.successes[:, None], self.trials[:, None]
            a, b = prior.a + c, prior.b + k - c
            hit = 1.0 - np.exp(_lbeta(a, b + n_arr[None, :]) - _lbeta(a, b))
            if form == "mixture":  # an all-failed problem is solvable with posterior probability π_k
                pi = np.array([prior.solvable_after_failures(int(kk)) for kk in self.trials])[:, None]
                hit = np.where(c > 0, hit, pi * hit)
            out = hit.mean(0)
        elif form == "pooled":
            out = self.pooled.accuracy(n_arr)
        elif form == "plugin":
            out = mixture_accuracy(n_arr, self.successes / self.trials)
        else:
            raise ValueError(f"form must be one of {'|'.join(FORMS)}, got {form!r}")
        return out.reshape(np.shape(n))

    def gain(self, n, form: str = "beta") -> np.ndarray:
        """Δ(N) = F(N+1) − F(N)."""
        n_arr = np.asarray(n, dtype=float)
        return self.predict(n_arr + 1, form) - self.predict(n_arr, form)

    def saturation(self, eps: float, form: str = "beta", max_n: int = 1 << 20) -> int:
        """N* for ``form``: the closed form for ``pooled``; for the mixtures (no closed form) the smallest
        N with Δ(N) < ε found by doubling then bisection (Δ is non-increasing in N for both)."""
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if form == "pooled":
            return saturation_budget(self.pooled.p, self.pooled.f_max, eps)
        if self.gain(0, form) < eps:
            return 0
        hi = 1
        while self.gain(hi, form) >= eps and hi < max_n:
            hi *= 2
        lo = hi // 2  # Δ(lo) ≥ ε > Δ(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.gain(mid, form) >= eps else (lo, mid)
        return hi

    def forecast_error(self, n, form: str = "beta", reps: int = 200, pool: Optional[int] = None,
                       seed: int = 0) -> np.ndarray:
        """Sampling error of this kind of forecast, by parametric bootstrap from the fitted Beta prior:
        ``reps`` times, draw as many problems as were piloted (p_i ~ Beta(a, b)) with the same pilot counts
        k_i, refit ``form`` on simulated pilots and predict F(N); the error is that prediction minus the
        simulated problems' true coverage mean_i[1 − (1 − p_i)^N] or, with ``pool``, minus the coverage
        *measured* from ``pool`` further samples per problem (unbiased pass@N, so the measurement's own
        noise is included). Returns an array (reps, len(n)) of errors in coverage units.

        This is the uncertainty that k pilots per problem leave even when the model form is right: it shrinks
        as 1/√(problems), and a forecast cannot be judged to a tolerance much tighter than its spread."""
        budgets = np.atleast_1d(np.asarray(n, dtype=int))
        if pool is not None and pool < budgets.max():
            raise ValueError(f"forecast_error: pool={pool} must be >= the largest N ({budgets.max()})")
        prior = self.beta or fit_beta(self.successes, self.trials)
        rng = np.random.default_rng(seed)
        out = np.empty((reps, budgets.size))
        for r in range(reps):
            p = rng.beta(max(prior.a, 1e-3), max(prior.b, 1e-3), self.trials.size)
            pilots = rng.binomial(self.trials.astype(np.int64), p)
            predicted = TTSPM.fit(pilots, self.trials, forms=[form]).predict(budgets, form)
            if pool is None:
                truth = 1.0 - np.mean((1.0 - p[:, None]) ** budgets[None, :], axis=0)
            else:
                counts = rng.binomial(pool, p)
                truth = np.array([np.mean([pass_at_n(pool, int(c), int(b)) for c in counts]) for b in budgets])
            out[r] = predicted - truth
        return out

    def summary(self) -> dict:
        return {"problems": int(self.successes.size), "pilot_samples": int(self.trials.sum()),
                "pilot_accuracy": float(self.successes.sum() / self.trials.sum()),
                "f_max_observed": self.f_max_observed, "mixture": asdict(self.mixture), "beta": asdict(self.beta),
                "pooled": asdict(self.pooled), "plugin": asdict(self.plugin)}


# ---------------------------------------------------------------------- automatic budget

@dataclass
class AutoBudget:
    """Per-problem stopping rule for best-of-N / particle filtering (``search.budget=auto``).

    ``prior`` is the population fit: BetaFit (what the recipes and benchmark use: with no mass at p = 0 it
    never writes a problem off after a few failures, so it is the conservative choice for stopping),
    ZIBetaFit or PooledFit (which stop failing problems sooner); ``eps`` the smallest predicted
    gain in accuracy (probability that one more sample is the first success) worth a sample; ``max_n`` the
    cap (the fixed budget it replaces); ``min_n`` the fewest samples (≥ 1: a strategy must answer)."""

    prior: ZIBetaFit | BetaFit | PooledFit
    eps: float
    max_n: int
    min_n: int = 1

    def __post_init__(self):
        if self.eps <= 0:
            raise ValueError(f"auto budget: eps must be > 0, got {self.eps}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"auto budget: need 1 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")

    def budget_without_success(self) -> int:
        """Samples a problem gets while no sample is verified: smallest n ≥ min_n with g_n < ε (≤ max_n)."""
        n = self.min_n
        while n < self.max_n and self.prior.gain_after_failures(n) >= self.eps:
            n += 1
        return n

    def population_budget(self) -> int:
        """Without any success signal: the population N* of the prior, clipped to [min_n, max_n]."""
        if isinstance(self.prior, (BetaFit, ZIBetaFit)):  # Δ(N) = F·E[p(1−p)^N] = F·B(a+1, b+N) / B(a, b)
            f, a, b = getattr(self.prior, "f_max", 1.0), self.prior.a, self.prior.b
            n = 0
            while n < self.max_n and f * math.exp(float(_lbeta(a + 1, b + n) - _lbeta(a, b))) >= self.eps:
                n += 1
        else:
            n = saturation_budget(self.prior.p, self.prior.f_max, self.eps)
        return min(max(n, self.min_n), self.max_n)

    def should_stop(self, drawn: int, successes: Optional[int]) -> bool:
        """Stop this problem after ``drawn`` samples of which ``successes`` are verified (None: no signal)."""
        if drawn >= self.max_n:
            return True
        if drawn < self.min_n:
            return False
        if successes is None:
            return drawn >= self.population_budget()
        return successes > 0 or self.prior.gain_after_failures(drawn) < self.eps


def adaptive_sampling(draw: Callable[[list[int], int], list[list[bool]]], rule: AutoBudget,
                      drawn: Sequence[int], wins: Sequence[int], chunk: int = 1) -> tuple[list[int], list[int]]:
    """Continue sampling, round by round, the problems ``rule`` has not stopped; returns the final
    (samples drawn, verified successes) per problem.

    ``drawn`` / ``wins`` are the state after the first round (usually the pilot round the prior was fitted
    on). ``draw(problem_indices, n)`` draws ``n`` more samples for each listed problem in one batched call
    and returns their success flags, one list per listed problem. Each round draws ``chunk`` samples per
    active problem (larger chunks batch better and overshoot more)."""
    if chunk < 1:
        raise ValueError(f"adaptive_sampling: chunk must be >= 1, got {chunk}")
    drawn, wins = list(drawn), list(wins)
    active = [i for i in range(len(drawn)) if not rule.should_stop(drawn[i], wins[i])]
    while active:
        size = [min(chunk, rule.max_n - drawn[i]) for i in active]
        for n in sorted(set(size)):  # equal sizes share one call
            group = [i for i, s in zip(active, size) if s == n]
            flags = draw(group, n)
            if len(flags) != len(group):
                raise ValueError(f"draw returned {len(flags)} flag lists for {len(group)} problems")
            for i, f in zip(group, flags):
                drawn[i] += n
                wins[i] += int(sum(bool(x) for x in f))
        active = [i for i in active if not rule.should_stop(drawn[i], wins[i])]
    return drawn, wins


def auto_best_of_n(problems, cap: int, engine, prm, cfg) -> list[list]:
    """Best-of-N with ``search.budget=auto``: per problem, sample until a solution's aggregated PRM score
    reaches ``cfg.auto_threshold`` (the success signal), until the predicted gain of one more sample is
    below ``cfg.auto_eps``, or until ``cap`` samples. The (plain) Beta prior is fitted on a first round of
    ``cfg.auto_pilots`` samples for every problem (their PRM-verified counts), so no separate pilot run is
    needed. ``cfg``: a :class:`frugal.evaluator.config.BestOfNConfig`. Returns the candidates per problem (the
    caller selects among them as usual)."""
    from frugal.inference.engine import Candidate
    from frugal.evaluator.strategies.common import solution_score

    threshold = cfg.auto_threshold
    pilots = max(1, min(cfg.auto_pilots, cap))
    pools: list[list] = [[] for _ in problems]

    def draw(group: list[int], n: int) -> list[list[bool]]:
        cands = engine.extend(problems, [Candidate(i, stream=len(pools[i]) + k) for i in group for k in range(n)],
                              stop_at_step=False)
        prm.score_candidates(problems, cands)
        flags = []
        for j, i in enumerate(group):
            mine = cands[j * n:(j + 1) * n]
            pools[i].extend(mine)
            flags.append([solution_score(c, cfg.aggregation) >= threshold for c in mine])
        return flags

    wins = [sum(f) for f in draw(list(range(len(problems))), pilots)]
    # One problem cannot inform a population prior: fall back to the uniform Beta(1, 1).
    prior = fit_beta(wins, pilots) if len(problems) > 1 else BetaFit(1.0, 1.0)
    rule = AutoBudget(prior, cfg.auto_eps, cap, min_n=pilots)
    adaptive_sampling(draw, rule, [pilots] * len(problems), wins, chunk=cfg.auto_chunk)
    return pools


def sample_correctness(problems: Sequence[dict], engine, n: int, problems_per_call: int = 32,
                       progress: bool = False) -> np.ndarray:
    """Draw ``n`` complete solutions per problem with the evaluator's engine (batched, token-accounted in
    ``engine.counts``) and grade each with the training verifier; returns a bool array [problems, n]."""
    from tqdm.auto import tqdm

    from frugal.evaluator.strategies.common import fresh
    from frugal.rewards.verify import is_correct

    out = np.zeros((len(problems), n), dtype=bool)
    bar = tqdm(total=len(problems), desc="pilots", disable=None if progress else True, dynamic_ncols=True)
    for start in range(0, len(problems), problems_per_call):
        chunk = list(problems[start:start + problems_per_call])
        cands = engine.extend(chunk, fresh(len(chunk), n), stop_at_step=False)
        for j, c in enumerate(cands):
            row = chunk[c.problem]
            out[start + c.problem, j % n] = is_correct(c.text, str(row["answer"]), row.get("answer_format", "boxed"))
        bar.update(len(chunk))
    bar.close()
    return out


def _check_prob(x: float, name: str) -> None:
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")

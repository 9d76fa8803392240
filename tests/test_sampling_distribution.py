"""engine.backend=vllm samples from the same distribution as engine.backend=hf (in-process vLLM on the
embedded SmolLM2; `make test-vllm`, or `pytest -m vllm` in an environment with vLLM).

Both engines are driven through ``Engine.extend`` with ``Candidate(problem, stream=k)`` rows, exactly as
the search strategies drive them, so what is checked is Frugal's side too: the sampling keys each engine
sends (temperature, top-p, top-k "off"), the prompt ids, EOS and the continuation of a candidate from its
ids in a second call.

* First tokens: ``N_FIRST`` draws per prompt and setting from each backend against the exact next-token
  distribution (the HF model's float64 softmax after temperature / top-k / top-p written out here, not
  Frugal's warpers): a chi-square test over the tokens expected at least 5 times (the rest lumped in rank
  order into bins expected at least 5 times) and a Poisson test of the draws outside the 50 most probable
  tokens (~2.5% of the mass at temperature 0.8: a top-k nobody asked for, e.g. a generation-config
  default, empties it) must not reject at 1e-3; the total-variation distance is reported.
* Whole samples: ``N_MULTI`` samples of ``2 x HALF`` tokens per prompt (two ``extend`` calls) from each
  backend, each scored under the HF model (mean log-prob per token, temperature 1): the two backends' means
  must agree (two-sample z < 4). vLLM's own log-probs of the same tokens (``VLLMEngine.score_tokens``) must
  match HF's to float32 noise, and vLLM must run the float32 it was asked for.

The draws are seeded (run seed, prompt, stream), so a run is deterministic: a failure is a property of the
code and the libraries, not bad luck (with 16 tests at 1e-3, a correct sampler fails for about 1 in 60
seeds). About 2 minutes on one CPU thread.
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

from frugal.inference.engine import Candidate  # noqa: E402
from frugal.inference.hf_engine import HFEngine, HFEngineConfig  # noqa: E402
from frugal.inference.models import ModelConfig, load_model, vllm_model_path  # noqa: E402
from frugal.inference.vllm_engine import VLLMEngine, VLLMEngineConfig  # noqa: E402
from frugal.inference.vllm_setup import VLLMConfig  # noqa: E402

torch.set_num_threads(1)
SMOL = ModelConfig()  # builtin:smollm2-135m-instruct
# 65 tokens with SmolLM2's chat template: 2 whole 32-token KV blocks + 1, so vLLM's prefix cache serves all
# but the last prompt token of every request after the first (that keeps 1000s of requests cheap).
SUFFIX = "\nPut your final answer within \\boxed{}. Show your steps. Check your result once before you give it."
PROBLEMS = [{"prompt": [{"role": "user", "content": q + SUFFIX}]} for q in ("What is 7 - 4 - 1?", "What is 8 + 7 + 6?")]
SETTINGS = {"plain": dict(temperature=0.8),  # top_p 1.0, top_k 0 (off)
            "top_p": dict(temperature=0.8, top_p=0.9),
            "top_k": dict(temperature=0.8, top_k=20)}
FIRST_SETTINGS = [("plain", 0), ("plain", 1), ("top_p", 0), ("top_k", 1)]  # (setting, prompt)
N_FIRST = 1000
N_MULTI = 100
HALF = 6
MIN_P, MAX_Z = 1e-3, 4.0


@pytest.fixture(scope="module")
def llm():
    from vllm.platforms import current_platform

    from frugal.inference.vllm_setup import make_llm

    # as VLLMEngine builds it (vllm_engine.py): explicit float32, prefix caching, 32-token blocks on a CPU
    extra = {"block_size": 32} if current_platform.is_cpu() else {}
    llm = make_llm(vllm_model_path(SMOL.name_or_path), dtype="float32", max_model_len=512, seed=0,
                   kv_cache_gib=0.5, enable_prefix_caching=True, **extra)
    yield llm
    del llm


@pytest.fixture(scope="module")
def hf_policy():
    model, tok = load_model(SMOL, torch.device("cpu"))
    return model.eval(), tok


def engines(llm, hf_policy, setting, **knobs):
    model, tok = hf_policy
    cfg = dict(stop_strings=[], max_new_tokens=2 * HALF, **SETTINGS[setting], **knobs)
    return {"hf": HFEngine(model, tok, HFEngineConfig(**cfg), seed=0),
            "vllm": VLLMEngine.load(SMOL, VLLMEngineConfig(**cfg), VLLMConfig(dtype="float32", max_model_len=512),
                                    seed=0, llm=llm)}


def generated_ids(engine, cand) -> list[int]:
    """The ids the engine generated for ``cand`` (``Candidate.ids``; the EOS it stopped at, which
    ``Candidate.ids`` leaves out, put back)."""
    assert cand.ids is not None and cand.ids.owner is engine
    ids = list(cand.ids.ids)
    if cand.tokens == len(ids) + 1:
        assert cand.finished
        ids.append(engine.eos_ids[0])
    assert len(ids) == cand.tokens
    return ids


def draw(engine, problem: int, n: int, calls: int, tokens: int) -> list[list[int]]:
    """``n`` candidates of ``problem`` (streams 0..n-1), ``calls`` extend calls of up to ``tokens`` each."""
    cands = [Candidate(problem, stream=k) for k in range(n)]
    for _ in range(calls):
        cands = engine.extend(PROBLEMS, cands, max_tokens=tokens, stop_at_step=False)
    return [generated_ids(engine, c) for c in cands]


def warped_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-k tokens, then to the smallest set of the most probable
    tokens whose mass reaches top_p, renormalised (float64)."""
    z = logits.double() / temperature
    if top_k:
        z = z.masked_fill(z < z.topk(top_k).values[-1], -math.inf)
    p = torch.softmax(z, -1)
    if top_p < 1.0:
        sp, idx = p.sort(descending=True)
        before = sp.cumsum(-1) - sp  # mass of the more probable tokens
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep[idx] = before < top_p
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def prompt_ids(engine, problem: int) -> list[int]:
    return engine.core.prompt_ids(engine.core.prompt_text(PROBLEMS[problem]["prompt"]))


def chi_square(tokens: list[int], p: torch.Tensor, min_expected: float = 5.0):
    """(statistic, degrees of freedom, p-value, total-variation distance) of the draws against ``p``: a bin
    per token expected at least ``min_expected`` times, the rest lumped in rank order into bins expected at
    least ``min_expected`` times each (so a missing or inflated tail shows), any draw of a token of
    probability 0 an outright rejection."""
    n = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=p.numel()).double()
    tv = 0.5 * float((counts / n - p).abs().sum())
    if counts[p == 0].sum() > 0:  # tokens that top-k / top-p exclude
        return math.inf, 0, 0.0, tv
    order = p.argsort(descending=True)
    exp, obs = (p * n)[order], counts[order]
    bins_e, bins_o, acc_e, acc_o = [], [], 0.0, 0.0
    for e, o in zip(exp.tolist(), obs.tolist()):
        if e == 0:
            break
        acc_e, acc_o = acc_e + e, acc_o + o
        if acc_e >= min_expected:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0 and bins_e:  # the leftover tail joins the last bin
        bins_e[-1] += acc_e
        bins_o[-1] += acc_o
    e, o = torch.tensor(bins_e, dtype=torch.float64), torch.tensor(bins_o, dtype=torch.float64)
    stat = float(((o - e) ** 2 / e).sum())
    df = len(bins_e) - 1
    pval = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))
    return stat, df, pval, tv


def tail_test(tokens: list[int], p: torch.Tensor, rank: int = 50):
    """(observed, expected, two-sided Poisson p-value) of the draws of tokens ranked below the ``rank`` most
    probable: a sampler that truncates the tail (a top-k it was not asked for) or inflates it fails here."""
    tail = torch.zeros_like(p, dtype=torch.bool)
    tail[p.argsort(descending=True)[rank:]] = True
    lam = float(p[tail].sum()) * len(tokens)
    k = int(tail[torch.tensor(tokens)].sum())
    if lam == 0:
        return k, lam, 1.0 if k == 0 else 0.0
    lam_t = torch.tensor(lam, dtype=torch.float64)
    below = float(torch.special.gammaincc(torch.tensor(k + 1.0, dtype=torch.float64), lam_t))  # P(X <= k)
    above = 1.0 if k == 0 else float(torch.special.gammainc(torch.tensor(float(k), dtype=torch.float64), lam_t))
    return k, lam, min(1.0, 2 * min(below, above))


@torch.inference_mode()
def hf_logprobs(model, ids: list[int], seqs: list[list[int]], batch: int = 50) -> list[torch.Tensor]:
    """Per sequence, the HF model's log-prob (temperature 1) of each of its tokens after prompt ``ids``: the
    prompt's KV once, then the sequences (right-padded) over it."""
    from transformers import DynamicCache

    from frugal.inference.decoding import cache_kw

    pre = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True).past_key_values
    kv = [(layer.keys, layer.values) for layer in pre.layers]
    n0, out = len(ids) - 1, []
    for b in range(0, len(seqs), batch):
        chunk = seqs[b:b + batch]
        rows, width = len(chunk), max(len(s) for s in chunk)
        inp = torch.full((rows, width), ids[-1])
        for r, s in enumerate(chunk):
            inp[r, 1:len(s)] = torch.tensor(s[:-1])
        cache = DynamicCache([(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous())
                              for k, v in kv], config=model.config)
        logits = model(input_ids=inp, attention_mask=torch.ones(rows, n0 + width, dtype=torch.long),
                       position_ids=torch.arange(n0, n0 + width).expand(rows, -1), **{cache_kw(): cache},
                       use_cache=True).logits.float()
        logp = torch.log_softmax(logits, -1)
        out += [logp[r, :len(s)].gather(-1, torch.tensor(s)[:, None])[:, 0] for r, s in enumerate(chunk)]
    return out


def test_vllm_runs_float32(llm):
    assert llm.llm_engine.model_config.dtype == torch.float32


@pytest.mark.parametrize("setting,problem", FIRST_SETTINGS)
def test_first_token_matches_exact_distribution(llm, hf_policy, setting, problem):
    model, _ = hf_policy
    eng = engines(llm, hf_policy, setting)
    ids = prompt_ids(eng["hf"], problem)
    assert ids == prompt_ids(eng["vllm"], problem)  # the same prompt ids on both
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    p = warped_probs(logits, **SETTINGS[setting])
    report = {}
    for name, engine in eng.items():
        tokens = [s[0] for s in draw(engine, problem, N_FIRST, 1, 1)]
        report[name] = (chi_square(tokens, p), tail_test(tokens, p))
    print(setting, problem, {k: dict(chi2=round(c[0], 1), df=c[1], p=c[2], tv=round(c[3], 4), tail_obs=t[0],
                                     tail_exp=round(t[1], 1), tail_p=t[2]) for k, (c, t) in report.items()})
    for name, ((stat, df, pval, tv), (k, lam, tail_p)) in report.items():
        assert pval > MIN_P, (f"{name}: first tokens ({setting}, prompt {problem}) are not the exact distribution: "
                              f"chi2={stat:.1f} df={df} p={pval:.2e} tv={tv:.3f}")
        assert tail_p > MIN_P, (f"{name}: first tokens ({setting}, prompt {problem}): {k} draws outside the 50 most "
                                f"probable tokens, {lam:.1f} expected (p={tail_p:.2e})")


def test_samples_have_the_same_log_probs(llm, hf_policy):
    """Whole samples (two extend calls: the second continues each candidate from its ids) from both
    backends have the same mean HF log-prob per token; vLLM's own log-probs of them are HF's."""
    model, _ = hf_policy
    eng = engines(llm, hf_policy, "plain")
    means = {"hf": [], "vllm": []}
    for problem in range(len(PROBLEMS)):
        ids = prompt_ids(eng["hf"], problem)
        for name, engine in eng.items():
            seqs = draw(engine, problem, N_MULTI, 2, HALF)
            assert all(len(s) == 2 * HALF or s[-1] in engine.eos_ids for s in seqs)
            logp = hf_logprobs(model, ids, seqs)
            means[name] += [float(x.mean()) for x in logp]
            if name == "vllm" and problem == 0:
                theirs = engine.score([PROBLEMS[problem]] * 20, [Candidate(0)] * 20, seqs[:20])
                gap = max(float((torch.tensor(t[0]) - x).abs().max()) for t, x in zip(theirs, logp))
                assert gap < 1e-3, f"vLLM's log-probs differ from HF's by up to {gap:.2e} (float32 on both)"
    a, b = (torch.tensor(means[k], dtype=torch.float64) for k in ("hf", "vllm"))
    z = float((a.mean() - b.mean()) / (a.var() / len(a) + b.var() / len(b)).sqrt())
    print(f"mean HF log-prob per token: hf {a.mean():.4f} vllm {b.mean():.4f} (n={len(a)} each) z={z:.2f}")
    assert abs(z) < MAX_Z, f"hf and vllm samples differ in mean log-prob: hf {a.mean():.4f} vllm {b.mean():.4f} z={z:.2f}"

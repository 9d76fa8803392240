"""Per-candidate KV reuse in the hf engine (inference/kv_cache.py): exact logits across calls, shared
prefixes on fork, eviction and its counted re-prefill, and the same texts at one seed as before the store."""

import json

import pytest
import torch

from frugal.inference.engine import Candidate
from frugal.inference.hf_engine import HFEngine, HFEngineConfig
from frugal.inference.kv_cache import KVTree

PROBLEMS = [{"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "answer": "7"},
            {"prompt": [{"role": "user", "content": "And 12 + 5?"}], "answer": "17"}]


@pytest.fixture(scope="module")
def tiny():
    from frugal.inference.models import ModelConfig, load_model

    torch.manual_seed(0)
    return load_model(ModelConfig(name_or_path="builtin:tiny-random", dtype="float32"), torch.device("cpu"))


def _engine(model, tok, **kw):
    return HFEngine(model, tok, HFEngineConfig(max_new_tokens=24, max_step_tokens=4, temperature=1.0, **kw))


def _full_ids(engine, cand):
    prompt = engine.core.prompt_text(PROBLEMS[cand.problem]["prompt"])
    return engine.core.prompt_ids(prompt) + list(cand.ids.ids)


def test_kv_tree_match_insert_split_and_evict():
    kv = lambda n, v=0.0: [(torch.full((1, 1, n, 2), v), torch.full((1, 1, n, 2), v))]  # noqa: E731
    tree = KVTree(capacity=6)
    tree.insert("p", [1, 2, 3, 4], 0, kv(4, 1.0))
    assert tree.match("p", [1, 2, 3, 4, 5], 5)[0] == 4
    assert tree.match("p", [1, 2, 9], 3)[0] == 2 and tree.match("q", [1], 1)[0] == 0
    tree.insert("p", [1, 2, 7], 2, kv(1, 2.0))  # splits [1 2 3 4] into [1 2] + [3 4]; the fork adds [7]
    assert tree.tokens == 5
    n, got, _ = tree.match("p", [1, 2, 7, 8], 4)
    assert n == 3 and got[0][0][0, 0, :, 0].tolist() == [1.0, 1.0, 2.0]
    tree.insert("p", [1, 2, 7, 8, 9], 3, kv(2, 3.0))  # 7 tokens > 6: the least recently used leaf goes
    assert tree.evict() == 2 and tree.tokens == 5  # [3 4] (untouched since the split)
    n, _, lost = tree.match("p", [1, 2, 3, 4, 5], 5)
    assert (n, lost) == (2, 2)  # [3 4] was stored and evicted: it will be prefilled again


def test_extended_candidate_has_the_logits_of_one_full_forward_pass(tiny):
    """A candidate extended over several calls, its KV reused each time: scoring a continuation from the
    stored KV gives exactly the logits of one full forward pass over prompt + solution + continuation."""
    model, tok = tiny
    engine = _engine(model, tok)
    cand = Candidate(0, stream=0)
    for _ in range(4):
        cand = engine.extend(PROBLEMS, [cand])[0]
    assert cand.tokens >= 12 and cand.ids is not None
    prefill_before = engine.counts.prefill
    cont = tok(" 7", add_special_tokens=False)["input_ids"] + [5, 17]
    logp, top, ran = engine.score(PROBLEMS, [cand], [cont])[0]
    assert ran == 1 + len(cont)
    # only the solution's last token (never fed: the call stopped on it) and the continuation ran
    assert engine.counts.prefill - prefill_before == 1 + len(cont)
    full = torch.tensor([_full_ids(engine, cand) + cont])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
    n = full.shape[1]
    expect = ref[n - len(cont) - 1:n - 1].gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(logp), expect, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(top), ref[n - len(cont) - 1:n - 1].max(-1).values, atol=1e-5, rtol=0)


def test_each_call_runs_only_new_tokens_and_forks_share_their_prefix(tiny):
    model, tok = tiny
    engine = _engine(model, tok)
    first = engine.extend(PROBLEMS, [Candidate(0, stream=0)])[0]
    stored = engine._store.tokens
    assert stored == 1 + first.tokens - 1  # last prompt token + every generated token but the last
    before = engine.counts.snapshot()
    kids = engine.extend(PROBLEMS, [first] + [first.fork(j) for j in range(1, 4)])
    spent = engine.counts.since(before)
    # the token the parent ended on (generated, never fed) runs once for all four children, then each
    # child decodes over the shared prefix: nothing of the parent is run again
    assert spent.prefill == 1
    assert spent.cached == 4 * len(_full_ids(engine, first))
    # the parent's segment is stored once; the store grew by the token the parent ended on (once) and
    # each child's own tokens but its last
    assert engine._store.tokens - stored == 1 + sum(k.tokens - first.tokens - 1 for k in kids)
    assert len({k.text for k in kids}) > 1


def test_eviction_reprefills_and_counts_it(tiny):
    model, tok = tiny
    texts, spent = {}, {}
    for cap in (100_000, 6):
        engine = _engine(model, tok, kv_cache_tokens=cap)
        a = engine.extend(PROBLEMS, [Candidate(0, stream=0)])[0]
        b = engine.extend(PROBLEMS, [Candidate(1, stream=0)])[0]  # pushes a's KV out when cap = 6
        before = engine.counts.snapshot()
        out = engine.extend(PROBLEMS, [a, b])
        spent[cap] = engine.counts.since(before)
        texts[cap] = [c.text for c in out]
    assert spent[100_000].prefill == 2 and spent[100_000].reprefill == 0
    assert spent[6].reprefill > 0
    assert spent[6].prefill == 2 + spent[6].reprefill  # the evicted tokens ran again, and are counted
    assert texts[6] == texts[100_000]


@pytest.mark.parametrize("kv_cache_tokens", [100_000, 0, 12])
def test_same_seed_same_texts_as_before_on_every_strategy(kv_cache_tokens):
    """Every strategy (SSR with its draft and target) writes at one seed exactly the texts the code wrote
    before the per-candidate KV store (tests/search_golden.json), with the store on, off, or evicting."""
    import search_golden

    want = json.loads(search_golden.GOLDEN.read_text())
    got = search_golden.run_all(*search_golden.models(), kv_cache_tokens=kv_cache_tokens)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == want[key], key

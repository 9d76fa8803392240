"""DVTS (evaluator/strategies/dvts.py) on the scripted fake policy and PRM of test_evaluator.py."""

from __future__ import annotations

import pytest
from test_evaluator import DELIM, PROBLEMS, FakeEngine, FakePRM, _cfg

from frugal.evaluator.prm_counts import CountingPRM
from frugal.evaluator.strategies import get
from frugal.evaluator.strategies.dvts import widths

FIRST = [0.9, 0.95, 0.1, 0.2]  # step-1 scores of the N = 4 fresh candidates (streams 0..3)


def script(call, k, c):
    """Step 1: FIRST[k]. Later: steps below a "v=0.2" first step score 0.99 then 0.8, the others 0.5 then 0.4."""
    if call == 0:
        return FIRST[k]
    low = c.text.startswith("v=0.2")
    return (0.99 if low else 0.5) if call == 1 else (0.8 if low else 0.4)


def test_widths_share_the_budget():
    assert widths(4, 2) == [2, 2]
    assert widths(8, 2) == [2, 2, 2, 2]
    assert widths(7, 2) == [3, 2, 2]  # N not a multiple of M: all N children still used
    assert widths(2, 4) == [2] and widths(1, 4) == [1]


def test_dvts_hand_worked_example_and_beam_contrast():
    """N = 4, M = 2: subtrees {0, 1} and {2, 3}. Step 1 scores (0.9, 0.95 | 0.1, 0.2): subtree 0 keeps
    0.95, subtree 1 keeps 0.2 (beam search over one pool would keep 0.95 and 0.9, both of subtree 0).
    Step 2: each kept step is copied into 2 children; those under 0.2 score 0.99, the others 0.5. Step 3
    (the last, length 3): 0.8 under 0.2, 0.4 otherwise. With aggregation=last the best leaf overall is
    under "v=0.2", a prefix that beam search pruned at step 1."""
    engine = FakeEngine(script, length=3)
    res = get("dvts")(PROBLEMS[:1], 4, engine, CountingPRM(FakePRM()), _cfg(name="dvts", beam_width=2,
                                                                             aggregation="last"))[0]
    assert len(engine.calls) == 3 and all(len(call["cands"]) == 4 for call in engine.calls)
    assert [c.text.split(DELIM)[0] for c in engine.calls[1]["cands"]] == ["v=0.95", "v=0.95", "v=0.2", "v=0.2"]
    assert len({c.stream for c in engine.calls[1]["cands"]}) == 4  # the copies sample on streams of their own
    assert res.chosen.text.startswith("v=0.2" + DELIM + "v=0.99" + DELIM + "v=0.8")
    assert res.chosen.scores == pytest.approx([0.2, 0.99, 0.8])
    assert len(res.candidates) == 4 and res.info == {"subtrees": 2}

    beam_engine = FakeEngine(script, length=3)
    beam = get("beam")(PROBLEMS[:1], 4, beam_engine, CountingPRM(FakePRM()), _cfg(name="beam", beam_width=2,
                                                                                  aggregation="last"))[0]
    assert sorted(c.text.split(DELIM)[0] for c in beam_engine.calls[1]["cands"]) == ["v=0.9", "v=0.9", "v=0.95", "v=0.95"]
    assert not beam.chosen.text.startswith("v=0.2")


def test_dvts_runs_problems_side_by_side_and_one_subtree_per_small_budget():
    engine = FakeEngine(lambda call, k, c: 0.5, length=2, answer=lambda c: "answer 1")
    res = get("dvts")(PROBLEMS, 2, engine, CountingPRM(FakePRM()), _cfg(name="dvts", beam_width=4))
    assert len(res) == 2 and all(r.chosen.finished and r.info == {"subtrees": 1} for r in res)
    assert [c.problem for c in engine.calls[0]["cands"]] == [0, 0, 1, 1]  # one call for both problems


def test_dvts_is_registered_and_composes():
    from test_configs import compose_recipe

    from frugal.evaluator.config import DVTSConfig, EvalConfig
    from frugal.runtime.config import to_config

    cfg = to_config(compose_recipe("eval", ["search=dvts", "search.beam_width=8", "prm_path=/nonexistent"]), EvalConfig)
    assert isinstance(cfg.search, DVTSConfig) and cfg.search.beam_width == 8

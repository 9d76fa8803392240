"""scripts/bench_length.py: its flags, helpers and a smoke run on the tiny random model (the BENCH line,
completions forced to the target length, each algorithm in its own child). No timing asserts."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_length", ROOT / "scripts" / "bench_length.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_flags_fail_early(capsys):
    bench = _bench()
    for argv, message in [(["--decayed", "8,1.5,0.9"], "p_keep"), (["--decayed", "8,0.5"], "three"),
                          (["--algos", "grpo,ppo"], "ppo"),
                          (["--plan", "--candidates", "8,0.3,1.5"], "decay"), (["--repeats", "0"], "--repeats")]:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err
    assert bench.parse_args(["--decayed", "4,0.25,0.9"]).decayed_schedule == {"k_early": 4, "p_keep": 0.25, "decay": 0.9}


def test_decayed_schedule_is_the_sgrpo_config_and_overrides():
    bench = _bench()
    args = bench.parse_args(["--decayed", "4,0.25,0.9"])
    cfg = bench.algo_config("sgrpo_decay", args, group=8)
    assert (cfg.name, cfg.k_early, cfg.p_keep, cfg.decay, cfg.group_size) == ("sgrpo", 4, 0.25, 0.9, 8)
    assert bench.algo_overrides("sgrpo_decay", args) == ["algo=sgrpo", "algo.k_early=4", "algo.p_keep=0.25",
                                                         "algo.decay=0.9"]
    assert bench.algo_config("grpo", args, group=8).name == "grpo"


def test_synthetic_rewards_give_every_group_variance():
    rewards = _bench().synthetic_rewards(24, 8, seed=0)
    groups = [rewards[i:i + 8] for i in range(0, 24, 8)]
    assert all(sorted(g) == [0.0] * 4 + [1.0] * 4 for g in groups)
    assert len({tuple(g) for g in groups}) > 1  # shuffled per group


def test_rss_watch_sees_an_allocation_inside_the_block():
    import torch

    with _bench().rss_watch() as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del block
    assert mem["mb"] >= 48


def test_smoke_run_on_tiny_random(tmp_path):
    summary_path = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_length.py"), "--quick", "--lengths", "12",
           "--algos", "grpo,sgrpo_decay", "--decayed", "2,0.5,0.5", "--threads", "1",
           "--workdir", str(tmp_path / "work"), "--json", str(summary_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("BENCH length sgrpo_vs_grpo_update_12=") and " tspmo_vs_grpo_update_12=nan" in last
    summary = json.loads(summary_path.read_text())
    at = summary["results"]["12"]
    assert at["sample"]["completion_tokens"] == at["sample"]["rows"] * 12  # every row forced to 12 tokens
    assert at["grpo"]["selected_frac"] == 1.0 and at["grpo"]["last_pos_mean"] == 11.0
    decayed = at["sgrpo_decay"]
    assert decayed["selected_frac"] < 0.6 and decayed["last_pos_mean"] < 11  # 0.5^(t-2) after 2 tokens
    assert "profile" in decayed and decayed["profile"]["backward_s"] > 0
    assert len(decayed["update_s"]) == 2  # warm-up + --repeats 1 (quick)
    ratio = float(last.split("sgrpo_vs_grpo_update_12=")[1].split()[0])
    assert ratio == pytest.approx(summary["ratios"]["12"]["sgrpo_decay_vs_grpo_update"], abs=1e-3)


def test_plan_counts_the_decoder_positions_each_schedule_needs(capsys):
    bench = _bench()
    assert bench.main(["--plan", "--lengths", "64", "--candidates", "8,0.3,1.0", "8,0.5,0.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("BENCH") for line in lines)
    args = bench.parse_args(["--lengths", "64", "--candidates", "8,0.3,1.0", "8,0.5,0.9"])
    plan = bench.plan(args, draws=20)
    uniform, decayed = plan["8,0.3,1.0"][0], plan["8,0.5,0.9"][0]
    assert uniform["decoder_vs_grpo"] > 0.95 and uniform["crop"] > 0.95  # decay 1: the row runs to its end
    # decay 0.9: kept after 8 tokens w.p. 0.5·0.9^(t-8), so rows stop around a third of the way in
    assert decayed["decoder_vs_grpo"] < 0.6 and decayed["crop"] < 0.5
    assert decayed["decoder_vs_grpo"] >= decayed["crop"] - 0.05  # buckets run to their longest row

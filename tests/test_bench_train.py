"""scripts/bench_train.py: the shared settings compose to a valid Frugal config that matches TRL's, and
a smoke run on the tiny random model produces the summary and the closing BENCH line. No timing asserts."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_median_excludes_the_warmup_step():
    bench = _bench()
    assert bench.median_after_warmup([100.0, 3.0, 1.0, 2.0]) == 2.0
    assert bench.median_after_warmup([100.0, 4.0, 2.0]) == 3.0
    with pytest.raises(ValueError):
        bench.median_after_warmup([1.0])


def test_bad_flags_fail_early():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--prompts", "4", "--group", "8", "--micro-batch", "5"])  # 5 does not divide 32
    with pytest.raises(SystemExit):
        bench.parse_args(["--trainers", "sgrpo,ppo"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "1"])


def test_frugal_config_carries_the_shared_settings(tmp_path):
    bench = _bench()
    from frugal.runtime.config import to_config

    args = bench.parse_args(["--steps", "3", "--prompts", "2", "--group", "4", "--max-new-tokens", "16",
                             "--lr", "0.001", "--rank", "4", "--alpha", "8", "--temperature", "0.7",
                             "--seed", "5", "--micro-batch", "4"])
    cfg = to_config(bench.compose(bench.frugal_overrides(args, "grpo", tmp_path)))
    assert (cfg.algo.name, cfg.algo.group_size, cfg.algo.beta, cfg.algo.num_iterations) == ("grpo", 4, 0.0, 1)
    assert (cfg.max_steps, cfg.prompts_per_step, cfg.seed) == (3, 2, 5)
    assert (cfg.generation.max_new_tokens, cfg.generation.temperature) == (16, 0.7)
    assert cfg.generation.batch_size == 8  # every completion of a step in one generate call, like TRL
    assert (cfg.optim.lr, cfg.optim.micro_batch_size, cfg.optim.warmup_steps) == (0.001, 4, 0)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (4, 8, ["all-linear"])
    assert cfg.eval_before is False and cfg.save_every == 0 and cfg.logger.backend == "none"
    assert cfg.model.dtype == "float32" and cfg.device == "cpu"
    # The demo task: single-digit addition graded as a plain number.
    assert (cfg.task.name, cfg.task.ops, cfg.task.digits, cfg.task.prompt.answer_format) == ("arith", ["+"], 1, "number")


def test_smoke_run_on_tiny_random(tmp_path):
    summary_path = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--model", "builtin:tiny-random",
           "--steps", "2", "--prompts", "2", "--group", "2", "--max-new-tokens", "4", "--trainers", "sgrpo,trl",
           "--no-baseline", "--workdir", str(tmp_path / "work"), "--json", str(summary_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ,
                                                                              "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("BENCH train sgrpo_vs_trl_time=") and " sgrpo_vs_trl_mem=" in last
    summary = json.loads(summary_path.read_text())
    for name in ("sgrpo", "trl"):
        result = summary["results"][name]
        assert len(result["step_s"]) == 2 and len(result["generate_s"]) == 2
        assert result["peak_rss_mb"] > 0
        assert result["completion_tokens_mean"] <= 4
    assert "grpo" not in summary["results"]
    time_ratio = float(last.split("sgrpo_vs_trl_time=")[1].split()[0])
    assert time_ratio == pytest.approx(summary["ratios"]["sgrpo_vs_trl_time"], abs=1e-3)

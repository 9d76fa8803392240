"""engine.backend=openai against a real `vllm serve` of the embedded SmolLM2, started by this module on
127.0.0.1 (and stopped at its end): token-id prompts, generated ids back, usage's cached tokens, seeds
that reproduce, a PRM-guided strategy and SSR's verification (echo + logprobs) through the server."""

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm")

from frugal.inference.backends import engine_config, make_engine  # noqa: E402
from frugal.inference.models import vllm_model_path  # noqa: E402
from frugal.inference.engine import Candidate
from frugal.inference.hf_engine import HFEngine, HFEngineConfig  # noqa: E402
from frugal.evaluator.prm_counts import CountingPRM  # noqa: E402
from frugal.inference.models import ModelConfig  # noqa: E402

torch.set_num_threads(1)
SMOL = ModelConfig()
SERVED = "smollm2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "vllm_serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", vllm_model_path(SMOL.name_or_path),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--seed", "0", "--enable-prompt-tokens-details", "--enable-prefix-caching"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in 900 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def arith(n):
    from frugal.tasks import load_task
    from frugal.tasks.config import PromptConfig, TaskConfig

    task = TaskConfig(name="arith", ops=["+", "-"], num_operands=3, digits=1, prompt=PromptConfig(num_fewshot=3))
    return load_task(task).test[:n]


def engine_for(url, seed=0):
    cfg = engine_config("openai", base_url=url, served_model=SERVED, max_new_tokens=48, max_step_tokens=32,
                       max_steps=6, max_concurrency=4)
    return make_engine(SMOL, cfg, seed=seed)


def test_openai_steps_ids_cache_and_seeds(server):
    engine = engine_for(server)
    problems = arith(2)
    cands = [Candidate(p, stream=k) for p in range(2) for k in range(2)]
    first = engine.extend(problems, cands)
    assert engine.format == "ids" and all(c.ids is not None for c in first)  # vLLM takes and returns ids
    c1 = engine.counts.snapshot()
    second = engine.extend(problems, first)
    c2 = engine.counts.since(c1)
    assert c2.cached > 0  # usage.prompt_tokens_details.cached_tokens: step 1's prompt and ids were cached
    prompt_lens = [len(engine.core.prompt_ids(engine.core.prompt_text(p["prompt"]))) for p in problems]
    assert c2.prefill + c2.cached == sum(prompt_lens[c.problem] + len(engine.core.continuation_ids(c)) for c in first
                                         if not c.finished)
    assert all(b.text.startswith(a.text) for a, b in zip(first, second))
    again = engine_for(server).extend(problems, cands)
    assert [c.text for c in again] == [c.text for c in first]  # per-request seeds reproduce


def test_openai_best_of_n_and_ssr_verification(server):
    from frugal.evaluator.config import search_config
    from frugal.evaluator.harness import run_strategy
    from frugal.evaluator.strategies.ssr import score_steps

    from test_backends_vllm import TextPRM

    prm = CountingPRM(TextPRM())
    engine = engine_for(server)
    rows, records = run_strategy("particle_filter", arith(2), [2], engine, prm,
                                 search_config("particle_filter", budgets=[2]), progress=False)
    assert rows[0].problems == 2 and rows[0].policy_generated_tokens > 0 and all(r["chosen"] for r in records)
    # SSR's target verification through the server equals the HF forward pass (float32)
    from frugal.inference.hf_engine import HFEngine
    from frugal.inference.models import load_model

    hf = HFEngine(*load_model(SMOL, torch.device("cpu")), HFEngineConfig(**engine.cfg.shared()))
    prompts, prefixes, steps = [arith(1)[0]["prompt"]] * 2, ["", ""], ["3 + 4 = 7\n\n", "The answer is 12."]
    served, local = score_steps(engine, prompts, prefixes, steps), score_steps(hf, prompts, prefixes, steps)
    for a, b in zip(served, local):
        assert len(a.logp) == len(b.logp) > 0
        assert max(abs(x - y) for x, y in zip(a.logp, b.logp)) < 1e-2
        assert max(abs(x - y) for x, y in zip(a.top, b.top)) < 1e-2

"""engine.backend=hf|vllm|openai: config validation, the factory, and the OpenAI-compatible backend's
request logic (concurrency, retries, token-id / text prompts, seeds, usage accounting, errors, the API key)
against a small stub completions server on 127.0.0.1. The vLLM-backed tests are in test_backends_vllm.py."""

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from frugal.inference.backends import engine_config, make_engine
from frugal.inference.engine import Candidate, Engine
from frugal.inference.hf_engine import HFEngine, HFEngineConfig
from frugal.inference.models import ModelConfig, load_tokenizer

torch.set_num_threads(1)
TINY = ModelConfig(name_or_path="builtin:tiny-random")
REPLIES = ["First, 3 + 4 = 7.\n\nThe answer is 7.", "Add them: 7.\n\nSo 7.", "Hmm, 3 and 4 make 8.\n\nAnswer 8."]


class Stub:
    """A minimal OpenAI-compatible ``/v1/completions`` server (vLLM's extensions included) on 127.0.0.1.

    The completion is ``REPLIES[seed % 3]`` (+ EOS) tokenised, cut after the token that completes a stop
    string or at ``max_tokens``. ``fail_first`` requests get HTTP 500 first (retries); ``reject_ids`` answers
    a token-id prompt with HTTP 400 (a text-only server); ``cached`` prompt tokens are reported as cached."""

    def __init__(self, tok, fail_first=0, reject_ids=False, cached=5, delay=0.0, token_ids=True):
        self.tok, self.fail_first, self.reject_ids, self.cached, self.delay = tok, fail_first, reject_ids, cached, delay
        self.token_ids = token_ids  # False: a server that takes token-id prompts but returns text only
        self.requests, self.headers, self.in_flight, self.max_in_flight = [], [], 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    fail = stub.fail_first > 0
                    stub.fail_first -= fail
                try:
                    time.sleep(stub.delay)
                    if fail:
                        return self._send(500, {"error": {"message": "overloaded"}})
                    if stub.reject_ids and isinstance(body["prompt"], list):
                        return self._send(400, {"error": {"message": "prompt must be a string"}})
                    self._send(200, stub.complete(body))
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "10")  # the client's backoff honours it: fast retries
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def complete(self, body):
        tok = self.tok
        ids = tok(REPLIES[(body.get("seed") or 0) % len(REPLIES)], add_special_tokens=False)["input_ids"]
        ids = ids + [tok.eos_token_id]
        finish = "stop"
        for stop in body.get("stop") or []:
            for n in range(1, len(ids) + 1):
                if stop in tok.decode(ids[:n]):
                    ids = ids[:n]
                    break
        if len(ids) > body["max_tokens"]:
            ids, finish = ids[:body["max_tokens"]], "length"
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(tok(prompt, add_special_tokens=False)["input_ids"])
        text = tok.decode([t for t in ids if t != tok.eos_token_id])
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if body.get("return_token_ids") and isinstance(prompt, list) and self.token_ids:
            choice["token_ids"] = ids
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids), "total_tokens": n_prompt + len(ids),
                          "prompt_tokens_details": {"cached_tokens": min(self.cached, n_prompt)}}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY.name_or_path)


@pytest.fixture
def stub(tok):
    server = Stub(tok)
    yield server
    server.close()


def openai_engine(url, **knobs):
    cfg = engine_config(backend="openai", base_url=url, max_new_tokens=64, max_step_tokens=32, **knobs)
    return make_engine(TINY, cfg, seed=3)


PROBLEMS = [{"prompt": [{"role": "user", "content": f"What is 3 + {i}?"}], "answer": "7"} for i in range(4)]


# ---------------------------------------------------------------------- config and factory

@pytest.mark.parametrize("knobs, message", [
    (dict(backend="vllm", batch_size=8), "engine.batch_size belongs to engine.backend=hf, not engine.backend=vllm"),
    (dict(base_url="http://127.0.0.1:8000/v1"), "engine.base_url belongs to engine.backend=openai"),
    (dict(backend="openai", base_url="http://x/v1", max_model_len=512), "engine.max_model_len is now vllm.max_model_len"),
    (dict(backend="vllm", kv_cache_tokens=1000), "engine.kv_cache_tokens belongs to engine.backend=hf, not engine.backend=vllm"),
    (dict(backend="openai"), "needs engine.base_url"),
    (dict(backend="sglang"), "engine.backend must be one of hf|vllm|openai"),
    (dict(backend="openai", base_url="http://x/v1", prompt_format="tokens"), "engine.prompt_format"),
    (dict(backend="openai", base_url="http://x/v1", max_concurrency=0), "engine.max_concurrency"),
])
def test_engine_config_refuses_other_backends_keys(knobs, message):
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace(".", r"\.")):
        engine_config(**knobs)


def test_eval_config_composes_backends():
    from test_configs import eval_config

    cfg = eval_config(["engine.backend=vllm", "vllm.max_model_len=1024", "vllm.kv_cache_gib=2"])
    assert (cfg.engine.backend, cfg.vllm.max_model_len, cfg.vllm.kv_cache_gib) == ("vllm", 1024, 2)
    with pytest.raises(ValueError, match=r"engine\.max_model_len is now vllm\.max_model_len"):
        eval_config(["engine.backend=vllm", "engine.max_model_len=1024"])
    with pytest.raises(ValueError, match=r"vllm\.max_model_len: the vllm block applies with engine\.backend=vllm"):
        eval_config(["vllm.max_model_len=1024"])
    with pytest.raises(ValueError, match=r"vllm\.sync: frugal train's"):
        eval_config(["engine.backend=vllm", "vllm.sync=full"])
    with pytest.raises(ValueError, match="engine.kv_cache_tokens belongs to engine.backend=hf, not engine.backend=vllm"):
        eval_config(["engine.backend=vllm", "engine.kv_cache_tokens=500"])
    with pytest.raises(ValueError, match="engine.shared_prefix_min_tokens belongs to engine.backend=hf"):
        eval_config(["engine.backend=openai", "engine.base_url=http://127.0.0.1:1/v1", "engine.shared_prefix_min_tokens=8"])


def test_make_engine_hf_is_the_engine():
    engine = make_engine(TINY, HFEngineConfig(), torch.device("cpu"), seed=5)
    assert type(engine) is HFEngine and engine.seed == 5


def test_vllm_backend_refuses_tiny_random():
    with pytest.raises(ValueError, match="builtin:tiny-random exists only in memory; vLLM cannot load it"):
        make_engine(TINY, engine_config("vllm"))


# ---------------------------------------------------------------------- openai backend

def test_openai_extends_steps_with_ids_seeds_and_usage(stub, tok):
    engine = openai_engine(stub.url)
    from frugal.evaluator.flops import policy_shape

    assert policy_shape(engine.model).layers == 2  # the shape from the config, no weights
    cands = [Candidate(p, stream=k) for p in range(2) for k in range(3)]
    out = engine.extend(PROBLEMS, cands)  # one step each
    assert len(stub.requests) == 6 and engine.counts.calls == 1
    for c in out:
        assert c.text in {r.split("\n\n")[0] + "\n\n" for r in REPLIES} and not c.finished
        assert c.ids is not None and c.ids.owner is engine  # continued from ids next time
    body = stub.requests[0]
    assert isinstance(body["prompt"], list) and body["stop"] == ["\n\n"] and body["include_stop_str_in_output"]
    assert body["return_token_ids"] and body["stop_token_ids"] == engine.eos_ids and body["model"] == "builtin:tiny-random"
    # what engine.* has no key for is sent at its neutral value (a server would fill it from the model's
    # generation_config.json), and top-k only when it is on
    assert (body["temperature"], body["top_p"], body["min_p"], body["repetition_penalty"], body["presence_penalty"],
            body["frequency_penalty"]) == (0.8, 1.0, 0.0, 1.0, 0.0, 0.0) and "top_k" not in body
    # the prompt is the templated prompt's ids (no re-encoding of anything else)
    assert body["prompt"] == tok(engine.core.prompt_text(PROBLEMS[body_problem(body, engine)]["prompt"]),
                                 add_special_tokens=False)["input_ids"]
    # seeds: one per (prompt, stream); the same candidates reproduce them, other streams differ
    seeds = [r["seed"] for r in stub.requests]
    assert len(set(seeds)) == 6
    engine.extend(PROBLEMS, cands)
    assert sorted(r["seed"] for r in stub.requests[6:]) == sorted(seeds)
    # accounting: usage's cached tokens are not charged; the rest of each prompt is prefill; kept tokens decode
    prompts = [len(r["prompt"]) for r in stub.requests]
    assert engine.counts.cached == 5 * 12
    assert engine.counts.prefill == sum(prompts) - 5 * 12
    assert engine.counts.decode == 2 * sum(c.tokens for c in out)

    # the second step continues from the first step's ids (prompt + sampled ids), finishing at EOS
    more = engine.extend(PROBLEMS, out, stop_at_step=False)
    last = stub.requests[-6:]
    continued = {tuple(c.ids.ids) for c in out}
    for r in last:  # templated prompt + exactly the ids sampled for the first step
        assert tuple(r["prompt"][len(stub.requests[0]["prompt"]) - 1 + 1:]) in continued or \
            any(tuple(r["prompt"][-len(ids):]) == ids for ids in continued)
        assert "stop" not in r  # no step delimiter when running to the end
    assert all(c.finished for c in more)


def body_problem(body, engine):
    for i, p in enumerate(PROBLEMS):
        ids = engine.core.prompt_ids(engine.core.prompt_text(p["prompt"]))
        if body["prompt"] == ids:
            return i
    raise AssertionError("the request's prompt is no problem's templated prompt")


def test_openai_concurrency_limit(tok):
    server = Stub(tok, delay=0.15)
    try:
        engine = openai_engine(server.url, max_concurrency=3)
        engine.extend(PROBLEMS, [Candidate(p, stream=k) for p in range(4) for k in range(2)], stop_at_step=False)
        assert len(server.requests) == 8 and 2 <= server.max_in_flight <= 3
    finally:
        server.close()


def test_openai_retries_then_succeeds(tok):
    server = Stub(tok, fail_first=2)
    try:
        engine = openai_engine(server.url, max_retries=2)
        out = engine.extend(PROBLEMS, [Candidate(0, stream=0)], stop_at_step=False)
        assert len(server.requests) == 3 and out[0].finished and out[0].text
        server.fail_first = 5
        with pytest.raises(Exception, match="500|overloaded"):
            openai_engine(server.url, max_retries=1).extend(PROBLEMS, [Candidate(0, stream=0)])
    finally:
        server.close()


def test_openai_unreachable_names_the_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    engine = openai_engine(url, max_retries=0, timeout_s=5)
    with pytest.raises(ConnectionError, match=f"engine.base_url={url}: the server is unreachable"):
        engine.extend(PROBLEMS, [Candidate(0, stream=0)])


def test_openai_text_only_server_falls_back_to_text(tok, caplog):
    server = Stub(tok, reject_ids=True)
    try:
        engine = openai_engine(server.url)
        with caplog.at_level("WARNING", logger="frugal.eval"):
            out = engine.extend(PROBLEMS, [Candidate(p, stream=0) for p in range(2)])
        assert "refused token ids" in caplog.text and engine.format == "text"
        texts = [r["prompt"] for r in server.requests[1:]]
        assert all(isinstance(t, str) and t.startswith("<|im_start|>") for t in texts)
        assert all("stop" not in r for r in server.requests[1:])  # cut by the engine, not the server
        assert all(c.text.endswith("\n\n") and "\n\n" not in c.text[:-2] for c in out)
        with pytest.raises(RuntimeError, match="prompt_format=text"):
            openai_engine(server.url, prompt_format="ids").extend(PROBLEMS, [Candidate(0, stream=0)])
    finally:
        server.close()


def test_openai_server_without_token_ids_switches_to_text(tok, caplog):
    server = Stub(tok, token_ids=False)
    try:
        engine = openai_engine(server.url)
        with caplog.at_level("WARNING", logger="frugal.eval"):
            first = engine.extend(PROBLEMS, [Candidate(0, stream=0)])
        assert "returns no token ids" in caplog.text and engine.format == "text"
        assert first[0].text.endswith("\n\n") and not first[0].finished  # the kept delimiter is a step end, not EOS
        engine.extend(PROBLEMS, first, stop_at_step=False)
        assert isinstance(server.requests[-1]["prompt"], str) and "stop" not in server.requests[-1]
    finally:
        server.close()


def test_openai_package_missing_names_the_extra(stub, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "frugal-rl\[openai\]"'):
        openai_engine(stub.url)


def test_frugal_eval_openai_never_writes_the_key(stub, tmp_path, monkeypatch):
    from test_configs import compose_recipe

    from frugal.recipes.eval import run

    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("FRUGAL_TEST_KEY", secret)
    raw = compose_recipe("eval", ["model=tiny_random", "search=majority", "search.budgets=[2]", "limit=3",
                                  "plots=false", "progress=false", "engine.backend=openai",
                                  f"engine.base_url={stub.url}", "engine.api_key_env=FRUGAL_TEST_KEY",
                                  "engine.max_new_tokens=24", "problems_per_call=2"])
    summary = run(raw, tmp_path)
    row = summary["rows"][0]
    assert row["problems"] == 3 and row["policy_generated_tokens"] > 0 and row["flops_policy"] > 0
    assert len(stub.requests) == 6
    assert all(h.get("authorization") == f"Bearer {secret}" for h in stub.headers)  # the key was used...
    written = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert written and not [p for p in written if secret in p.read_text(errors="ignore")]  # ...never written
    assert "FRUGAL_TEST_KEY" in (Path(tmp_path) / "config.yaml").read_text()

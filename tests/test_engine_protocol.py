"""The engine protocol (inference/engine.py): a new backend is one module that registers its config and
composes EngineCore; ``engine.backend=<it>`` then composes, refuses other backends' knobs, and every
strategy runs on it unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from frugal.inference.engine import Candidate, Engine, EngineConfig, EngineCore
from frugal.inference.models import ModelConfig, load_tokenizer
from frugal.runtime import registry

TINY = ModelConfig(name_or_path="builtin:tiny-random")
PROBLEMS = [{"prompt": [{"role": "user", "content": f"What is 1 + {i}?"}], "answer": str(1 + i)} for i in range(3)]


def _echo_backend():
    """A toy backend: it 'generates' a fixed reply's tokens (the same for every row), through EngineCore."""

    @registry.register("engine")
    @dataclass
    class EchoEngineConfig(EngineConfig):
        backend: str = "echo"
        reply: str = "1 + 1 = 2\n\nThe answer is \\boxed{2}."

        def build(self, model_cfg, device=None, name="policy", seed=0, vllm=None):
            return EchoEngine(load_tokenizer(model_cfg.name_or_path), self, name=name, seed=seed)

    class EchoEngine:
        model = None

        def __init__(self, tokenizer, cfg, name="policy", seed=0):
            self.tokenizer, self.cfg, self.name, self.seed = tokenizer, cfg, name, seed
            self.core = EngineCore(self, tokenizer, cfg, [tokenizer.eos_token_id])
            self.counts = self.core.counts
            self.rows_seen = []

        @property
        def device(self):
            return torch.device("cpu")

        def extend(self, problems, cands, max_tokens=None, stop_at_step=True, greedy=False):
            return self.core.extend(problems, cands, max_tokens, stop_at_step, greedy, self._run_rows)

        def _run_rows(self, items, max_new, stop_at_step, greedy, streams, limits):
            reply = self.tokenizer(self.cfg.reply, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            self.rows_seen.append([tail for _, tail in items])
            out = []
            for (prompt, tail), limit in zip(items, limits):
                done = len(tail) - 1  # the reply's tokens this row already holds
                out.append((reply[done:done + limit], len(self.core.prompt_ids(prompt)) + done))
            return out

        def score(self, problems, cands, conts, batch_size=None):
            return [([0.0] * len(c), [0.0] * len(c), len(c)) for c in conts]

        def clear_cache(self):
            self.core.clear()

        def close(self):
            pass

    return EchoEngineConfig, EchoEngine


def test_a_new_backend_is_one_registered_module():
    from test_configs import eval_config

    from frugal.evaluator.config import search_config
    from frugal.evaluator.prm_counts import CountingPRM
    from frugal.evaluator.strategies import prepare
    from frugal.inference.backends import make_engine

    class LengthPRM:  # one score per step: longer steps score higher
        last_tokens = 0

        def score_partial(self, prompts, texts):
            return [[min(1.0, len(s) / 20) for s in t.split("\n\n") if s.strip()] for t in texts]

    with registry.scope():
        EchoConfig, EchoEngine = _echo_backend()
        cfg = eval_config(["engine.backend=echo", "engine.reply='2 + 2 = 4'", "engine.max_new_tokens=40"])
        assert type(cfg.engine) is EchoConfig and cfg.engine.reply == "2 + 2 = 4"
        with pytest.raises(ValueError, match="engine.batch_size belongs to engine.backend=hf, not engine.backend=echo"):
            eval_config(["engine.backend=echo", "engine.batch_size=8"])
        with pytest.raises(ValueError, match="engine.reply belongs to engine.backend=echo"):
            eval_config(["engine.reply=x"])
        engine = make_engine(TINY, EchoConfig(max_steps=4), seed=3)
        assert isinstance(engine, Engine) and type(engine) is EchoEngine
        # a step-wise strategy on the new backend: steps cut by the shared core, ids continued, PRM-scored
        prm, search = CountingPRM(LengthPRM()), search_config("beam", beam_width=1)
        run, models = prepare("beam", engine, prm, search)
        results = run(PROBLEMS, 2, engine, prm, search)
        for res in results:
            assert res.chosen.text == EchoConfig.reply
            assert res.chosen.finished and res.chosen.steps() == ["1 + 1 = 2", "The answer is \\boxed{2}."]
        # the second step continued from the ids the first step was written with (not re-encoded text)
        first_tails = {tuple(t) for t in engine.rows_seen[0]}
        assert all(len(t) > 1 for t in engine.rows_seen[1]) and len(first_tails) == 1
        assert models == {"policy": engine, "prm": prm} and engine.counts.decode > 0
    assert "echo" not in registry.names("engine")  # the scope undid the registration
    with pytest.raises(ValueError, match="engine.backend must be one of hf|vllm|openai"):
        eval_config(["engine.backend=echo"])


def test_every_backend_implements_the_protocol():
    from frugal.inference.hf_engine import HFEngine, HFEngineConfig
    from frugal.inference.models import load_model
    from frugal.inference.openai_engine import OpenAIEngine, OpenAIEngineConfig
    from frugal.inference.vllm_engine import VLLMEngine

    model, tok = load_model(TINY, torch.device("cpu"))
    assert isinstance(HFEngine(model, tok, HFEngineConfig()), Engine)
    served = OpenAIEngine(tok, OpenAIEngineConfig(base_url="http://127.0.0.1:9/v1"), eos_ids=[tok.eos_token_id])
    assert isinstance(served, Engine)
    served.close()
    for name in ("extend", "score", "clear_cache", "close"):
        assert callable(getattr(VLLMEngine, name))
    assert set(registry.names("engine")) == {"hf", "vllm", "openai"}
    assert Candidate(0).ids is None

"""Scaling out: a real 2-process ``accelerate launch`` (gloo, CPU) of the train recipe, and the vLLM error path.

Run as a script, this file is the per-rank worker: it trains the tiny model and records what its rank saw
(prompts, selected tokens) and its final LoRA parameters.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, G = 3, 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "conf/accelerate/ddp.yaml"),
           "--num_processes", "2", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), __file__, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_two_processes_keep_identical_lora_parameters(two_rank_run):
    import torch

    out, _ = two_rank_run
    rank0, rank1 = (torch.load(out / f"rank{r}_params.pt") for r in (0, 1))
    init = torch.load(out / "rank0_init.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    assert any(not torch.equal(rank0[n], init[n]) for n in rank0), "training changed nothing"
    # ranks really saw different data, so equal parameters come from the gradient sync
    seen0, seen1 = (json.loads((out / f"rank{r}_seen.json").read_text()) for r in (0, 1))
    assert all(set(a) != set(b) for a, b in zip(seen0["questions"], seen1["questions"]))


def test_effective_batch_is_the_sum_of_the_ranks(two_rank_run):
    from train.runtime import batch_for_step
    from tasks import load_task
    from tests.conftest import TINY, compose_train
    from train.config import to_config

    out, stdout = two_rank_run
    run_dir = out / "run"
    seen = [json.loads((out / f"rank{r}_seen.json").read_text()) for r in (0, 1)]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_rows] == list(range(1, STEPS + 1))
    cfg = to_config(compose_train(TINY + [f"prompts_per_step={PROMPTS}"]))
    data = load_task(cfg.task)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    for i, m in enumerate(train_rows):
        step = m["step"]
        # each rank took half of the step's prompts; together exactly the step's batch
        assert [len(s["questions"][i]) for s in seen] == [PROMPTS // 2, PROMPTS // 2]
        want = sorted(r["question"] for r in batch_for_step(data.train, step, PROMPTS, cfg.seed))
        assert sorted(seen[0]["questions"][i] + seen[1]["questions"][i]) == want
        # what the main process logged covers both ranks
        assert m["batch/completions"] == PROMPTS * G
        assert m["tokens/selected"] == seen[0]["selected"][i] + seen[1]["selected"][i]
        step_samples = [s for s in samples if s["step"] == step]
        assert sorted({s["question"] for s in step_samples}) == sorted(set(want)) and len(step_samples) == PROMPTS * G
    # only the main process writes the run dir and prints the summary
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert stdout.count("DEMO accuracy_before") == 1


def test_vllm_backend_without_vllm_names_the_extra():
    import importlib.util

    from tests.conftest import compose_train
    from train.config import to_config
    from train.rollout import MissingExtraError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(MissingExtraError, match=r'pip install "frugal-rl\[vllm\]"') as err:
        to_config(compose_train(["generation.backend=vllm"]))
    assert isinstance(err.value, ImportError)


def test_vllm_sampler_turns_vllm_outputs_into_a_rollout(monkeypatch):
    """The vLLM backend's glue (GPU-only engine replaced by a stand-in): weights synced before every call,
    G copies of each prompt requested, outputs padded and masked exactly like the HF backend's."""
    import torch
    import trl.generation.vllm_generation as vg

    from train.models import load_tokenizer, tiny_random_model
    from train.rollout import GenerationConfig, VLLMSampler

    tok = load_tokenizer("builtin:tiny-random")
    model = tiny_random_model(len(tok), tok)
    eos = tok.eos_token_id
    calls = []

    class FakeVLLM:
        def __init__(self, model, accelerator, tokenizer, **kwargs):
            calls.append(("init", kwargs["mode"], kwargs["max_completion_length"]))

        def sync_weights(self):
            calls.append(("sync",))

        def generate(self, prompts, images, num_generations):
            calls.append(("generate", len(prompts), num_generations))
            completions = [[11, 12, eos], [13], [14, eos], [15, 16, 17]]
            return [list(p) for p in prompts], completions[:len(prompts)], None, None

    monkeypatch.setattr(vg, "VLLMGeneration", FakeVLLM)
    cfg = GenerationConfig(max_new_tokens=3)
    object.__setattr__(cfg, "backend", "vllm")  # validation would (rightly) refuse: vLLM is not installed
    sampler = VLLMSampler(model, tok, None, cfg)
    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "What is 12 * 7 exactly?"}]]
    rollout = sampler(model, prompts, num_samples=2)
    assert calls == [("init", "colocate", 3), ("sync",), ("generate", 4, 2)]
    lens = [len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            for p in prompts]
    assert rollout.prompt_mask.sum(1).tolist() == [lens[0], lens[0], lens[1], lens[1]]
    assert rollout.prompt_mask[0, 0] == 0 and rollout.prompt_mask[0, -1] == 1  # left padding
    assert rollout.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert rollout.completion_ids[0].tolist() == [11, 12, eos] and rollout.group_size == 2
    assert rollout.texts[3] == tok.decode([15, 16, 17], skip_special_tokens=True)
    assert torch.equal(rollout.input_ids[:, :rollout.prompt_ids.shape[1]], rollout.prompt_ids)


def test_sharded_accelerate_configs_are_refused_with_an_explanation(monkeypatch):
    """FSDP / ZeRO-3 configs stop at startup with a pointer to ddp.yaml (not silently unsharded)."""
    from types import SimpleNamespace

    import accelerate

    from train import distributed

    fake = SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP"))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fake)
    with pytest.raises(NotImplementedError, match="conf/accelerate/ddp.yaml"):
        distributed.setup_accelerator()


def _worker(out: Path) -> None:
    """One rank of the launched run: train, then record parameters and what this rank saw."""
    import torch

    import recipes.train as recipe
    from tests.conftest import TINY, compose_train
    from train import distributed

    captured, seen = {}, {"questions": [], "selected": []}
    apply_lora, shard, select = recipe.apply_lora, distributed.shard, recipe._select

    def capture_model(model, cfg):
        captured["model"] = apply_lora(model, cfg)
        captured["init"] = {n: p.detach().clone() for n, p in captured["model"].named_parameters() if p.requires_grad}
        return captured["model"]

    def record_shard(items, accelerator):
        mine = shard(items, accelerator)
        seen["questions"].append([r["question"] for r in mine])
        return mine

    def record_select(*args, **kwargs):
        selection = select(*args, **kwargs)
        seen["selected"].append(len(selection))
        return selection

    recipe.apply_lora, distributed.shard, recipe._select = capture_model, record_shard, record_select
    cfg = compose_train(TINY + [f"max_steps={STEPS}", f"prompts_per_step={PROMPTS}", f"algo.group_size={G}",
                                "eval_before=false", "device=cpu", f"output_dir={out / 'run'}"])
    summary = recipe.run(cfg)
    from accelerate import PartialState

    rank = PartialState().process_index
    params = {n: p.detach().clone() for n, p in captured["model"].named_parameters() if p.requires_grad}
    torch.save(params, out / f"rank{rank}_params.pt")
    torch.save(captured["init"], out / f"rank{rank}_init.pt")
    (out / f"rank{rank}_seen.json").write_text(json.dumps(seen))
    if rank == 0:
        print(f"DEMO accuracy_before=nan accuracy_after={summary['accuracy_after']:.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))


def test_shards_are_equal_round_robin_slices():
    from types import SimpleNamespace

    from train.distributed import shard

    ranks = [SimpleNamespace(num_processes=2, process_index=r) for r in (0, 1)]
    assert [shard(list("abcd"), a) for a in ranks] == [["a", "c"], ["b", "d"]]
    with pytest.raises(ValueError, match="prompts_per_step=3 must be a multiple of the number of processes"):
        shard(list("abc"), ranks[0])
    assert shard(list("abc"), None) == list("abc")

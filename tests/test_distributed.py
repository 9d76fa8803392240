"""Scaling out: real 2-process ``accelerate launch`` runs (gloo, CPU) of the train recipe with the DDP and the
FSDP configs, and the vLLM error path.

Run as a script, this file is the per-rank worker: it trains the tiny model and records what its rank saw
(prompts, selected tokens), how its base weights are held, and its final LoRA parameters.
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


def _launch(config: str, out: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / f"conf/accelerate/{config}.yaml"),
           "--num_processes", "2", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), __file__, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, _launch("ddp", out)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, _launch("fsdp", out)


def _assert_identical_trained_lora(out):
    """Both ranks saved the same LoRA parameters, and training changed them; returns rank 0's."""
    import torch

    rank0, rank1 = (torch.load(out / f"rank{r}_params.pt") for r in (0, 1))
    init = torch.load(out / "rank0_init.pt")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    assert any(not torch.equal(rank0[n], init[n]) for n in rank0), "training changed nothing"
    return rank0


def test_two_processes_keep_identical_lora_parameters(two_rank_run):
    out, _ = two_rank_run
    _assert_identical_trained_lora(out)
    # ranks really saw different data, so equal parameters come from the gradient sync
    seen0, seen1 = (json.loads((out / f"rank{r}_seen.json").read_text()) for r in (0, 1))
    assert all(set(a) != set(b) for a, b in zip(seen0["questions"], seen1["questions"]))


def test_effective_batch_is_the_sum_of_the_ranks(two_rank_run):
    from frugal.train.schedule import batch_for_step
    from frugal.tasks import load_task
    from conftest import TINY, compose_train
    from frugal.runtime.config import to_config

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

    from conftest import compose_train
    from frugal.runtime.config import to_config
    from frugal.inference.models import MissingExtraError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(MissingExtraError, match=r'pip install "frugal-rl\[vllm\]"') as err:
        to_config(compose_train(["generation.backend=vllm"]))
    assert isinstance(err.value, ImportError)


def test_engine_sampler_turns_engine_outputs_into_a_rollout():
    """The training sampler's glue over an engine that takes adapters (engine replaced by a stand-in): the adapter handed over before every call,
    G samples per prompt requested, outputs padded and masked exactly like the HF backend's, and vLLM's
    per-token log-probs kept as the behaviour policy (0 where masked)."""
    import torch

    from frugal.inference.models import load_tokenizer, tiny_random_model
    from frugal.train.rollout import EngineSampler

    tok = load_tokenizer("builtin:tiny-random")
    model = tiny_random_model(len(tok), tok)
    eos = tok.eos_token_id
    calls = []

    class FakeEngine:
        def update(self, peft_model):
            calls.append(("update",))

        def sample(self, prompt_ids, num_samples, seed):
            calls.append(("sample", len(prompt_ids), num_samples))
            completions = [[11, 12, eos], [13], [14, eos], [15, 16, 17]]
            return [(c, [-0.5 - i for i in range(len(c))]) for c in completions]

    sampler = EngineSampler(FakeEngine(), tok, [eos])
    prompts = [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "What is 12 * 7 exactly?"}]]
    rollout = sampler(model, prompts, num_samples=2)
    assert calls == [("update",), ("sample", 2, 2)]
    lens = [len(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            for p in prompts]
    assert rollout.prompt_mask.sum(1).tolist() == [lens[0], lens[0], lens[1], lens[1]]
    assert rollout.prompt_mask[0, 0] == 0 and rollout.prompt_mask[0, -1] == 1  # left padding
    assert rollout.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert rollout.completion_ids[0].tolist() == [11, 12, eos] and rollout.group_size == 2
    assert rollout.texts[3] == tok.decode([15, 16, 17], skip_special_tokens=True)
    assert torch.equal(rollout.input_ids[:, :rollout.prompt_ids.shape[1]], rollout.prompt_ids)
    assert rollout.behaviour_logprobs.tolist() == [[-0.5, -1.5, -2.5], [-0.5, 0, 0], [-0.5, -1.5, 0],
                                                   [-0.5, -1.5, -2.5]]


def test_fsdp_shards_the_base_and_keeps_identical_lora_parameters(fsdp_run, two_rank_run):
    """FSDP2: each rank holds half of every frozen base weight (gathered by the hooks around
    PolicyLogprobs.forward, and in full only while sampling); the replicated adapter ends identical on both
    ranks, and the run follows the DDP run's trajectory (same seed, so the same samples): the sharded
    forward/backward computes the same loss and gradients as the replicated one."""
    import torch

    out, stdout = fsdp_run
    rank0 = _assert_identical_trained_lora(out)
    held = [json.loads((out / f"rank{r}_base.json").read_text()) for r in (0, 1)]
    assert held[0]["sharded"] == held[0]["frozen"] > 0  # every frozen weight is sharded...
    assert held[0]["local"] + held[1]["local"] == held[0]["full"]  # ...into two disjoint halves
    assert held[0]["local"] < held[0]["full"] and held[0]["lora_sharded"] == 0
    seen0, seen1 = (json.loads((out / f"rank{r}_seen.json").read_text()) for r in (0, 1))
    assert all(set(a) != set(b) for a, b in zip(seen0["questions"], seen1["questions"]))

    ddp_out, _ = two_rank_run
    ddp_params = torch.load(ddp_out / "rank0_params.pt")
    for name in rank0:
        torch.testing.assert_close(rank0[name], ddp_params[name], rtol=1e-4, atol=1e-6)
    losses = [[json.loads(line)["loss"] for line in (d / "run" / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(line)] for d in (out, ddp_out)]
    assert len(losses[0]) == STEPS and losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)
    # the step-2 checkpoint and the final adapter are written from the replicated adapter, as with DDP
    from safetensors.torch import load_file

    for folder in ("checkpoints/step_2/adapter", "final"):
        saved = [load_file(d / "run" / folder / "adapter_model.safetensors") for d in (out, ddp_out)]
        assert saved[0].keys() == saved[1].keys() and len(saved[0]) > 0
        for key in saved[0]:
            torch.testing.assert_close(saved[0][key], saved[1][key], rtol=1e-4, atol=1e-6)
    assert stdout.count("DEMO accuracy_before") == 1


def test_sharded_accelerate_configs_are_refused_with_an_explanation(monkeypatch):
    """A ZeRO-3 config stops at startup with a pointer to fsdp.yaml (not silently unsharded); so do the FSDP
    settings frugal does not implement."""
    from types import SimpleNamespace

    import accelerate

    from frugal.train import distributed

    fake = SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED"),
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fake)
    with pytest.raises(NotImplementedError, match="conf/accelerate/fsdp.yaml"):
        distributed.setup_accelerator()
    # on CPU accelerate reports MULTI_CPU for any config: the launcher's environment still says ZeRO-3
    fake.distributed_type.name = "MULTI_CPU"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(NotImplementedError, match="conf/accelerate/fsdp.yaml"):
        distributed.setup_accelerator()
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    fake.distributed_type.name = "FSDP"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(NotImplementedError, match="fsdp_version: 2"):
        distributed.setup_accelerator()
    # transformers would leave ranks > 0 without weights, expecting a broadcast frugal does not do
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(NotImplementedError, match="fsdp_cpu_ram_efficient_loading: true"):
        distributed.setup_accelerator()


def _worker(out: Path) -> None:
    """One rank of the launched run: train, then record parameters and what this rank saw."""
    import torch

    import frugal.recipes.train as recipe
    from conftest import TINY, compose_train
    from frugal.train import distributed

    captured, seen = {}, {"questions": [], "selected": []}
    apply_lora, shard, select = recipe.apply_lora, distributed.shard, recipe.select_tokens

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

    recipe.apply_lora, distributed.shard, recipe.select_tokens = capture_model, record_shard, record_select
    # Evaluations, a checkpoint, a KL term and two passes per batch: every place the recipe uses the weights.
    cfg = compose_train(TINY + [f"max_steps={STEPS}", f"prompts_per_step={PROMPTS}", f"algo.group_size={G}",
                                "eval_before=true", "eval_every=2", "save_every=2", "algo.beta=0.04",
                                "algo.num_iterations=2", "device=cpu", f"output_dir={out / 'run'}"])
    summary = recipe.run(cfg)
    from accelerate import PartialState

    rank = PartialState().process_index
    params = {n: p.detach().clone() for n, p in captured["model"].named_parameters() if p.requires_grad}
    from torch.distributed.tensor import DTensor

    held = {"frozen": 0, "sharded": 0, "local": 0, "full": 0, "lora_sharded": 0}
    for p in captured["model"].parameters():
        is_shard = isinstance(p, DTensor)
        held["lora_sharded"] += int(is_shard and p.requires_grad)
        if not p.requires_grad:
            held["frozen"] += 1
            held["sharded"] += int(is_shard)
            held["local"] += p.to_local().numel() if is_shard else p.numel()
            held["full"] += p.numel()
    (out / f"rank{rank}_base.json").write_text(json.dumps(held))
    torch.save(params, out / f"rank{rank}_params.pt")
    torch.save(captured["init"], out / f"rank{rank}_init.pt")
    (out / f"rank{rank}_seen.json").write_text(json.dumps(seen))
    if rank == 0:
        print(f"DEMO accuracy_before=nan accuracy_after={summary['accuracy_after']:.4f}")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_shards_are_equal_round_robin_slices():
    from types import SimpleNamespace

    from frugal.train.distributed import shard

    ranks = [SimpleNamespace(num_processes=2, process_index=r) for r in (0, 1)]
    assert [shard(list("abcd"), a) for a in ranks] == [["a", "c"], ["b", "d"]]
    with pytest.raises(ValueError, match="prompts_per_step=3 must be a multiple of the number of processes"):
        shard(list("abc"), ranks[0])
    assert shard(list("abc"), None) == list("abc")


def test_one_process_uses_the_model_itself_and_unshared_prompts_give_the_same_logprobs():
    """Without distribution the loss runs on the model itself (no wrapper, no gathering); the sharded path's
    unshared prompts (``share_prompts=False``) give the same log-probs and gradients as the shared KV cache."""
    import torch

    from frugal.train import distributed
    from frugal.train.lora import LoraConfig, apply_lora
    from frugal.inference.models import load_tokenizer, tiny_random_model
    from frugal.train.policy_loss import selected_logprobs
    from frugal.train.token_selection import Selection

    tok = load_tokenizer("builtin:tiny-random")
    model = apply_lora(tiny_random_model(len(tok), tok), LoraConfig(r=4))
    assert distributed.shard_policy(model, None) is model
    with distributed.full_parameters(model):
        pass
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (4, 12), generator=g)
    ids[1, :6], ids[3, :6] = ids[0, :6], ids[2, :6]  # two groups of two rows sharing a 6-token prompt
    mask = torch.ones_like(ids)
    mask[2:, :2] = 0  # the second group is left-padded
    sel = Selection(torch.tensor([0, 1, 2, 3, 3]), torch.tensor([1, 2, 3, 4, 5]), torch.ones(5))
    results = []
    for share in (True, False):
        model.zero_grad()
        logp = selected_logprobs(model, ids, mask, 6, sel, share_prompts=share)
        logp.sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (shared, g_shared), (unshared, g_unshared) = results
    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_shared, g_unshared):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

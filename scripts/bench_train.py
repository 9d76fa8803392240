"""Benchmark: Frugal S-GRPO and GRPO against TRL's ``GRPOTrainer`` (seconds per step and peak memory).

    python scripts/bench_train.py                       # default: ~5-10 minutes on 2 CPU cores
    python scripts/bench_train.py --steps 20 --prompts 8 --max-new-tokens 64 --threads 2
    python scripts/bench_train.py --model builtin:tiny-random --steps 2   # smoke run (seconds)

**What the default measures.** Three trainers, each in its own subprocess (so peak RSS belongs to one
trainer), on the embedded SmolLM2-135M-Instruct, CPU, float32, no vLLM, the demo task (single-digit
addition, ``answer_format=number``, reward = Frugal's ``frugal.rewards.functions.correctness``), 6 optimizer
steps of 4 prompts x 8 samples with at most 32 new tokens, LoRA r=16 / alpha=32 on all linear layers,
lr 2e-4, temperature 1.0, seed 0, 1 torch thread each:

1. Frugal S-GRPO  (``frugal.recipes.train.run``, ``algo=sgrpo``: first 8 tokens + 30% of the rest in the loss)
2. Frugal GRPO    (``frugal.recipes.train.run``, ``algo=grpo``: every completion token in the loss)
3. TRL GRPOTrainer (trl 1.x, peft ``LoraConfig``, same reward through TRL's reward-function interface)

Seconds per step = median over steps 2..N (step 1 is warm-up and excluded). Frugal's come from the run's
``metrics.jsonl`` (``time/step_s``: sample + reward + advantage + update; evaluation, logging and
checkpointing are outside it). TRL's come from a ``TrainerCallback`` (``on_step_begin`` ->
``on_step_end``: generation, reward, loss, backward, clip, optimizer step; logging is outside it).
Each trainer also reports the median *CPU* seconds of its process per step (``time.process_time``; for
Frugal between consecutive step logs): with one torch thread that is the trainer's own work, which other
jobs on a shared machine do not inflate the way they inflate wall time. The BENCH line uses wall time.
Peak memory = ``ru_maxrss`` of the trainer's process, which includes its imports and the loaded model;
a fourth subprocess that only loads the model and adds LoRA gives the common baseline.

**How the comparison is kept fair.** Same model object loader (``frugal.inference.models.load_model``), tokenizer
and chat template, same LoRA (rank, alpha, all-linear targets, no dropout), same training rows and reward
columns (``answer``, ``answer_format``), same temperature / top-p / top-k and ``max_new_tokens`` (TRL:
``max_completion_length``). Same completions per optimizer step: TRL's ``per_device_train_batch_size x
gradient_accumulation_steps = prompts x G`` with ``num_generations = G``, and TRL generates all of them
in one call per step (``steps_per_generation = gradient_accumulation_steps``), as Frugal does; the same
micro-batch for the backward pass (``--micro-batch``, default the whole step) for both. No KL
(``beta=0``: neither builds a reference pass), one optimisation pass per batch (``num_iterations=1``),
group-std-scaled advantages, token-mean loss over the step (TRL ``loss_type="dapo"``), AdamW with the same
betas and weight decay, cosine schedule without warm-up, grad-norm clip 1.0, no gradient checkpointing
(Frugal's default; TRL's default turns it on, ``--trl-gradient-checkpointing`` to compare), no
evaluation inside the timed steps (Frugal: ``eval_before=false``; TRL: ``eval_strategy="no"``), no
checkpoints, no W&B (``report_to="none"``, ``logger=none``). The prompts drawn each step differ (each
trainer uses its own seeded sampler) and completions are sampled, so completion lengths are reported next
to the times. Timings on a shared machine are noisy; the load average is printed with each result.

Targets (issue 2): S-GRPO <= 0.5x TRL's step time and <= 0.7x TRL's peak memory. The script reports what
it measures, ratios against TRL from the same run, and ends with exactly one line::

    BENCH train sgrpo_vs_trl_time=<r> sgrpo_vs_trl_mem=<r>
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from frugal.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("sgrpo", "grpo", "trl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct", help="HF id, local path or builtin:*")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per trainer (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per forward/backward (default: prompts x group, one pass per step)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per trainer")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma list of sgrpo,grpo,trl")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL with its default gradient checkpointing (slower, less activation memory)")
    p.add_argument("--no-baseline", action="store_true", help="skip the model-only baseline process")
    p.add_argument("--workdir", default=None, help="run dirs and logs (default outputs/bench_train/<time>)")
    p.add_argument("--json", default=None, help="write the summary here")
    # Internal: run one trainer in this process and write its result to --worker-out.
    p.add_argument("--worker", choices=(*TRAINERS, "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.micro_batch = args.micro_batch or args.prompts * args.group
    if (args.prompts * args.group) % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide prompts x group = {args.prompts * args.group}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up and not timed)")
    unknown = set(args.trainers.split(",")) - set(TRAINERS)
    if unknown:
        p.error(f"--trainers: unknown {sorted(unknown)}; choose from {','.join(TRAINERS)}")
    return args


# ---------------------------------------------------------------------- the shared configuration

def frugal_overrides(args, algo: str, run_dir: Path) -> list[str]:
    """Hydra overrides for ``conf/train.yaml``: the demo task and the benchmark's shared settings."""
    return [
        "recipe=demo", f"algo={algo}", "logger=none",
        f"model.name_or_path={args.model}", "model.dtype=float32", "device=cpu", f"num_threads={args.threads}",
        f"seed={args.seed}", f"max_steps={args.steps}", "max_minutes=null",
        f"prompts_per_step={args.prompts}", f"algo.group_size={args.group}",
        "algo.beta=0.0", "algo.num_iterations=1",
        f"generation.max_new_tokens={args.max_new_tokens}", f"generation.temperature={args.temperature}",
        "generation.top_p=1.0", "generation.top_k=0",
        f"generation.batch_size={args.prompts * args.group}",  # one generate call per step, like TRL
        f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.schedule=cosine", "optim.max_grad_norm=1.0",
        f"optim.micro_batch_size={args.micro_batch}",
        f"lora.r={args.rank}", f"lora.alpha={args.alpha}", "lora.dropout=0.0", "lora.target_modules=[all-linear]",
        "eval_before=false", "eval_every=0", "eval_limit=4", "save_every=0", "samples_every=0",
        f"output_dir={run_dir}",
    ]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    import frugal.recipes.train  # noqa: F401  (registers the structured config schema)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def median_after_warmup(values: list[float]) -> float:
    """Median of all but the first value (the first step pays one-off costs: allocator, kernels, caches)."""
    rest = values[1:]
    if not rest:
        raise ValueError("need at least two steps to time (the first is warm-up)")
    return statistics.median(rest)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------- workers (one per subprocess)

def worker_frugal(args, algo: str, workdir: Path) -> dict:
    from frugal.recipes.train import run
    from frugal.train import tracking

    # CPU seconds of this process between consecutive step logs: on a shared machine wall time also counts
    # other jobs' load, CPU time (with one torch thread) counts only this trainer's work.
    cpu_at_step, log = {}, tracking.Tracker.log

    def log_with_cpu_time(self, metrics, step, *a, **kw):
        if "time/step_s" in metrics:
            cpu_at_step[step] = time.process_time()
        return log(self, metrics, step, *a, **kw)

    tracking.Tracker.log = log_with_cpu_time
    run_dir = workdir / algo
    raw = compose(frugal_overrides(args, algo, run_dir))
    run(raw, run_dir=run_dir)
    rows = [r for r in tracking.read_jsonl(run_dir / "metrics.jsonl") if "time/step_s" in r]
    steps = sorted(cpu_at_step)
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "cpu_s": [float("nan")] + [cpu_at_step[b] - cpu_at_step[a] for a, b in zip(steps, steps[1:])],
        "generate_s": [r["time/generate_s"] for r in rows],
        "completion_tokens_mean": statistics.mean(r["tokens/completion_mean"] for r in rows),
        "selected_frac_mean": statistics.mean(r["tokens/selected_frac"] for r in rows),
        "reward_mean": statistics.mean(r["reward/mean"] for r in rows),
    }


def worker_trl(args, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from frugal.rewards.functions import correctness
    from frugal.tasks import load_task
    from frugal.runtime.config import to_config
    from frugal.inference.models import load_model

    # The Frugal config of the S-GRPO run is the single source of the shared settings.
    cfg = to_config(compose(frugal_overrides(args, "sgrpo", workdir / "unused")))
    torch.set_num_threads(args.threads)
    data = load_task(cfg.task)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"], "answer_format": r["answer_format"]}
                                 for r in data.train])
    model, tokenizer = load_model(cfg.model, torch.device("cpu"))
    per_step = args.prompts * args.group
    trl_args = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=args.steps, seed=args.seed, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=per_step // args.micro_batch,
        num_generations=args.group, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, max_grad_norm=1.0, optim="adamw_torch",
        gradient_checkpointing=args.trl_gradient_checkpointing,
        report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.cpu_s, self.logs, self._t0, self._cpu0 = [], [], [], None, None

        def on_step_begin(self, a, state, control, **kw):
            self._t0, self._cpu0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            self.step_s.append(time.perf_counter() - self._t0)
            self.cpu_s.append(time.process_time() - self._cpu0)

        def on_log(self, a, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[correctness], args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[timer])
    # Time generation separately (profiling only: wraps the method, changes nothing it does).
    generate_s, inner = [], trainer._generate_single_turn

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        generate_s.append(time.perf_counter() - t0)
        return out

    trainer._generate_single_turn = timed_generate
    trainer.train()
    step_logs = [log for log in timer.logs if "completions/mean_length" in log]
    return {
        "step_s": timer.step_s,
        "cpu_s": timer.cpu_s,
        "generate_s": generate_s,
        "completion_tokens_mean": statistics.mean(log["completions/mean_length"] for log in step_logs),
        "selected_frac_mean": 1.0,
        "reward_mean": statistics.mean(log["reward"] for log in step_logs),
    }


def worker_baseline(args) -> dict:
    """Process floor: imports, the model and a LoRA adapter, no training."""
    import torch

    from frugal.runtime.config import to_config
    from frugal.train.lora import apply_lora
    from frugal.inference.models import load_model

    cfg = to_config(compose(frugal_overrides(args, "sgrpo", Path("unused"))))
    torch.set_num_threads(args.threads)
    model, _ = load_model(cfg.model, torch.device("cpu"))
    apply_lora(model, cfg.lora)
    return {}


def run_worker(args) -> None:
    workdir = Path(args.workdir)
    t0 = time.time()
    if args.worker == "trl":
        result = worker_trl(args, workdir)
    elif args.worker == "baseline":
        result = worker_baseline(args)
    else:
        result = worker_frugal(args, args.worker, workdir)
    result.update(peak_rss_mb=peak_rss_mb(), wall_s=time.time() - t0)
    tmp = Path(args.worker_out + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.worker_out)  # atomic: the parent sees the whole result or none


# ---------------------------------------------------------------------- the parent: launch, collect, report

def launch(name: str, argv: list[str], workdir: Path, threads: int) -> dict:
    out, log_path = workdir / f"{name}.json", workdir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--workdir", str(workdir),
           "--worker", name, "--worker-out", str(out)]
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"trainer {name!r} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    result = json.loads(out.read_text())
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if "step_s" in result:
        result["median_step_s"] = median_after_warmup(result["step_s"])
        result["median_cpu_s"] = median_after_warmup(result["cpu_s"])
        result["median_generate_s"] = median_after_warmup(result["generate_s"])
        result["median_update_s"] = median_after_warmup([s - g for s, g in zip(result["step_s"], result["generate_s"])])
    return result


def worker_argv(args) -> list[str]:
    argv = ["--model", args.model, "--steps", str(args.steps), "--prompts", str(args.prompts),
            "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
            "--micro-batch", str(args.micro_batch), "--lr", repr(args.lr), "--rank", str(args.rank),
            "--alpha", str(args.alpha), "--temperature", repr(args.temperature), "--seed", str(args.seed),
            "--threads", str(args.threads)]
    return argv + (["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else [])


def ratio(results: dict, a: str, b: str, key: str) -> float:
    if a not in results or b not in results:
        return float("nan")
    return results[a][key] / results[b][key]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    workdir = Path(args.workdir or ROOT / "outputs" / "bench_train" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    trainers = [t for t in TRAINERS if t in args.trainers.split(",")]
    print(f"bench_train: model={args.model} steps={args.steps} prompts={args.prompts} G={args.group} "
          f"max_new_tokens={args.max_new_tokens} micro_batch={args.micro_batch} lr={args.lr} "
          f"lora=r{args.rank}/a{args.alpha} threads={args.threads} seed={args.seed} workdir={workdir}", flush=True)

    results, base = {}, float("nan")
    if not args.no_baseline:
        results["baseline"] = launch("baseline", worker_argv(args), workdir, args.threads)
        base = results["baseline"]["peak_rss_mb"]
        print(f"  baseline (imports + model + LoRA, no training): peak RSS {base:.0f} MB", flush=True)
    for name in trainers:
        r = results[name] = launch(name, worker_argv(args), workdir, args.threads)
        print(f"  {name:6s} median {r['median_step_s']:.2f} s/step (generate {r['median_generate_s']:.2f} s, "
              f"update+reward {r['median_update_s']:.2f} s; CPU {r['median_cpu_s']:.2f} s) | peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_mb'] - base:.0f} over baseline) | completion {r['completion_tokens_mean']:.1f} tok, "
              f"loss on {100 * r['selected_frac_mean']:.0f}% | load {r['load_avg_1m']}", flush=True)

    ratios = {
        f"{a}_vs_trl_{what}": ratio(results, a, "trl", key)
        for a in ("sgrpo", "grpo")
        for what, key in (("time", "median_step_s"), ("cpu", "median_cpu_s"), ("mem", "peak_rss_mb"))
    }
    for a in ("sgrpo", "grpo"):
        if a in results and "trl" in results:
            print(f"  {a}/trl: time {ratios[f'{a}_vs_trl_time']:.3f}x (CPU time {ratios[f'{a}_vs_trl_cpu']:.3f}x), "
                  f"peak memory {ratios[f'{a}_vs_trl_mem']:.3f}x")
    if "sgrpo" in results and "trl" in results:
        met = {"time (<=0.5x)": ratios["sgrpo_vs_trl_time"] <= 0.5, "memory (<=0.7x)": ratios["sgrpo_vs_trl_mem"] <= 0.7}
        print("  targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))

    if args.json:
        import torch
        import transformers
        import trl

        summary = {
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "json")},
            "workdir": str(workdir), "results": results, "ratios": ratios,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "cpu_count": os.cpu_count(),
        }
        from frugal.runtime.io import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(summary, indent=2))
    print(f"BENCH train sgrpo_vs_trl_time={ratios['sgrpo_vs_trl_time']:.3f} "
          f"sgrpo_vs_trl_mem={ratios['sgrpo_vs_trl_mem']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

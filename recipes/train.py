"""``frugal train``: critic-free RL (S-GRPO, T-SPMO, GRPO) of a LoRA adapter on a verifiable task.

Reads top to bottom: setup → (resume) → evaluate → loop {sample, reward, advantage, select, update,
log, checkpoint} → evaluate → save. Components are chosen by config (``conf/train.yaml``).

    frugal train                                  # S-GRPO, embedded SmolLM2, arithmetic
    frugal train algo=grpo task=svamp model=qwen2_1_5b
    frugal train recipe=tspmo_multiply            # T-SPMO on multiplication, sized for 2 CPU cores
    frugal train recipe=demo                      # what `make demo` runs
    python -m frugal.recipes.train --cfg job             # print the composed config
    accelerate launch --config_file conf/accelerate/ddp.yaml -m frugal.recipes.train ...   # data parallel
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from frugal.conf import CONF_DIR
from frugal.rewards.combine import Rewards, build_reward_model
from frugal.rewards.verify import validate_gold_answers
from frugal.tasks import check_prompt_lengths, load_task, require_train
from frugal.runtime.io import atomic_dir, atomic_write_text
from frugal.train.checkpoint import load_checkpoint, save_checkpoint
from frugal.train.config import TrainConfig, register_configs
from frugal.runtime.secrets import scrub_secrets
from frugal.runtime.config import to_config
from frugal.train import distributed as dist
from frugal.train.evaluation import greedy_accuracy
from frugal.train.lora import apply_lora
from frugal.inference.models import load_model
from frugal.train.rollout import generate
from frugal.runtime.run_dir import Interrupted, interrupted, on_signals, release_lock, resolve_run_dir, stop_signal
from frugal.train.schedule import batch_for_step, make_scheduler
from frugal.runtime.system import device_from, seed_everything, set_cpu_threads
from frugal.train.tracking import Tracker
from frugal.train.update import select_tokens, update_policy

log = logging.getLogger("frugal.train")
register_configs()


@on_signals  # SIGINT / SIGTERM: finish the step, save it, raise Interrupted (runtime/run_dir.py)
def run(raw_cfg: DictConfig, run_dir: Path | None = None) -> dict:
    # ------------------------------------------------------------------ setup
    cfg: TrainConfig = to_config(raw_cfg, TrainConfig)  # validates every key and range before anything heavy
    # One process: a no-op. Under `accelerate launch`: ranks shard the prompts and sum LoRA gradients
    # (train/distributed.py); only the main process evaluates, logs and writes the run dir.
    accelerator = dist.setup_accelerator(cfg.prompts_per_step)
    main = accelerator.is_main_process
    run_dir, resume_from = dist.broadcast(resolve_run_dir(cfg, run_dir, recipe="train") if main else None, accelerator)
    device = device_from(cfg.device) if accelerator.num_processes == 1 else accelerator.device
    set_cpu_threads(cfg.num_threads, device)
    seed_everything(cfg.seed)
    started = time.time()

    data = load_task(cfg.task)
    validate_gold_answers(data.train + data.test, source=f"task={cfg.task.name}")
    require_train(data, cfg.task, "frugal train")
    reward_model = build_reward_model(cfg.reward)
    answer_format = cfg.task.prompt.answer_format

    model, tokenizer = load_model(*dist.load_args(cfg.model, device, accelerator))
    # A prompt longer than the model can read is a bad row (found now, not as a giant attention mask later).
    check_prompt_lengths(data, tokenizer, _prompt_token_limit(model, cfg), cfg.task)
    require_train(data, cfg.task, "frugal train")
    model = apply_lora(model, cfg.lora)
    # The module the loss runs: `model` itself, or under FSDP a wrapper whose forward gathers the sharded base.
    policy = dist.shard_policy(model, accelerator, cfg.generation.backend)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast_parameters(trainable, accelerator)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = make_scheduler(optimizer, cfg)

    start_step, best = 0, {}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start_step, best = state["step"], state.get("best", {})
        log.info("Resumed from %s (step %d)", resume_from, start_step)
    config_dict = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    if main:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))
    tracker = Tracker(run_dir, cfg.logger, config_dict, resume_step=start_step if resume_from else None,
                      enabled=main)
    sampler = None
    if cfg.generation.backend == "vllm":  # vLLM samples the training completions (the `vllm` block)
        from frugal.train.rollout import vllm_sampler

        sampler = vllm_sampler(model, tokenizer, cfg.generation, cfg.vllm, cfg.model, cfg.lora.r, run_dir, cfg.seed,
                               cfg.num_threads, rank=accelerator.process_index)

    eval_seconds = 0.0  # how long one held-out evaluation takes: max_minutes keeps room for the final one
    if cfg.eval_before and resume_from is None:
        t_eval = time.time()
        with dist.full_parameters(policy):  # entered on every rank (FSDP gathers); the main process evaluates
            if main:
                acc, records = greedy_accuracy(model, tokenizer, data.test, cfg.generation, answer_format,
                                               cfg.eval_limit)
                best["accuracy_before"] = acc
                tracker.log({"eval/accuracy": acc}, step=0)
                _write_jsonl(run_dir / "eval_before.jsonl", records)
                log.info("held-out greedy accuracy before training: %.3f", acc)
        eval_seconds = time.time() - t_eval

    # ------------------------------------------------------------------ loop
    progress = _progress(cfg.max_steps, start_step, disable=not main)
    step, step_time, stopped_early = start_step, 0.0, False
    for step in range(start_step + 1, cfg.max_steps + 1):
        # max_minutes bounds the whole run: stop when another step plus the final evaluation would pass it.
        projected = time.time() - started + eval_seconds + step_time
        # (The main process decides for all ranks: their clocks differ and they must stop at the same step.)
        if cfg.max_minutes and dist.broadcast(projected / 60 > cfg.max_minutes, accelerator):
            log.warning("max_minutes=%s: stopping EARLY after step %d of max_steps=%d, to leave time for the final "
                        "evaluation", cfg.max_minutes, step - 1, cfg.max_steps)
            step, stopped_early = step - 1, True
            break
        t0 = time.time()
        # Per-step seed: a resumed run draws exactly the samples the uninterrupted run would have drawn.
        # (Each rank draws its own stream: rank r adds 7919·r.)
        torch.manual_seed(cfg.seed * 1_000_003 + step + 7919 * accelerator.process_index)
        batch = dist.shard(batch_for_step(data.train, step, cfg.prompts_per_step, cfg.seed), accelerator)
        G = cfg.algo.group_size

        # 1. sample G completions per prompt
        prompts = [r["prompt"] for r in batch]
        with dist.full_parameters(policy):  # FSDP: the whole base gathered while sampling
            rollout = (sampler(model, prompts, G) if sampler else
                       generate(model, tokenizer, prompts, cfg.generation, num_samples=G))
        t_gen = time.time() - t0

        # 2. rewards (TRL convention) and group-relative advantages
        rows, rewards = _score(reward_model, batch, rollout)
        if cfg.algo.replays:
            # T-SPMO replay: continue each group's most decisive prefix, then score the grown groups.
            with dist.full_parameters(policy):
                rollout = cfg.algo.replay(model, tokenizer, rollout, rewards.total, cfg.generation)
            G = rollout.group_size
            rows, rewards = _score(reward_model, batch, rollout)
        # (Each algorithm's config computes them, train/config.py; T-SPMO credits trie transitions
        # instead: it uses only the zero-variance counts of these.)
        adv = cfg.algo.advantages(rewards.total, G)

        # 3. which tokens enter the loss
        selection = select_tokens(cfg, rollout, rewards.total, adv.advantages)

        # 4. policy-gradient update on the selected tokens only
        stats = update_policy(policy, optimizer, scheduler, rollout, selection, cfg, accelerator)
        step_time = time.time() - t0

        # 5. log, evaluate, checkpoint (the numbers cover the whole step, i.e. every rank's shard)
        totals = dist.gather_list(rewards.total, accelerator)
        per_function = {name: dist.gather_list(vals, accelerator) for name, vals in rewards.per_function.items()}
        zero_var, num_groups, num_selected, num_tokens, num_rows = (int(v) for v in dist.sum_over_ranks(
            [adv.zero_variance_groups, adv.num_groups, len(selection), int(rollout.completion_mask.sum()), len(rows)],
            accelerator))
        metrics = {
            "reward/mean": float(np.mean(totals)),
            **{f"reward/{name}": _nanmean(vals) for name, vals in per_function.items()},
            "groups/zero_variance": zero_var,
            "groups/zero_variance_frac": zero_var / num_groups,
            "batch/completions": num_rows,
            "tokens/selected": num_selected,
            "tokens/selected_frac": num_selected / max(num_tokens, 1),
            "tokens/completion_mean": num_tokens / num_rows,
            "time/step_s": step_time, "time/generate_s": t_gen,
            "lr": scheduler.get_last_lr()[0], **stats,
        }
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            with dist.full_parameters(policy):  # entered on every rank (FSDP gathers); the main process evaluates
                if main:
                    metrics["eval/accuracy"], _ = greedy_accuracy(model, tokenizer, data.test, cfg.generation,
                                                                  answer_format, cfg.eval_limit)
        tracker.log(metrics, step=step)
        if cfg.samples_every and step % cfg.samples_every == 0:
            samples = [{"question": r["question"], "answer": r["answer"], "completion": t, "reward": rw}
                       for r, t, rw in zip(rows, rollout.texts, rewards.total)]
            samples = dist.gather_list(samples, accelerator)
            table = bool(cfg.logger.completions_every) and step % cfg.logger.completions_every == 0
            tracker.log_samples(samples, step, table=table)
        progress.update(1, reward=metrics["reward/mean"], acc=metrics.get("reward/correctness"), loss=stats["loss"])
        if cfg.save_every and step % cfg.save_every == 0 and main:
            save_checkpoint(run_dir, step, model, optimizer, scheduler,
                            {"data_position": step * cfg.prompts_per_step, "best": best}, cfg.keep_checkpoints)
        _stop_if_signalled(step, run_dir, model, optimizer, scheduler, best, tracker, cfg, accelerator)
    progress.close()
    if sampler is not None:
        sampler.close()  # vLLM: unload this run's last adapter (a shared server keeps serving others)

    # ------------------------------------------------------------------ evaluate and save (main process)
    with dist.full_parameters(policy):  # entered on every rank (FSDP gathers); the main process evaluates
        if main:
            acc_after, records = greedy_accuracy(model, tokenizer, data.test, cfg.generation, answer_format,
                                                 cfg.eval_limit)
    if not main:
        return dist.broadcast(None, accelerator)  # wait for the main process; return its summary
    _write_jsonl(run_dir / "eval_after.jsonl", records)
    tracker.log({"eval/accuracy": acc_after}, step=step)
    final_dir = run_dir / "final"
    with atomic_dir(final_dir) as tmp:  # whole or absent: a kill mid-save leaves no half final/
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    summary = {
        "steps": step, "max_steps": cfg.max_steps, "stopped_early": stopped_early, "skipped_rows": data.skipped,
        "accuracy_before": best.get("accuracy_before"), "accuracy_after": acc_after,
        "minutes": (time.time() - started) / 60, "adapter": str(final_dir), "run_dir": str(run_dir),
        "algo": cfg.algo.name, "model": cfg.model.name_or_path, "task": cfg.task.name,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    tracker.summary(summary)
    tracker.log_artifact(final_dir, f"adapter-{cfg.algo.name}-{cfg.task.name}", "model", metadata=summary)
    tracker.finish()
    log.info("held-out greedy accuracy after training: %.3f; adapter saved to %s", acc_after, final_dir)
    release_lock(run_dir)
    return dist.broadcast(summary, accelerator)


# ---------------------------------------------------------------------- pieces of the loop

def _prompt_token_limit(model, cfg: TrainConfig) -> int:
    """The longest prompt a row may have: the model's context less the completion's room, and at most
    ``task.max_prompt_tokens`` when set."""
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    limit = context - cfg.generation.max_new_tokens
    return min(limit, cfg.task.max_prompt_tokens) if cfg.task.max_prompt_tokens else limit


def _stop_if_signalled(step, run_dir, model, optimizer, scheduler, best, tracker, cfg, accelerator) -> None:
    """After a finished step: on SIGINT/SIGTERM save a checkpoint of it (unless save_every just did) and
    raise :class:`Interrupted`, which names the checkpoint and how to continue. A signal during the final
    evaluation and save is not acted on: the run finishes them (the newest checkpoint is kept as well)."""
    signum = dist.broadcast(stop_signal(), accelerator)  # the main process decides for every rank
    if signum is None:
        return
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    just_saved = bool(cfg.save_every) and step % cfg.save_every == 0
    if accelerator.is_main_process and not just_saved:
        save_checkpoint(run_dir, step, model, optimizer, scheduler,
                        {"data_position": step * cfg.prompts_per_step, "best": best}, cfg.keep_checkpoints)
    tracker.finish()
    release_lock(run_dir)
    raise interrupted(signum, step, checkpoint, run_dir, "train")


def _score(reward_model, batch: list[dict], rollout) -> tuple[list[dict], Rewards]:
    """Reward every completion: TRL-style chat completions plus the task's columns, one row per sample."""
    rows = [r for r in batch for _ in range(rollout.group_size)]
    completions = [[{"role": "assistant", "content": t}] for t in rollout.texts]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    return rows, reward_model([r["prompt"] for r in rows], completions, columns)


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class _progress:
    """tqdm bar with live reward / accuracy; silent when stderr is not a terminal (CI logs stay short)."""

    def __init__(self, total: int, initial: int, disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", disable=True if disable else None,
                        dynamic_ncols=True)

    def update(self, n: int, **postfix):
        self.bar.set_postfix({k: round(v, 3) for k, v in postfix.items() if v is not None}, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except Interrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # every rank returns the summary; one prints it
        return
    before = summary["accuracy_before"]
    print(f"held-out greedy accuracy: before={before} after={summary['accuracy_after']:.4f}")
    print(f"adapter saved to {summary['adapter']}")
    if summary["stopped_early"]:
        print(f"max_minutes={cfg.max_minutes} stopped training EARLY: {summary['steps']} of {summary['max_steps']} "
              "steps ran (the machine was slower than planned: other jobs on its cores?)")
    print(f"DEMO accuracy_before={'nan' if before is None else f'{before:.4f}'} "
          f"accuracy_after={summary['accuracy_after']:.4f} steps={summary['steps']} minutes={summary['minutes']:.2f} "
          f"adapter={summary['adapter']}")
    if cfg.require_improvement and (before is None or summary["accuracy_after"] <= before):
        print(f"require_improvement: held-out accuracy did not rise ({before} -> {summary['accuracy_after']:.4f}); "
              "exiting with status 1", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    sys.exit(main())

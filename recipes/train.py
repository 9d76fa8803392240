"""``frugal train``: critic-free RL (S-GRPO, GRPO) of a LoRA adapter on a verifiable task.

Reads top to bottom: setup → (resume) → evaluate → loop {sample, reward, advantage, select, update,
log, checkpoint} → evaluate → save. Components are chosen by config (``conf/train.yaml``).

    frugal train                                  # S-GRPO, embedded SmolLM2, arithmetic
    frugal train algo=grpo task=svamp model=qwen2_1_5b
    frugal train recipe=demo                      # what `make demo` runs
    python -m recipes.train --cfg job             # print the composed config
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rewards.combine import build_reward_model
from rewards.verify import validate_gold_answers
from tasks import load_task
from train.advantages import group_advantages
from train.checkpoint import atomic_write_text, find_resume_checkpoint, load_checkpoint, save_checkpoint
from train.config import TrainConfig, register_configs, scrub_secrets, to_config
from train.evaluation import greedy_accuracy
from train.models import apply_lora, load_model
from train.policy_loss import clipped_pg_loss, reference_logprobs, selected_logprobs
from train.rollout import generate
from train.token_selection import Selection, select_all, select_stochastic
from train.tracking import Tracker

log = logging.getLogger("frugal.train")
# An absolute path: Hydra resolves a relative one through importlib.resources when the recipe runs as a
# console script, which fails for the namespace package `conf`.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def run(raw_cfg: DictConfig, run_dir: Path | None = None) -> dict:
    # ------------------------------------------------------------------ setup
    cfg: TrainConfig = to_config(raw_cfg)  # validates every key and range before anything heavy
    run_dir, resume_from = _resolve_run_dir(cfg, run_dir)
    device = _device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _seed_everything(cfg.seed)
    started = time.time()

    data = load_task(cfg.task)
    validate_gold_answers(data.train + data.test, source=f"task={cfg.task.name}")
    if not data.train:
        raise ValueError(f"task={cfg.task.name}: the training split is empty")
    reward_model = build_reward_model(cfg.reward)
    answer_format = cfg.task.prompt.answer_format

    model, tokenizer = load_model(cfg.model, device)
    model = apply_lora(model, cfg.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = _scheduler(optimizer, cfg)

    start_step, best = 0, {}
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
        start_step, best = state["step"], state.get("best", {})
        log.info("Resumed from %s (step %d)", resume_from, start_step)
    config_dict = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))
    tracker = Tracker(run_dir, cfg.logger, config_dict, resume_step=start_step if resume_from else None)

    if cfg.eval_before and resume_from is None:
        acc, records = greedy_accuracy(model, tokenizer, data.test, cfg.generation, answer_format, cfg.eval_limit)
        best["accuracy_before"] = acc
        tracker.log({"eval/accuracy": acc}, step=0)
        _write_jsonl(run_dir / "eval_before.jsonl", records)
        log.info("held-out greedy accuracy before training: %.3f", acc)

    # ------------------------------------------------------------------ loop
    progress = _progress(cfg.max_steps, start_step)
    step = start_step
    for step in range(start_step + 1, cfg.max_steps + 1):
        if cfg.max_minutes and (time.time() - started) / 60 > cfg.max_minutes:
            log.info("max_minutes=%s reached after step %d; stopping the loop", cfg.max_minutes, step - 1)
            step -= 1
            break
        t0 = time.time()
        # Per-step seed: a resumed run draws exactly the samples the uninterrupted run would have drawn.
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        batch = _batch_for_step(data.train, step, cfg.prompts_per_step, cfg.seed)
        G = cfg.algo.group_size

        # 1. sample G completions per prompt
        rollout = generate(model, tokenizer, [r["prompt"] for r in batch], cfg.generation, num_samples=G)
        t_gen = time.time() - t0

        # 2. rewards (TRL convention) and group-relative advantages
        rows = [r for r in batch for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] for t in rollout.texts]
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        rewards = reward_model([r["prompt"] for r in rows], completions, columns)
        adv = group_advantages(torch.tensor(rewards.total), G, cfg.algo.adv_eps, cfg.algo.scale_by_std)

        # 3. which tokens enter the loss
        selection = _select(cfg, rollout.completion_mask, adv.advantages)

        # 4. policy-gradient update on the selected tokens only
        stats = _update(model, optimizer, scheduler, rollout, selection, cfg)
        step_time = time.time() - t0

        # 5. log, evaluate, checkpoint
        num_tokens = int(rollout.completion_mask.sum())
        metrics = {
            "reward/mean": float(np.mean(rewards.total)),
            **{f"reward/{name}": _nanmean(vals) for name, vals in rewards.per_function.items()},
            "groups/zero_variance": adv.zero_variance_groups,
            "groups/zero_variance_frac": adv.zero_variance_groups / adv.num_groups,
            "tokens/selected": len(selection),
            "tokens/selected_frac": len(selection) / max(num_tokens, 1),
            "tokens/completion_mean": num_tokens / len(rows),
            "time/step_s": step_time, "time/generate_s": t_gen,
            "lr": scheduler.get_last_lr()[0], **stats,
        }
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics["eval/accuracy"], _ = greedy_accuracy(model, tokenizer, data.test, cfg.generation,
                                                          answer_format, cfg.eval_limit)
        tracker.log(metrics, step=step)
        if cfg.samples_every and step % cfg.samples_every == 0:
            samples = [{"question": r["question"], "answer": r["answer"], "completion": t, "reward": rw}
                       for r, t, rw in zip(rows, rollout.texts, rewards.total)]
            table = bool(cfg.logger.completions_every) and step % cfg.logger.completions_every == 0
            tracker.log_samples(samples, step, table=table)
        progress.update(1, reward=metrics["reward/mean"], acc=metrics.get("reward/correctness"), loss=stats["loss"])
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(run_dir, step, model, optimizer, scheduler,
                            {"data_position": step * cfg.prompts_per_step, "best": best}, cfg.keep_checkpoints)
    progress.close()

    # ------------------------------------------------------------------ evaluate and save
    acc_after, records = greedy_accuracy(model, tokenizer, data.test, cfg.generation, answer_format, cfg.eval_limit)
    _write_jsonl(run_dir / "eval_after.jsonl", records)
    tracker.log({"eval/accuracy": acc_after}, step=step)
    final_dir = run_dir / "final"
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    summary = {
        "steps": step, "accuracy_before": best.get("accuracy_before"), "accuracy_after": acc_after,
        "minutes": (time.time() - started) / 60, "adapter": str(final_dir), "run_dir": str(run_dir),
        "algo": cfg.algo.name, "model": cfg.model.name_or_path, "task": cfg.task.name,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    tracker.summary(summary)
    tracker.finish()
    log.info("held-out greedy accuracy after training: %.3f; adapter saved to %s", acc_after, final_dir)
    return summary


# ---------------------------------------------------------------------- pieces of the loop

def _select(cfg: TrainConfig, completion_mask: torch.Tensor, advantages: torch.Tensor) -> Selection:
    if cfg.algo.name == "grpo":
        return select_all(completion_mask, advantages)
    return select_stochastic(completion_mask, advantages, cfg.algo.k_early, cfg.algo.p_keep, cfg.algo.decay)


def _update(model, optimizer, scheduler, rollout, selection: Selection, cfg: TrainConfig) -> dict:
    """``num_iterations`` passes over the batch; each pass accumulates gradients over micro-batches of rows
    and takes one optimizer step. The loss is normalised by the step's total selected tokens, so the
    result does not depend on the micro-batch size."""
    model.train()
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    width = rollout.prompt_ids.shape[1]
    chunks = _row_chunks(selection, cfg.optim.micro_batch_size)
    total = max(len(selection), 1)
    old_logp, ref_logp = {}, {}
    if cfg.algo.num_iterations > 1 or cfg.algo.beta > 0:
        with torch.no_grad():
            for i, sel in enumerate(chunks):
                if cfg.algo.num_iterations > 1:
                    old_logp[i] = selected_logprobs(model, input_ids, attention_mask, width, sel)
                if cfg.algo.beta > 0:
                    ref_logp[i] = reference_logprobs(model, input_ids, attention_mask, width, sel)
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.algo.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, kl_sum, clip_sum = 0.0, 0.0, 0.0
        for i, sel in enumerate(chunks):
            logp = selected_logprobs(model, input_ids, attention_mask, width, sel)
            out = clipped_pg_loss(logp, old_logp.get(i), ref_logp.get(i), sel.advantages.to(logp.device),
                                  cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.beta, normalizer=total)
            out.loss.backward()
            loss_sum += out.loss.item()
            kl_sum += out.kl * len(sel) / total
            clip_sum += out.clip_fraction * len(sel) / total
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        stats = {"loss": loss_sum, "kl": kl_sum, "clip_frac": clip_sum, "grad_norm": float(grad_norm)}
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return stats


def _row_chunks(selection: Selection, rows_per_chunk: int) -> list[Selection]:
    """Split the selected triples into micro-batches of at most ``rows_per_chunk`` distinct rows."""
    rows = torch.unique(selection.rows)
    chunks = []
    for start in range(0, rows.numel(), rows_per_chunk):
        keep = torch.isin(selection.rows, rows[start:start + rows_per_chunk])
        chunks.append(Selection(selection.rows[keep], selection.positions[keep], selection.advantages[keep]))
    return chunks


def _batch_for_step(train_rows: list[dict], step: int, size: int, seed: int) -> list[dict]:
    """The prompts of step ``step`` (1-based): consecutive slices of a per-epoch shuffle. A pure function
    of (seed, step), which is what makes resuming exact."""
    n = len(train_rows)
    out = []
    for pos in range((step - 1) * size, step * size):
        epoch, index = divmod(pos, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(train_rows[order[index]])
    return out


def _scheduler(optimizer, cfg: TrainConfig):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.optim.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=max(cfg.max_steps, 1))


def _resolve_run_dir(cfg: TrainConfig, run_dir: Path | None) -> tuple[Path, Path | None]:
    default = Path(run_dir or cfg.output_dir or _hydra_run_dir() or Path("outputs/train") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    resume_from = None
    if cfg.resume and str(cfg.resume).lower() not in ("false", "none", "null"):
        # `resume=true` searches the recipe's output root (outputs/train/<date>/<time>/...).
        root = default.parent.parent
        resume_from = find_resume_checkpoint(cfg.resume, root)
        if resume_from is None:
            log.warning("resume=%s: no checkpoint found under %s; starting fresh", cfg.resume, root)
        else:
            return resume_from.parent.parent, resume_from  # continue writing into the resumed run
    default.mkdir(parents=True, exist_ok=True)
    return default, resume_from


def _hydra_run_dir() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available; use device=auto or device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _nanmean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class _progress:
    """tqdm bar with live reward / accuracy; silent when stderr is not a terminal (CI logs stay short)."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", disable=None, dynamic_ncols=True)

    def update(self, n: int, **postfix):
        self.bar.set_postfix({k: round(v, 3) for k, v in postfix.items() if v is not None}, refresh=False)
        self.bar.update(n)

    def close(self):
        self.bar.close()


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    before = summary["accuracy_before"]
    print(f"held-out greedy accuracy: before={before} after={summary['accuracy_after']:.4f}")
    print(f"adapter saved to {summary['adapter']}")
    print(f"DEMO accuracy_before={'nan' if before is None else f'{before:.4f}'} "
          f"accuracy_after={summary['accuracy_after']:.4f} minutes={summary['minutes']:.2f} adapter={summary['adapter']}")

if __name__ == "__main__":
    sys.exit(main())

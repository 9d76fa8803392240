"""``frugal train-prm``: train a lightweight process reward model (backbone + LoRA + scoring head).

Reads top to bottom: setup → data (exact labels from generated tasks and/or stepwise JSONL / HF data) →
(resume) → loop {batch, BCE at separator positions, update, eval, log, checkpoint} → eval → save the
PRM folder ``final/``. The loss (``frugal.train.prm.prm_losses``, next to the model) is binary
cross-entropy between the head's logit at the last separator token after each step and that step's label
(soft labels stay soft), averaged over the steps of a batch — the objective of TRL's ``PRMTrainer`` and
Math-Shepherd (Wang et al., 2024) — plus, with ``lm_loss_weight``, a next-token loss on correct steps.

    frugal train-prm                                   # exact labels on arithmetic chains, <= 9.5 min (max_minutes)
    frugal train-prm data.paths=[labels.jsonl] data.generated=false   # Monte-Carlo labels from label-prm
    frugal train-prm prm=newline model=tiny_random max_steps=5
    python -m frugal.recipes.train_prm --cfg job              # print the composed config
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from frugal.conf import CONF_DIR
from frugal.runtime.run_dir import Interrupted, interrupted, on_signals, release_lock, resolve_run_dir, stop_signal
from frugal.train.schedule import batch_for_step, make_scheduler
from frugal.runtime.system import device_from, seed_everything, set_cpu_threads
from frugal.tasks import load_task
from frugal.tasks.config import TaskConfig
from frugal.tasks.rows import in_test_split
from frugal.runtime.io import atomic_write_text
from frugal.train.checkpoint import load_checkpoint, save_checkpoint
from frugal.runtime.config import LoggerConfig, TimedRunConfig, to_config
from frugal.train.config import OptimConfig
from frugal.runtime.secrets import scrub_secrets
from frugal.train.lora import LoraConfig
from frugal.inference.models import ModelConfig
from frugal.train.prm import HEAD_FILE, PRM, PRMConfig, build_prm, lm_targets, prm_losses
from frugal.train.prm_metrics import auroc, first_error_index, step_metrics
from frugal.train.prm_data import equation_drills, generated_examples, load_stepwise
from frugal.train.tracking import Tracker

log = logging.getLogger("frugal.train_prm")


@dataclass
class PRMDataConfig:
    generated: bool = True  # exact labels from `task` and `extra_tasks` (generated tasks only)
    errors_per_row: int = 1  # corrupted copies per reference solution
    operand_error_frac: float = 0.3  # share of injected errors that miscopy an operand (vs a wrong result)
    # The held-out generated set has its own, fixed corruption mix, so that changing the training mix
    # never changes the benchmark it is measured on.
    eval_errors_per_row: int = 1
    eval_operand_error_frac: float = 0.5
    group_by_problem: bool = False  # keep a problem's solutions (reference + corrupted copies) in one batch
    # Single-equation checks ("What is 7 + 8?" / "7 + 8 = 15", right or with a wrong result) added to every
    # optimizer step, built from the generated training rows (train.prm_data.equation_drills).
    drills_per_step: int = 0
    paths: list[str] = field(default_factory=list)  # stepwise JSONL files / HF datasets (TRL format)
    eval_paths: list[str] = field(default_factory=list)  # held-out stepwise data; else a hash split of `paths`
    eval_fraction: float = 0.1
    on_bad_row: str = "error"  # error | skip (counted)
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = 400

    def __post_init__(self):
        if self.errors_per_row < 0:
            raise ValueError(f"data.errors_per_row must be >= 0, got {self.errors_per_row}")
        for key in ("operand_error_frac", "eval_operand_error_frac"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.drills_per_step < 0:
            raise ValueError(f"data.drills_per_step must be >= 0, got {self.drills_per_step}")
        if self.drills_per_step and not self.generated:
            raise ValueError("data.drills_per_step needs data.generated=true (drills come from generated tasks)")
        if self.eval_errors_per_row < 0:
            raise ValueError(f"data.eval_errors_per_row must be >= 0, got {self.eval_errors_per_row}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row must be error|skip, got {self.on_bad_row!r}")
        if not self.generated and not self.paths:
            raise ValueError("data: nothing to train on; set data.generated=true or data.paths=[file.jsonl]")


@dataclass
class TrainPRMConfig(TimedRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    extra_tasks: list[TaskConfig] = field(default_factory=list)  # more generated tasks in the mix
    data: PRMDataConfig = field(default_factory=PRMDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    head_lr: float = 1e-3  # the scoring head starts from zero and learns faster than the adapter
    lm_loss_weight: float = 0.0  # auxiliary next-token loss on the steps labelled correct (Cobbe et al. 2021)
    max_steps: int = 200
    batch_size: int = 16  # solutions per optimizer step
    eval_every: int = 50  # steps between held-out evaluations (0 = only at the end)
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "true"/"latest" = newest checkpoint under the output root, or a path

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps < 0 or self.batch_size < 1:
            raise ValueError("max_steps must be >= 0 and batch_size >= 1")
        if self.lm_loss_weight < 0:
            raise ValueError(f"lm_loss_weight must be >= 0, got {self.lm_loss_weight}")
        if self.head_lr <= 0:
            raise ValueError(f"head_lr must be > 0, got {self.head_lr}")
        if self.eval_every < 0 or self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("eval_every and save_every must be >= 0, keep_checkpoints >= 1")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_prm_schema", node=TrainPRMConfig)
    cs.store(group="prm", name="prm_schema", node=PRMConfig)


register_configs()


@on_signals  # SIGINT / SIGTERM: finish the step, save it, raise Interrupted (runtime/run_dir.py)
def run(raw_cfg: DictConfig, run_dir: Path | None = None) -> dict:
    # ------------------------------------------------------------------ setup
    cfg: TrainPRMConfig = to_config(raw_cfg, TrainPRMConfig)
    train_examples, eval_examples, data_info = load_examples(cfg)  # bad data stops here, before a run dir exists
    run_dir, resume_from = resolve_run_dir(cfg, run_dir, recipe="train_prm")
    device = device_from(cfg.device)
    set_cpu_threads(cfg.num_threads, device)
    seed_everything(cfg.seed)
    started = time.time()
    log.info("PRM data: %d training and %d held-out solutions (%s)", len(train_examples), len(eval_examples), data_info)

    prm = build_prm(cfg.model, cfg.lora, cfg.prm, device)
    encoded = [prm.encode(e["prompt"], e["completions"], cfg.prm.max_length) for e in train_examples]
    labels = [e["labels"][:len(x.positions)] for e, x in zip(train_examples, encoded)]
    keep = [i for i, x in enumerate(encoded) if x.positions]  # a prompt longer than max_length leaves nothing
    data_info["fit"] = fit_report(train_examples, encoded, cfg.prm.max_length)
    if not keep:
        raise ValueError(f"train-prm: no training solution fits prm.max_length={cfg.prm.max_length} tokens "
                         f"({data_info['fit']['dropped']} dropped)")
    rows = [(encoded[i], labels[i], lm_targets(prm.tokenizer, train_examples[i]["prompt"], encoded[i], labels[i]))
            for i in keep]
    train_groups = group_rows([train_examples[i]["prompt"] for i in keep], rows, cfg.data.group_by_problem)
    # Groups per optimizer step, so that a step still sees about `batch_size` solutions.
    groups_per_step = max(1, round(cfg.batch_size * len(train_groups) / len(keep)))
    drills = [(e, lab, lm_targets(prm.tokenizer, d["prompt"], e, lab))
              for d, e, lab in ((d, prm.encode(d["prompt"], d["completions"]), d["labels"]) for d in load_drills(cfg))]
    if prm.evidence is not None and cfg.prm.logprob_vocab == "train":
        # The features' softmax over the training data's own tokens (train/prm.py: V'); saved with the head.
        prm.set_candidate_vocab({i for row in rows + drills for i in row[0].ids})
    adapter = [p for p in prm.model.parameters() if p.requires_grad]
    groups = [{"params": adapter, "lr": cfg.optim.lr}, {"params": list(prm.head.parameters()), "lr": cfg.head_lr}]
    if prm.evidence is not None:
        # Two weights on a scale of nats, from zero: at the head's rate they would barely move in a short run.
        groups.append({"params": list(prm.evidence.parameters()), "lr": 10 * cfg.head_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay, betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = make_scheduler(optimizer, cfg)

    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, prm.model, optimizer, scheduler)
        prm.load_head(resume_from / "adapter" / HEAD_FILE)
        start_step = state["step"]
        log.info("Resumed from %s (step %d)", resume_from, start_step)
    config_dict = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))
    tracker = Tracker(run_dir, cfg.logger, config_dict, resume_step=start_step if resume_from else None)

    # ------------------------------------------------------------------ loop
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train-prm", disable=None, dynamic_ncols=True)
    step, train_time, losses = start_step, 0.0, []
    for step in range(start_step + 1, cfg.max_steps + 1):
        if cfg.max_minutes and (time.time() - started) / 60 > cfg.max_minutes:
            log.info("max_minutes=%s reached after step %d; stopping the loop", cfg.max_minutes, step - 1)
            step -= 1
            break
        t0 = time.time()
        batch = [row for group in batch_for_step(train_groups, step, groups_per_step, cfg.seed) for row in group]
        if drills:  # last: with batch_size a multiple of micro_batch_size, drills share micro-batches only with drills
            batch += batch_for_step(drills, step, cfg.data.drills_per_step, cfg.seed + 1)
        stats = train_step(prm, optimizer, batch, cfg.optim.max_grad_norm, cfg.optim.micro_batch_size,
                           cfg.lm_loss_weight)
        scheduler.step()
        train_time += time.time() - t0
        losses.append(stats["loss"])
        metrics = {**stats, "lr": scheduler.get_last_lr()[0], "time/step_s": time.time() - t0}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics.update({f"eval/{k}": v for k, v in evaluate(prm, eval_examples).items()})
        tracker.log(metrics, step=step)
        bar.set_postfix(loss=round(stats["loss"], 4), refresh=False)
        bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint(run_dir, step, prm, optimizer, scheduler, {"data_position": step * cfg.batch_size},
                            cfg.keep_checkpoints)
        if stop_signal() is not None:  # SIGINT / SIGTERM: keep this step, then stop (runtime/run_dir.py)
            checkpoint = run_dir / "checkpoints" / f"step_{step}"
            if not (cfg.save_every and step % cfg.save_every == 0):  # not just saved above
                save_checkpoint(run_dir, step, prm, optimizer, scheduler, {"data_position": step * cfg.batch_size},
                                cfg.keep_checkpoints)
            tracker.finish()
            release_lock(run_dir)
            raise interrupted(stop_signal(), step, checkpoint, run_dir, "train-prm")
    bar.close()

    # ------------------------------------------------------------------ evaluate and save
    final_eval = evaluate(prm, eval_examples)
    tracker.log({f"eval/{k}": v for k, v in final_eval.items()}, step=step)
    final_dir = prm.save(run_dir / "final")
    summary = {"steps": step, "minutes": (time.time() - started) / 60, "train_minutes": train_time / 60,
               "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None,
               **{f"eval_{k}": v for k, v in final_eval.items()}, "prm": str(final_dir), "run_dir": str(run_dir),
               "model": cfg.model.name_or_path, "data": data_info}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    tracker.summary(summary)
    tracker.finish()
    log.info("held-out step AUROC %.3f, first-error F1 %.3f; PRM saved to %s",
             final_eval["step_auroc"], final_eval["first_error_f1"], final_dir)
    release_lock(run_dir)
    return summary


# ---------------------------------------------------------------------- pieces

def load_examples(cfg: TrainPRMConfig) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out stepwise examples from every configured source. Generated tasks keep their
    fixed train/test split; file data is split by a hash of the prompt unless ``data.eval_paths`` is set."""
    train, held, info = [], [], {}
    if cfg.data.generated:
        for i, task in enumerate([cfg.task, *cfg.extra_tasks]):
            data = load_task(task)
            seed = cfg.seed * 1000 + i
            train += generated_examples(data.train, seed=seed, errors_per_row=cfg.data.errors_per_row,
                                        operand_error_frac=cfg.data.operand_error_frac)
            held += generated_examples(data.test, seed=seed + 500, errors_per_row=cfg.data.eval_errors_per_row,
                                       operand_error_frac=cfg.data.eval_operand_error_frac)
            info[f"generated:{task.name}"] = len(data.train)
    for path in cfg.data.paths:
        examples, skipped = load_stepwise(path, cfg.data.on_bad_row)
        info[path] = {"examples": len(examples), "skipped": skipped}
        if cfg.data.eval_paths:
            train += examples
        else:
            for e in examples:
                (held if in_test_split(e["prompt"], cfg.data.eval_fraction) else train).append(e)
    for path in cfg.data.eval_paths:
        examples, skipped = load_stepwise(path, cfg.data.on_bad_row)
        held += examples
        info[path] = {"examples": len(examples), "skipped": skipped}
    # One shuffle so that sources mix inside every batch; held-out examples keep a fixed order.
    train = [train[i] for i in np.random.default_rng(cfg.seed).permutation(len(train))]
    if cfg.data.max_train_examples is not None:
        train = train[:cfg.data.max_train_examples]
    held = [held[i] for i in np.random.default_rng(12345).permutation(len(held))]
    if cfg.data.max_eval_examples is not None:
        held = held[:cfg.data.max_eval_examples]
    if not train:
        raise ValueError("train-prm: no training examples (check task / data.paths)")
    if not held:
        # Stop before training: a run without a held-out set could report nothing it promises (AUROC, F1).
        sources = ", ".join(cfg.data.eval_paths or cfg.data.paths) or "the generated tasks"
        raise ValueError(f"train-prm: the held-out set is empty (from {sources}; data.eval_fraction="
                         f"{cfg.data.eval_fraction}, data.max_eval_examples={cfg.data.max_eval_examples}): set "
                         "data.eval_paths=[held-out.jsonl], or raise data.eval_fraction / task.n_test")
    return train, held, info


def fit_report(examples: list[dict], encoded: list, max_length: int) -> dict:
    """How many solutions ``prm.max_length`` dropped (the prompt alone is too long: no step left) or
    truncated (later steps cut off, so fewer labels are trained), logged as a warning when any."""
    dropped = sum(1 for x in encoded if not x.positions)
    truncated = sum(1 for e, x in zip(examples, encoded) if x.positions and len(x.positions) < len(e["labels"]))
    labels_cut = sum(len(e["labels"]) - len(x.positions) for e, x in zip(examples, encoded))
    if dropped or truncated:
        log.warning("prm.max_length=%d: %d of %d training solutions dropped (prompt too long) and %d truncated "
                    "(%d step labels cut in all); raise prm.max_length to keep them", max_length, dropped,
                    len(examples), truncated, labels_cut)
    return {"dropped": dropped, "truncated": truncated, "labels_cut": labels_cut, "total": len(examples)}


def load_drills(cfg: TrainPRMConfig) -> list[dict]:
    """Equation drills from the generated tasks' training rows (none unless ``data.drills_per_step``)."""
    if not cfg.data.drills_per_step:
        return []
    rows = [row for task in [cfg.task, *cfg.extra_tasks] for row in load_task(task).train]
    return equation_drills(rows, seed=cfg.seed)


def group_rows(prompts: list[str], rows: list, by_problem: bool) -> list[list]:
    """Training rows as groups: one group per prompt (in order of first appearance) with ``by_problem``,
    else one row per group. A problem's reference solution and its corrupted copies share every token
    before the slip, so seeing them in the same batch is a contrastive signal: the loss can only be
    lowered by looking at the step where they differ."""
    if not by_problem:
        return [[row] for row in rows]
    groups: dict[str, list] = {}
    for prompt, row in zip(prompts, rows):
        groups.setdefault(prompt, []).append(row)
    return list(groups.values())


def train_step(prm: PRM, optimizer, batch: list[tuple], max_grad_norm: float, micro_batch_size: int,
               lm_loss_weight: float = 0.0) -> dict:
    prm.train()
    optimizer.zero_grad(set_to_none=True)
    total_steps = sum(len(row[1]) for row in batch)
    lm_tokens = sum(len(row[2]) for row in batch) if lm_loss_weight else 0
    bce_sum = lm_sum = 0.0
    for start in range(0, len(batch), micro_batch_size):
        bce, lm = prm_losses(prm, batch[start:start + micro_batch_size], total_steps, lm_tokens)
        loss = bce if lm is None else bce + lm_loss_weight * lm
        loss.backward()
        bce_sum += bce.item()
        lm_sum += 0.0 if lm is None else lm.item()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats = {"loss": bce_sum, "grad_norm": float(grad_norm), "steps_in_batch": total_steps}
    if lm_loss_weight:
        stats["lm_loss"] = lm_sum
    return stats


def evaluate(prm: PRM, examples: list[dict]) -> dict:
    """Held-out step accuracy, step AUROC and first-error F1 (see :func:`frugal.train.prm_metrics.step_metrics`)."""
    if not examples:
        return {}
    scores = prm.score([e["prompt"] for e in examples], [e["completions"] for e in examples])
    metrics = step_metrics(scores, [e["labels"] for e in examples])
    # Generated data knows which slip it injected: AUROC of correct solutions' steps against the wrong
    # steps of each kind separately (arithmetic slips are much harder to see than copy slips).
    positives = [s for e, row in zip(examples, scores) if e.get("error_kind", "x") is None for s in row]
    for kind in sorted({e["error_kind"] for e in examples if e.get("error_kind")}):
        negatives = [s for e, row in zip(examples, scores) if e.get("error_kind") == kind
                     for s, y in zip(row, e["labels"]) if y < 0.5]
        metrics[f"step_auroc_{kind}"] = auroc(positives + negatives, [1] * len(positives) + [0] * len(negatives))
    # The first wrong step (the slip itself) against the steps after it (locally consistent, labelled 0
    # because they carry the wrong value forward: the PRM must remember the earlier slip).
    for where, pick in (("first_error", lambda i, first: i == first), ("after_error", lambda i, first: i > first)):
        negatives = [s for e, row in zip(examples, scores) if e.get("error_kind")
                     for i, s in enumerate(row) if pick(i, first_error_index(e["labels"]))]
        if positives and negatives:
            metrics[f"step_auroc_{where}"] = auroc(positives + negatives, [1] * len(positives) + [0] * len(negatives))
    return metrics


@hydra.main(config_path=CONF_DIR, config_name="train_prm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except Interrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    print(f"held-out step AUROC={summary['eval_step_auroc']:.4f} step accuracy={summary['eval_step_accuracy']:.4f} "
          f"first-error F1={summary['eval_first_error_f1']:.4f} train_minutes={summary['train_minutes']:.2f}")
    print(f"PRM saved to {summary['prm']}")


if __name__ == "__main__":
    sys.exit(main())

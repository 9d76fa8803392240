"""``frugal label-prm``: Monte-Carlo step labels (Math-Shepherd, Wang et al. 2024) for PRM training.

For each problem: sample solutions from a policy (the base model, or base + adapter via
``model.adapter``), split each into steps on the PRM separator, and from every step prefix
``s_1 … s_i`` roll out ``k`` completions. A step's label is the share of its rollouts that reach the
gold answer (``label=soft``, Math-Shepherd's SE) or whether any does (``label=hard``, HE). The last step
is labelled by the sampled solution's own final answer. Output: stepwise JSONL (``prompt``,
``completions``, ``labels``) that ``frugal train-prm data.paths=[...]`` reads.

Batched (all prefixes of a batch of problems in one ``frugal.train.rollout.generate`` call) and resumable: rows
are appended per batch, and a rerun skips the problems already in the output file.

    frugal label-prm task=arith max_problems=200 rollouts=8 output=labels.jsonl
    frugal label-prm model.adapter=outputs/train/.../final label=hard
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from frugal.conf import CONF_DIR
from frugal.train.runtime import default_run_dir, device_from, seed_everything
from frugal.rewards.verify import is_correct
from frugal.tasks import load_task
from frugal.tasks.config import TaskConfig
from frugal.train.checkpoint import atomic_write_text
from frugal.train.config import SeededRunConfig, scrub_secrets, to_config
from frugal.train.models import ModelConfig
from frugal.train.prm import PRMConfig, split_steps
from frugal.train.rollout import GenerationConfig

log = logging.getLogger("frugal.label_prm")


@dataclass
class LabelPRMConfig(SeededRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy (model.adapter = base + adapter)
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)  # only prm.separator is used: how steps are split
    split: str = "train"  # which task split to label (train | test)
    max_problems: Optional[int] = 100
    samples_per_problem: int = 2  # solutions sampled per problem
    rollouts: int = 4  # k completions from each step prefix
    label: str = "soft"  # soft (fraction reaching the gold answer) | hard (any reaches it)
    max_steps_per_solution: int = 8  # longer solutions are cut to their first steps (bounds rollout cost)
    problems_per_batch: int = 8  # also the resume granularity
    output: Optional[str] = None  # default: <run dir>/labels.jsonl (the run dir: output_dir, else Hydra's)

    def __post_init__(self):
        super().__post_init__()
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be train|test, got {self.split!r}")
        if self.label not in ("soft", "hard"):
            raise ValueError(f"label must be soft|hard, got {self.label!r}")
        for key in ("samples_per_problem", "rollouts", "max_steps_per_solution", "problems_per_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_problems is not None and self.max_problems < 1:
            raise ValueError(f"max_problems must be >= 1, got {self.max_problems}")


ConfigStore.instance().store(name="label_prm_schema", node=LabelPRMConfig)


class Policy(Protocol):
    """What labelling needs from a policy (the HF one below; tests pass a deterministic fake)."""

    def sample(self, prompts: Sequence[list[dict]], n: int) -> list[list[str]]: ...

    def complete(self, prompts: Sequence[list[dict]], prefixes: Sequence[str], n: int) -> list[list[str]]: ...


class HFPolicy:
    """A causal LM sampled with :func:`frugal.train.rollout.generate`. A step prefix is passed as a final
    assistant message that the chat template continues (``continue_final_message``), so the completion
    picks up exactly where the prefix ends."""

    def __init__(self, model, tokenizer, gen_cfg: GenerationConfig):
        self.model, self.tokenizer, self.gen_cfg = model, tokenizer, gen_cfg

    def sample(self, prompts, n):
        from frugal.train.rollout import generate

        texts = generate(self.model, self.tokenizer, list(prompts), self.gen_cfg, num_samples=n).texts
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def complete(self, prompts, prefixes, n):
        from frugal.train.rollout import generate

        chats = [list(p) + [{"role": "assistant", "content": prefix}] for p, prefix in zip(prompts, prefixes)]
        texts = generate(self.model, _ContinueFinalMessage(self.tokenizer), chats, self.gen_cfg, num_samples=n).texts
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


class _ContinueFinalMessage:
    """Tokenizer view whose chat template continues a trailing assistant message instead of opening a
    new turn; everything else is the wrapped tokenizer."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def apply_chat_template(self, conversations, **kwargs):
        kwargs.update(add_generation_prompt=False, continue_final_message=True)
        return self._tok.apply_chat_template(conversations, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def mc_labels(correct: Sequence[Sequence[bool]], final_correct: bool, how: str) -> list[float]:
    """Step labels from rollout outcomes: ``correct[i]`` are the k rollouts' outcomes from the prefix
    ending at step i (for every step but the last); the last step takes the solution's own outcome."""
    labels = []
    for outcomes in correct:
        frac = sum(outcomes) / len(outcomes) if outcomes else 0.0
        labels.append(frac if how == "soft" else float(frac > 0))
    return labels + [float(final_correct)]


def label_problems(rows: list[dict], policy: Policy, cfg: LabelPRMConfig) -> list[dict]:
    """Stepwise rows for one batch of problems (all solutions' prefixes rolled out in one batch)."""
    sep = cfg.prm.separator
    solutions = policy.sample([r["prompt"] for r in rows], cfg.samples_per_problem)
    items = []  # (row, steps, text)
    for row, texts in zip(rows, solutions):
        for text in texts:
            steps = split_steps(text, sep)[:cfg.max_steps_per_solution]
            if steps:
                items.append((row, steps))
    # Every proper prefix (steps 1..i, i < n) of every solution, with the separator after it.
    prefix_of = [(j, i) for j, (_, steps) in enumerate(items) for i in range(1, len(steps))]
    prompts = [items[j][0]["prompt"] for j, _ in prefix_of]
    prefixes = [sep.join(items[j][1][:i]) + sep for j, i in prefix_of]
    outcomes = policy.complete(prompts, prefixes, cfg.rollouts) if prefix_of else []
    per_item: list[list[list[bool]]] = [[] for _ in items]
    for (j, _), prefix, conts in zip(prefix_of, prefixes, outcomes):
        row = items[j][0]
        per_item[j].append([is_correct(prefix + c, row["answer"], row["answer_format"]) for c in conts])
    out = []
    for (row, steps), rolls in zip(items, per_item):
        final = is_correct(sep.join(steps), row["answer"], row["answer_format"])
        out.append({"id": row["id"], "prompt": row["question"], "completions": steps,
                    "labels": mc_labels(rolls, final, cfg.label), "answer": row["answer"],
                    "solution_correct": final, "rollouts": cfg.rollouts, "label_kind": cfg.label})
    return out


def done_ids(path: Path) -> set[str]:
    """Problem ids already in ``path``; a torn last line (a run killed mid-write) is dropped from the file."""
    if not path.exists():
        return set()
    lines, ids = path.read_text().splitlines(), set()
    good = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ids.add(json.loads(line)["id"])
            good.append(line)
        except (json.JSONDecodeError, KeyError):
            if number != len(lines):
                raise ValueError(f"{path} line {number}: not a label row; cannot resume into this file") from None
            log.warning("%s: dropping a torn last line (an interrupted run)", path)
            atomic_write_text(path, "".join(g + "\n" for g in good))
    return ids


def run(raw_cfg: DictConfig, run_dir: Path | None = None, policy: Optional[Policy] = None) -> dict:
    cfg: LabelPRMConfig = to_config(raw_cfg, LabelPRMConfig)
    run_dir = default_run_dir("label_prm", run_dir, cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    output = Path(cfg.output) if cfg.output else run_dir / "labels.jsonl"
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    config_dict = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))

    data = load_task(cfg.task)
    rows = data.train if cfg.split == "train" else data.test
    rows = rows[:cfg.max_problems] if cfg.max_problems else rows
    done = done_ids(output)
    todo = [r for r in rows if r["id"] not in done]
    log.info("label-prm: %d problems, %d already labelled in %s", len(rows), len(rows) - len(todo), output)
    if policy is None and todo:
        from frugal.train.models import load_model

        model, tok = load_model(cfg.model, device_from(cfg.device))
        policy = HFPolicy(model, tok, cfg.generation)

    from tqdm.auto import tqdm

    started, written, steps = time.time(), 0, 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(rows), initial=len(rows) - len(todo), desc="label-prm", disable=None) as bar:
        for start in range(0, len(todo), cfg.problems_per_batch):
            batch = todo[start:start + cfg.problems_per_batch]
            # Per-batch seed: a resumed run draws what the uninterrupted run would have drawn.
            torch.manual_seed(cfg.seed * 1_000_003 + rows.index(batch[0]))
            labelled = label_problems(batch, policy, cfg)
            with open(output, "a") as f:  # one write per batch; a torn line is repaired on resume
                f.write("".join(json.dumps(r) + "\n" for r in labelled))
            written += len(labelled)
            steps += sum(len(r["labels"]) for r in labelled)
            bar.update(len(batch))
    summary = {"problems": len(rows), "newly_labelled_problems": len(todo), "solutions_written": written,
               "steps_written": steps, "minutes": (time.time() - started) / 60, "output": str(output)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


@hydra.main(config_path=CONF_DIR, config_name="label_prm", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    print(f"labelled {summary['newly_labelled_problems']} new problems ({summary['solutions_written']} solutions, "
          f"{summary['steps_written']} steps) -> {summary['output']}")


if __name__ == "__main__":
    sys.exit(main())

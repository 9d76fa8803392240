"""``frugal label-prm``: Monte-Carlo step labels (Math-Shepherd, Wang et al. 2024) for PRM training.

For each problem: sample solutions from a policy (the base model, or base + adapter via
``model.adapter``), split each into steps on the PRM separator, and from every step prefix
``s_1 … s_i`` (the sampled text up to the separator after step i) roll out ``k`` completions. A step's
label is the share of its rollouts that reach the gold answer (``label=soft``, Math-Shepherd's SE) or
whether any does (``label=hard``, HE). The last step is labelled by the sampled solution's own final
answer. Output: stepwise JSONL (``prompt``, ``completions``, ``labels``) that ``frugal train-prm
data.paths=[...]`` reads.

A prefix is continued from the token ids the policy sampled for it (``Solution.ids``), after the chat
prompt's ids: re-rendering the prefix text through the chat template would not give those ids back (BPE
does not round-trip: SmolLM2 samples "\\n\\n" as one token but encodes "4\\n\\n1" with two "\\n"
tokens), and a policy continued from ids it would not have sampled writes differently.

Batched (all prefixes of a batch of problems in one ``complete`` call, sampled ``generation.batch_size``
rows at a time by ``frugal.inference.decoding.sample``, the sampler of training rollouts) and resumable: rows
are appended per batch, and a rerun skips the problems already in the output file.

    frugal label-prm task=arith max_problems=200 rollouts=8 output=labels.jsonl
    frugal label-prm model.adapter=outputs/train/.../final label=hard
"""

from __future__ import annotations

import bisect
import itertools
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
from frugal.runtime.run_dir import default_run_dir
from frugal.runtime.system import device_from, seed_everything
from frugal.rewards.verify import is_correct
from frugal.tasks import load_task
from frugal.tasks.config import TaskConfig
from frugal.runtime.io import atomic_write_text
from frugal.inference import decoding
from frugal.runtime.config import SeededRunConfig, to_config
from frugal.runtime.secrets import scrub_secrets
from frugal.inference.models import ModelConfig
from frugal.train.prm import PRMConfig
from frugal.rewards.steps import split_steps
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


@dataclass
class Solution:
    """A sampled solution: its text and, from a policy that samples token ids (:class:`HFPolicy`), those
    ids and where each one ends in the text (``ends[j]``: the text's length through token j)."""

    text: str
    ids: Optional[list[int]] = None
    ends: Optional[list[int]] = None

    def prefix(self, end: int) -> "Solution":
        """The first ``end`` characters, with the ids of every token wholly inside them (all of them when
        ``end`` falls between tokens, as it does at a separator the policy sampled as its own token)."""
        if self.ids is None:
            return Solution(self.text[:end])
        k = bisect.bisect_right(self.ends, end)
        return Solution(self.text[:end], self.ids[:k], self.ends[:k])


class Policy(Protocol):
    """What labelling needs from a policy (the HF one below; tests pass a deterministic fake)."""

    def sample(self, prompts: Sequence[list[dict]], n: int) -> list[list[Solution]]: ...

    def complete(self, prompts: Sequence[list[dict]], prefixes: Sequence[Solution], n: int) -> list[list[str]]: ...


class HFPolicy:
    """A causal LM sampled through the decoding core (``frugal.inference.decoding.sample``). A solution keeps
    the token ids it was sampled as; a prefix continues from the chat prompt's ids followed by the prefix's
    ids (and, only where a cut falls inside a token, the rest of its text encoded)."""

    def __init__(self, model, tokenizer, gen_cfg: GenerationConfig):
        self.model, self.tokenizer, self.gen_cfg = model, tokenizer, gen_cfg
        self.eos_ids = decoding.eos_token_ids(model, tokenizer)

    def sample(self, prompts, n):
        rows = self._continue([self._prompt_ids(p) for p in prompts], n)
        return [[self._solution(ids) for ids in rows[i * n:(i + 1) * n]] for i in range(len(prompts))]

    def complete(self, prompts, prefixes, n):
        contexts = [self._prompt_ids(p) + self._prefix_ids(x) for p, x in zip(prompts, prefixes)]
        rows = self._continue(contexts, n)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _prompt_ids(self, prompt: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"])

    def _prefix_ids(self, prefix: Solution) -> list[int]:
        ids = list(prefix.ids or [])
        rest = prefix.text[prefix.ends[-1] if ids else 0:]  # text not covered by sampled ids
        return ids + (self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else [])

    def _continue(self, contexts: list[list[int]], n: int) -> list[list[int]]:
        """``n`` sampled continuations of each context (token ids), ``generation.batch_size`` rows per call;
        each ends at its EOS (included) or stop string."""
        device = next(self.model.parameters()).device
        per_call = max(1, self.gen_cfg.batch_size // n)
        out = []
        for start in range(0, len(contexts), per_call):
            ids, mask = decoding.left_pad(contexts[start:start + per_call], self.tokenizer.pad_token_id, device)
            tokens, lengths = decoding.sample(self.model, self.tokenizer, ids, mask, n, self.gen_cfg,
                                              self.gen_cfg.max_new_tokens)
            out += [row[:k] for row, k in zip(tokens.tolist(), lengths.tolist())]
        return out

    def _solution(self, ids: list[int]) -> Solution:
        body = ids[:-1] if ids and ids[-1] in self.eos_ids else ids
        pieces = [self.tokenizer.decode([t], skip_special_tokens=True) for t in body]
        return Solution("".join(pieces), body, list(itertools.accumulate(len(p) for p in pieces)))


def step_ends(text: str, separator: str) -> list[int]:
    """For each step of ``split_steps(text, separator)``, the index in ``text`` just after the separator
    that closes it (``len(text)`` for a last step without one)."""
    ends, at = [], 0
    for piece in text.split(separator):
        at += len(piece)
        if piece.strip():
            ends.append(min(at + len(separator), len(text)))
        at += len(separator)
    return ends


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
    items = []  # (row, solution, steps, where each step's separator ends in the solution's text)
    for row, sampled in zip(rows, solutions):
        for solution in sampled:
            steps = split_steps(solution.text, sep)[:cfg.max_steps_per_solution]
            if steps:
                items.append((row, solution, steps, step_ends(solution.text, sep)))
    # Every proper prefix (steps 1..i, i < n) of every solution: its sampled text through the separator after step i.
    prefix_of = [(j, i) for j, (_, _, steps, _) in enumerate(items) for i in range(1, len(steps))]
    prompts = [items[j][0]["prompt"] for j, _ in prefix_of]
    prefixes = [items[j][1].prefix(items[j][3][i - 1]) for j, i in prefix_of]
    outcomes = policy.complete(prompts, prefixes, cfg.rollouts) if prefix_of else []
    per_item: list[list[list[bool]]] = [[] for _ in items]
    for (j, _), prefix, conts in zip(prefix_of, prefixes, outcomes):
        row = items[j][0]
        per_item[j].append([is_correct(prefix.text + c, row["answer"], row["answer_format"]) for c in conts])
    out = []
    for (row, _, steps, _), rolls in zip(items, per_item):
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
        from frugal.inference.models import load_model

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

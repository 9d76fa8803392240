"""``frugal plan``: how much test-time sampling is worth it? (TTSPM, see ``evaluator/ttspm.py``)

Reads top to bottom: setup → sample ``pilots`` solutions per problem with the evaluator's engine → grade
with the training verifier → fit the TTSPM (Beta mixture, zero-inflated Beta mixture, pooled MLE, plug-in) → print predicted
coverage F(N) with the saturation budget N* (smallest N whose next sample gains < ``eps``) → write
``plan.json``, ``pilots.jsonl`` and ``plan.png`` to the run dir.

    frugal plan                                         # embedded SmolLM2, arithmetic, 4 pilots, 100 problems
    frugal plan pilots=8 eps=0.005 limit=200 model.adapter=outputs/train/<date>/<time>/final
    frugal plan task=gsm8k model=qwen2_5_0_5b engine.max_new_tokens=384
    python -m frugal.recipes.plan --cfg job                    # print the composed config

F(N) is coverage (an oracle verifier picks a correct sample when there is one, the paper's Hit@N):
an upper bound for best-of-N with a PRM and for majority voting at the same N.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from frugal.conf import CONF_DIR
from frugal.evaluator.config import check_vllm_block
from frugal.inference.vllm_setup import RENAMED as VLLM_RENAMED, VLLMConfig
from frugal.evaluator.ttspm import FORMS, TTSPM, pass_at_n, sample_correctness
from frugal.tasks.config import TaskConfig
from frugal.runtime.io import atomic_write_text
from frugal.runtime.config import SeededRunConfig, fill_variants, store_open_choice, to_config, variant_field
from frugal.inference.models import ModelConfig
from frugal.runtime.run_dir import default_run_dir

log = logging.getLogger("frugal.plan")


@dataclass
class PlanConfig(SeededRunConfig):
    RENAMED: ClassVar[dict[str, str]] = VLLM_RENAMED  # former keys, refused with their new names
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    engine: Any = variant_field("engine", "hf")  # a registered backend's config, by engine.backend
    vllm: VLLMConfig = field(default_factory=lambda: VLLMConfig(max_model_len=2048, gpu_memory_utilization=0.9))
    pilots: int = 4  # k samples per problem
    eps: float = 0.01  # saturation threshold: stop when one more sample gains less than this (accuracy, 0..1)
    form: str = "beta"  # the headline fit: beta | mixture | pooled | plugin (all are written)
    max_n: int = 64  # the curve is printed and plotted for N = 1, 2, 4, ..., max_n
    split: str = "test"  # test | train
    limit: Optional[int] = 100  # first `limit` problems of the split (None = all)
    problems_per_call: int = 32
    plots: bool = True
    interval_draws: int = 200  # parametric-bootstrap draws for the 90% band of the headline forecast (0 = none)

    def __post_init__(self):
        super().__post_init__()
        fill_variants(self)
        check_vllm_block(self.vllm, self.engine.backend)
        if self.pilots < 1:
            raise ValueError(f"pilots must be >= 1, got {self.pilots}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {'|'.join(FORMS)}, got {self.form!r}")
        if self.interval_draws < 0:
            raise ValueError(f"interval_draws must be >= 0, got {self.interval_draws}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.split not in ("test", "train"):
            raise ValueError(f"split must be test|train, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")


ConfigStore.instance().store(name="plan_schema", node=PlanConfig)
store_open_choice("engine", "hf")


def run(raw_cfg: DictConfig, run_dir: Path | None = None) -> dict:
    # ------------------------------------------------------------------ setup
    from frugal.evaluator.harness import prepare

    cfg: PlanConfig = to_config(raw_cfg, PlanConfig)
    run_dir = default_run_dir("plan", run_dir, cfg.output_dir)
    run_dir, _, _, problems, engine = prepare(cfg, run_dir)
    started = time.time()

    # ------------------------------------------------------------------ pilots
    torch.manual_seed(cfg.seed)
    correct = sample_correctness(problems, engine, cfg.pilots, cfg.problems_per_call, progress=True)
    counts = correct.sum(1)

    # ------------------------------------------------------------------ fit and predict
    model_fit = TTSPM.fit(counts, cfg.pilots)
    grid = sorted({2 ** i for i in range(int(np.log2(cfg.max_n)) + 1)} | {cfg.max_n})
    curves = {form: [float(x) for x in model_fit.predict(grid, form)] for form in FORMS}
    n_star = {form: model_fit.saturation(cfg.eps, form) for form in FORMS}
    # 90% band of the headline forecast: how far k pilots over this many problems can leave it off even
    # when the form is right (TTSPM.forecast_error); truth = prediction - error.
    band = None
    if cfg.interval_draws:
        err = model_fit.forecast_error(grid, cfg.form, reps=cfg.interval_draws, seed=cfg.seed)
        head = np.asarray(curves[cfg.form])
        band = {"low": [float(x) for x in np.clip(head - np.percentile(err, 95, axis=0), 0, 1)],
                "high": [float(x) for x in np.clip(head - np.percentile(err, 5, axis=0), 0, 1)]}
    observed = {n: float(np.mean([pass_at_n(cfg.pilots, int(c), n) for c in counts])) for n in range(1, cfg.pilots + 1)}
    plan = {
        "eps": cfg.eps, "form": cfg.form, "pilots": cfg.pilots, "problems": len(problems),
        "fit": model_fit.summary(), "n_star": n_star,
        "predicted_at_n_star": {f: float(model_fit.predict(n_star[f], f)) for f in FORMS},
        "curve": {"n": grid, **curves}, "band90": band, "observed_pass_at_n": observed,
        "policy_tokens": {"prefill": engine.counts.prefill, "generated": engine.counts.decode},
        "minutes": (time.time() - started) / 60, "run_dir": str(run_dir),
    }

    # ------------------------------------------------------------------ write
    atomic_write_text(run_dir / "plan.json", json.dumps(plan, indent=2))
    atomic_write_text(run_dir / "pilots.jsonl", "".join(
        json.dumps({"id": r.get("id"), "question": r.get("question"), "answer": r["answer"],
                    "correct": [bool(x) for x in row]}) + "\n" for r, row in zip(problems, correct)))
    if cfg.plots:
        plot(plan, run_dir / "plan.png")
    return plan


def report(plan: dict) -> str:
    """The printed table: predicted coverage per N for each form, N* marked for the headline form."""
    star = plan["n_star"][plan["form"]]
    lines = [f"TTSPM from {plan['pilots']} pilots x {plan['problems']} problems: pilot accuracy "
             f"{plan['fit']['pilot_accuracy']:.3f}, solved at least once {plan['fit']['f_max_observed']:.3f}, "
             f"Beta(a={plan['fit']['beta']['a']:.3f}, b={plan['fit']['beta']['b']:.3f}), pooled "
             f"F_max={plan['fit']['pooled']['f_max']:.3f} p={plan['fit']['pooled']['p']:.3f}",
             f"{'N':>6} " + " ".join(f"{f:>9}" for f in FORMS) + (f"  {plan['form']} 90% band" if plan.get("band90") else "")]
    marked = next((n for n in plan["curve"]["n"] if n >= star), None)
    for i, n in enumerate(plan["curve"]["n"]):
        band = plan.get("band90")
        band = f"  {100 * band['low'][i]:5.1f}-{100 * band['high'][i]:5.1f}%" if band else ""
        mark = f"  <- first N >= N* = {star}" if n == marked else ""
        lines.append(f"{n:>6} " + " ".join(f"{100 * plan['curve'][f][i]:8.1f}%" for f in FORMS) + band + mark)
    lines.append("N* (eps={:g}): ".format(plan["eps"]) + ", ".join(
        f"{f}={plan['n_star'][f]} ({100 * plan['predicted_at_n_star'][f]:.1f}%)" for f in FORMS))
    return "\n".join(lines)


def plot(plan: dict, path: Path) -> Path:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for form in FORMS:
        style = "-" if form == plan["form"] else "--"
        ax.plot(plan["curve"]["n"], [100 * v for v in plan["curve"][form]], style, marker="o", ms=3, label=f"F(N) {form}")
    if plan.get("band90"):
        ax.fill_between(plan["curve"]["n"], [100 * v for v in plan["band90"]["low"]],
                        [100 * v for v in plan["band90"]["high"]], alpha=0.15, label=f"90% band ({plan['form']})")
    obs = plan["observed_pass_at_n"]
    ax.plot([int(n) for n in obs], [100 * v for v in obs.values()], "k^", label="pilots (pass@n)")
    star = plan["n_star"][plan["form"]]
    ax.axvline(max(star, 1), color="red", alpha=0.6, label=f"N* = {star} (eps={plan['eps']:g}, {plan['form']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per problem N")
    ax.set_ylabel("predicted coverage (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path



@hydra.main(config_path=CONF_DIR, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plan = run(cfg)
    print(report(plan))
    print(f"PLAN n_star={plan['n_star'][plan['form']]} predicted_at_n_star="
          f"{plan['predicted_at_n_star'][plan['form']]:.4f} eps={plan['eps']} results in {plan['run_dir']}")


if __name__ == "__main__":
    sys.exit(main())

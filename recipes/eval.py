"""``frugal eval``: a policy (base + optional adapter) and a PRM plugged into a search strategy, scored
for accuracy *and* the compute it cost (tokens and FLOPs per model). See ``evaluator/``.

    frugal eval search=greedy                                       # no PRM needed
    frugal eval search=majority search.budgets=[1,4,16] limit=50
    frugal eval prm_path=outputs/train_prm/<date>/<time>/final search=particle_filter search.budgets=[4,8,16]
    frugal eval model.adapter=outputs/train/<date>/<time>/final prm_path=… search=early_rejection search.tau=32
    python -m frugal.recipes.eval --cfg job                                # print the composed config
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from frugal.conf import CONF_DIR
from frugal.runtime.run_dir import default_run_dir
from omegaconf import DictConfig

from frugal.evaluator.config import EvalConfig, register_configs
from frugal.evaluator.harness import evaluate
from frugal.runtime.config import to_config

register_configs()


def run(raw_cfg: DictConfig, run_dir: Path | None = None) -> dict:
    cfg: EvalConfig = to_config(raw_cfg, EvalConfig)  # validates every key and range before loading models
    run_dir = default_run_dir("eval", run_dir, cfg.output_dir)
    return evaluate(cfg, run_dir)



@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    summary = run(cfg)
    for r in summary["rows"]:
        print(f"EVAL strategy={r['strategy']} N={r['budget']} accuracy={r['accuracy']:.4f} "
              f"policy_tokens={r['policy_prefill_tokens'] + r['policy_generated_tokens']} "
              f"generated={r['policy_generated_tokens']} prm_tokens={r['prm_tokens']} "
              f"flops={r['flops_total']:.4g} wall_s={r['wall_s']:.1f}")
    print(f"results in {summary['run_dir']}")


if __name__ == "__main__":
    sys.exit(main())

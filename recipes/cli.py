"""``frugal <recipe> [hydra overrides]`` — one command, one Hydra entry point per recipe.

Each recipe is also runnable as ``python -m frugal.recipes.<module>``; this file only dispatches.
"""

from __future__ import annotations

import importlib
import os
import sys

# OpenMP threads that wait for work by spinning (libgomp's default) collapse when other jobs share the
# cores: a spinning thread holds a core that the thread it waits for needs. PASSIVE makes them sleep.
# It must be set before torch initialises OpenMP, i.e. here, before any recipe imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RECIPES = {
    "train": ("frugal.recipes.train", "RL fine-tuning of a LoRA adapter (S-GRPO, T-SPMO, GRPO)"),
    "eval": ("frugal.recipes.eval", "Compute-accounted evaluation: greedy, majority, best-of-N, beam, early rejection, particle filtering"),
    "export": ("frugal.recipes.export", "Adapter / merged model / PRM folder with a model card; push to the Hub"),
    "plan": ("frugal.recipes.plan", "TTSPM test-time budget planner: predicted accuracy vs samples N, saturation N*"),
    "train-prm": ("frugal.recipes.train_prm", "Train a lightweight process reward model (LoRA + step head)"),
    "label-prm": ("frugal.recipes.label_prm", "Monte-Carlo step labels (Math-Shepherd) for PRM training"),
}

USAGE = """usage: frugal <recipe> [hydra overrides...] [--help] [--cfg job]

Recipes:
{recipes}

Examples:
  frugal train                                   # S-GRPO on the embedded SmolLM2, arithmetic task
  frugal train recipe=demo                       # the `make demo` run
  frugal train algo=grpo task=svamp max_steps=50
  frugal train --cfg job                         # print the composed config and exit
  frugal train --help                            # config groups and options
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<12} {desc}" for name, (_, desc) in RECIPES.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(recipes=listing))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in RECIPES:
        print(f"frugal: unknown recipe {name!r}\n\n" + USAGE.format(recipes=listing), file=sys.stderr)
        return 2
    from frugal.inference.vllm_setup import RENAMED
    from frugal.runtime.config import override_keys, refuse_renamed

    try:
        refuse_renamed(override_keys(rest), RENAMED)
    except ValueError as err:
        print(f"frugal {name}: {err}", file=sys.stderr)
        return 2
    module = importlib.import_module(RECIPES[name][0])
    # Hydra reads its overrides from sys.argv.
    sys.argv = [f"frugal {name}", *rest]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())

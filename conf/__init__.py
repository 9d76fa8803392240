"""Hydra configs: one primary config per recipe (``train.yaml``, ``eval.yaml``…) and the config groups.

A regular package (not a namespace one) so that it installs as ``frugal.conf`` and resolves the same
way in a wheel and an editable install.
"""

import os
from pathlib import Path

from omegaconf import OmegaConf

# Recipes pass this absolute folder to Hydra: a relative ``config_path`` is resolved through the calling
# module's package, which differs between ``python -m`` and the console script.
CONF_DIR = str(Path(__file__).resolve().parent)


def launch_id() -> str:
    """One id per launch, the same on every rank of a distributed launch: the launcher's PID under
    ``accelerate launch`` / torchrun (the ranks are its children), else this process's PID. Run dirs are
    ``outputs/<recipe>/<date>/<time>-<launch id>``, so two runs started in the same second never share a
    folder (Hydra's ``${now:...}`` alone has one-second resolution)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    return str(os.getppid() if distributed else os.getpid())


if not OmegaConf.has_resolver("launch_id"):
    OmegaConf.register_new_resolver("launch_id", launch_id, use_cache=True)

"""Hydra configs: one primary config per recipe (``train.yaml``, ``eval.yaml``…) and the config groups.

A regular package (not a namespace one) so that it installs as ``frugal.conf`` and resolves the same
way in a wheel and an editable install.
"""

from pathlib import Path

# Recipes pass this absolute folder to Hydra: a relative ``config_path`` is resolved through the calling
# module's package, which differs between ``python -m`` and the console script.
CONF_DIR = str(Path(__file__).resolve().parent)

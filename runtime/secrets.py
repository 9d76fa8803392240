"""Secrets never reach a file Frugal, Hydra or W&B writes: :func:`scrub_secrets` masks them in any nested
value, :class:`ScrubSecrets` rewrites what Hydra wrote before the recipe ran, and
:func:`install_log_scrubber` filters every log record."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object

SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)$", re.IGNORECASE)


SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY")


# Token shapes, found anywhere inside a string: Hugging Face (hf_…), OpenAI-style API keys (sk-…), and
# W&B API keys (40 lowercase hex digits). A git commit id has the W&B shape too: it is kept under a key
# that names a revision (model.revision=<sha> pins a model, and hiding it would break reproducibility).
TOKEN_SHAPES = re.compile(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")


NOT_HEX_SHAPES = re.compile(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}")


REVISION_KEY = re.compile(r"(^|[._])(revision|commit|sha)$", re.IGNORECASE)


# A command-line override ``[+~]key=value`` (Hydra's overrides.yaml, sys.argv): its key decides as above.
OVERRIDE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[A-Za-z_][\w.\[\]/@-]*)=(?P<value>.*)$", re.DOTALL)


MASK = "***"


def env_secrets() -> list[str]:
    """The current values of the secret environment variables (values under 8 characters are not treated
    as secrets: masking every "1" in a file would hide nothing and garble everything)."""
    return [os.environ[name] for name in SECRET_ENV if len(os.environ.get(name) or "") >= 8]


def scrub_text(text: str, key: str = "") -> str:
    """``text`` with every secret inside it masked: the current value of HF_TOKEN / WANDB_API_KEY /
    OPENAI_API_KEY wherever it appears, and token-shaped substrings (:data:`TOKEN_SHAPES`). The whole value
    is masked when ``key`` names a secret (``hf_token``, ``logger.api_key``); an override string
    ``key=value`` is judged by its own key the same way."""
    if key and SECRET_KEY.search(key.split(".")[-1]) and text:
        return MASK
    match = OVERRIDE.match(text)
    if match:
        name = match.group("key").split(".")[-1]
        if SECRET_KEY.search(name) and match.group("value"):
            return f"{match.group('prefix')}{match.group('key')}={MASK}"
        return f"{match.group('prefix')}{match.group('key')}={scrub_text(match.group('value'), match.group('key'))}"
    for secret in env_secrets():
        text = text.replace(secret, MASK)
    shapes = NOT_HEX_SHAPES if key and REVISION_KEY.search(key) else TOKEN_SHAPES
    return shapes.sub(MASK, text)


def scrub_secrets(obj: Any, key: str = "") -> Any:
    """A copy of a nested dict/list/str with secrets masked as ``***``: the whole value of a secret-named
    key (``hf_token``, ``api_key``…), and inside every string the current values of the secret environment
    variables and token-shaped substrings (:func:`scrub_text`). Everything Frugal writes (run config, W&B
    config and command line, ``.hydra/`` files, logs, model cards, exports) goes through here."""
    if isinstance(obj, dict):
        return {k: (MASK if v and SECRET_KEY.search(str(k)) else scrub_secrets(v, str(k))) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v, key) for v in obj]
    if isinstance(obj, str):
        return scrub_text(obj, key)
    return obj


class ScrubSecrets(_HydraCallback):
    """Hydra callback (``hydra.callbacks.scrub_secrets`` in every recipe's primary config).

    Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` before the recipe runs and
    before any Frugal code could refuse a bad override, so a token passed on the command line would be
    on disk already. ``on_job_start`` runs right after those writes and before the recipe: it rewrites
    them through :func:`scrub_secrets`, scrubs ``sys.argv`` (W&B records the command
    line) and adds a filter that scrubs every log record (Hydra's ``<job>.log`` included). Chosen over
    ``hydra.output_subdir=null`` (which would lose the record of the run) and over a rewrite at recipe
    start (which each recipe would have to remember, and which runs after config validation can fail)."""

    def on_job_start(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        from frugal.runtime.io import atomic_write_text
        from frugal.runtime.secrets import scrub_secrets

        sys.argv[:] = scrub_secrets(list(sys.argv))
        install_log_scrubber()
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        folder = Path(config.hydra.runtime.output_dir) / str(subdir)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            path = folder / name
            if path.exists():
                data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
                atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(data))))


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        from frugal.runtime.secrets import scrub_secrets

        message = record.getMessage()
        clean = scrub_secrets(message, "message")
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_scrubber() -> None:
    """Scrub secrets from every record reaching the root logger's handlers (files and console)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ScrubFilter) for f in handler.filters):
            handler.addFilter(_ScrubFilter())

"""Run tracking: always a local ``metrics.jsonl`` (and ``samples.jsonl``), plus Weights & Biases when
``logger.backend=wandb``. Configs are scrubbed of secrets before they reach either."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from frugal.runtime.io import atomic_write_text, read_jsonl, truncate_after  # noqa: F401  (read_jsonl: re-exported)
from frugal.runtime.config import LoggerConfig
from frugal.runtime.secrets import scrub_secrets

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, resume_step: Optional[int] = None,
                 enabled: bool = True):
        # enabled=False (ranks other than the main one in a distributed run): every method is a no-op.
        self.enabled = enabled
        self.cfg = cfg
        self.wandb_run = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if resume_step is not None:
            # A killed run may have logged steps after its last checkpoint; they are about to be redone.
            for path in (self.metrics_path, self.samples_path):
                truncate_after(path, resume_step)
        if cfg.backend == "wandb" and cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(scrub_secrets(config))

    def _init_wandb(self, config: dict):
        import wandb

        id_file = self.run_dir / "wandb_id"
        # Our own id (wandb's generator moved between versions), stored so a resumed run continues the same W&B run.
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id)
        # The run name and tags are user strings too: scrub them like the config (a pasted token stays out).
        named = scrub_secrets({"name": self.cfg.name, "tags": list(self.cfg.tags)})
        # W&B records the command line (sys.argv) in the run's metadata, which `wandb sync` uploads: a token
        # passed as an override would travel with it. Hydra has parsed the arguments already.
        sys.argv[:] = scrub_secrets(list(sys.argv))
        return wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=named["name"], tags=named["tags"],
            mode=self.cfg.mode, dir=str(self.run_dir), config=config, id=run_id, resume="allow",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int, table: bool = False) -> None:
        if not self.enabled:
            return
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if table and self.wandb_run is not None and rows:
            import wandb

            columns = list(rows[0].keys())
            data = [[json.dumps(r[c]) if isinstance(r[c], (list, dict)) else r[c] for c in columns] for r in rows]
            self.wandb_run.log({"completions": wandb.Table(columns=columns, data=data)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def log_artifact(self, folder: Path, name: str, kind: str = "model", metadata: Optional[dict] = None,
                     aliases: tuple[str, ...] = ("latest",)) -> None:
        """Upload a folder (the final adapter, a PRM) as a W&B artifact; offline runs upload on `wandb sync`."""
        if self.wandb_run is None:
            return
        import wandb

        # Artifact names allow [A-Za-z0-9_.-] only.
        safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)
        artifact = wandb.Artifact(safe, type=kind, metadata=scrub_secrets(metadata or {}))
        artifact.add_dir(str(folder))
        self.wandb_run.log_artifact(artifact, aliases=list(aliases))

    def log_eval(self, summary: dict[str, Any], plots: tuple[Path, ...] = (), step: Optional[int] = None) -> None:
        """An evaluation's summary and its plots: ``frugal eval``'s ``rows`` (one per strategy and budget)
        become a table plus ``eval/<strategy>/N<budget>/<metric>`` summary values; other numbers go into
        the run summary under ``eval/``; plots are logged as images."""
        if self.wandb_run is None:
            return
        import wandb

        rows = [r for r in summary.get("rows", []) if isinstance(r, dict)]
        flat = {f"eval/{k}": v for k, v in flatten({k: v for k, v in summary.items() if k != "rows"}).items()
                if isinstance(v, (int, float, str, bool))}
        for r in rows:
            prefix = f"eval/{r.get('strategy', 'run')}/N{r.get('budget', '')}"
            flat.update({f"{prefix}/{k}": v for k, v in r.items()
                         if k not in ("strategy", "budget") and isinstance(v, (int, float))})
        for k, v in flat.items():
            self.wandb_run.summary[k] = v
        logged: dict[str, Any] = {f"eval/{Path(p).stem}": wandb.Image(str(p)) for p in plots if Path(p).exists()}
        if rows:
            columns = list(rows[0])
            logged["eval/summary"] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        if logged:
            self.wandb_run.log(logged, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def flatten(d: dict, prefix: str = "", sep: str = "/") -> dict:
    """Nested dicts as one level: {"a": {"b": 1}} -> {"a/b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}{sep}", sep))
        else:
            out[f"{prefix}{k}"] = v
    return out


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")

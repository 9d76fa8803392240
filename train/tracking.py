"""Run tracking: always a local ``metrics.jsonl`` (and ``samples.jsonl``), plus Weights & Biases when
``logger.backend=wandb``. Configs are scrubbed of secrets before they reach either."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from train.checkpoint import atomic_write_text
from train.config import LoggerConfig, scrub_secrets


class Tracker:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, resume_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        if resume_step is not None:
            # A killed run may have logged steps after its last checkpoint; they are about to be redone.
            for path in (self.metrics_path, self.samples_path):
                _truncate_after(path, resume_step)
        self.cfg = cfg
        self.wandb_run = None
        if cfg.backend == "wandb" and cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(scrub_secrets(config))

    def _init_wandb(self, config: dict):
        import wandb

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        atomic_write_text(id_file, run_id)
        return wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=self.cfg.name, tags=list(self.cfg.tags),
            mode=self.cfg.mode, dir=str(self.run_dir), config=config, id=run_id, resume="allow",
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int, table: bool = False) -> None:
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

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")

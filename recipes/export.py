"""``frugal export``: a run's adapter (PEFT), optionally merged into the base model, or a PRM folder,
with a generated model card; optionally pushed to the Hugging Face Hub.

    frugal export source=outputs/train/2025-01-01/12-00-00                  # -> <run>/export
    frugal export source=<run>/checkpoints/step_50 output_dir=exports/step50
    frugal export source=<run> merge=true push_to_hub=my-org/frugal-arith private=true
    frugal export source=<run> push_to_hub=my-org/frugal-arith dry_run=true  # list files + target only

The Hub token comes from ``HF_TOKEN`` or ``huggingface-cli login``; it is never a config key.
"""

from __future__ import annotations

import json
import logging
import sys


import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from frugal.conf import CONF_DIR
from frugal.runtime.config import to_config
from frugal.train.export import ExportConfig, export

log = logging.getLogger("frugal.export")
# The schema conf/export.yaml extends. Hydra reads conf/ through CONF_DIR, an absolute path (conf/__init__.py:
# a relative config_path would resolve differently for the console script and `python -m`).
ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def run(raw_cfg: DictConfig) -> dict:
    cfg: ExportConfig = to_config(raw_cfg, ExportConfig)
    report = export(cfg)
    log.info("exported %s (%d files) to %s", report["kind"], len(report["files"]), report["output_dir"])
    return report


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    print(f"exported {report['kind']} from {report['source']} to {report['output_dir']}:")
    for name in report["files"]:
        print(f"  {name}")
    push = report.get("push")
    if push:
        verb = "would push" if push["dry_run"] else "pushed"
        print(f"{verb} {len(push['files'])} files to {push['url']} (revision {push['revision']}, "
              f"{'private' if push['private'] else 'public'}, message {push['commit_message']!r})")
        if not push["dry_run"]:
            print(f"commit: {push['commit_url']}")
    print("EXPORT " + json.dumps({k: report[k] for k in ("output_dir", "kind", "merged")}))


if __name__ == "__main__":
    sys.exit(main())

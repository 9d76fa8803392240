"""``frugal export``: turn a run into publishable folders — the LoRA adapter (PEFT format), optionally the
merged full model (safetensors), or a PRM folder — each with a generated model card, and push them to
the Hugging Face Hub.

Layout of an export folder (what gets uploaded)::

    <output_dir>/README.md                  model card (base model, task, algorithm, config, eval table)
    <output_dir>/adapter_config.json        PEFT adapter (base_model_name_or_path points at the Hub id)
    <output_dir>/adapter_model.safetensors
    <output_dir>/tokenizer*.json, chat_template.jinja
    <output_dir>/frugal_config.yaml         the run's resolved config, secrets removed
    <output_dir>/merged/                    with merge=true: base + adapter merged (``merge_and_unload``)

The folder is built in a hidden temporary sibling and renamed into place, so an interrupted export never
leaves a half-written folder, and an existing non-empty folder is only replaced with ``overwrite=true``.

Secrets: the Hub token is never read here. ``huggingface_hub`` finds it itself (``HF_TOKEN`` or the
``huggingface-cli login`` file); configs are passed through :func:`frugal.runtime.secrets.scrub_secrets` and the
written files are checked against the secret environment variables before anything is uploaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from frugal.runtime.checkpoints import STEP_DIR, list_checkpoints
from frugal.runtime.io import atomic_dir, atomic_write_text
from frugal.train.config import ALGO_VARIANTS
from frugal.runtime.secrets import SECRET_ENV, scrub_secrets
from frugal.runtime.config import RunConfig
from frugal.inference.models import ModelConfig, load_model, load_tokenizer
from frugal.train.tracking import flatten

log = logging.getLogger(__name__)

# Built-in models whose weights are a public Hub model: cards and adapter configs name the Hub id so the
# export loads with plain transformers + peft.
HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
BUILTIN_NOTES = {"builtin:smollm2-135m-instruct": (
    "trained on Frugal's embedded copy of SmolLM2-135M-Instruct (de-quantised from the Q4_1 GGUF), whose "
    "weights differ slightly from the Hub checkpoint; `frugal eval` with the default model uses that copy")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class ExportConfig(RunConfig):
    # (RunConfig: output_dir, default <run dir>/export or <source>-export; device; num_threads)
    device: str = "cpu"  # cpu | cuda | auto, for verify/merge
    source: Optional[str] = None  # run dir | checkpoints/step_<n> | final/ | any PEFT adapter folder | PRM folder
    overwrite: bool = False  # replace a non-empty output_dir
    merge: bool = False  # also write the merged full model to <output_dir>/merged
    merged_dtype: Optional[str] = None  # float32 | bfloat16 | float16; None = the base checkpoint's dtype
    base_model: Optional[str] = None  # override the run's base model (must fit the adapter)
    verify: bool = True  # load base + adapter and check every adapter tensor fits (catches mismatches)
    license: str = "apache-2.0"
    model_name: Optional[str] = None  # card title; default: the repo name or the folder name
    eval_summary: Optional[str] = None  # a `frugal eval` summary.json to add to the card's table
    push_to_hub: Optional[str] = None  # <org>/<name>
    private: bool = True
    revision: Optional[str] = None  # branch to push to (created if missing); None = main
    commit_message: str = "Upload Frugal export"
    dry_run: bool = False  # list files and target, no network

    def __post_init__(self):
        super().__post_init__()
        if not self.source:
            raise ValueError("source is required: a run dir, checkpoints/step_<n>, final/ or an adapter folder "
                             "(e.g. `frugal export source=outputs/train/2025-01-01/12-00-00`)")
        if self.merged_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"merged_dtype must be float32|bfloat16|float16, got {self.merged_dtype!r}")
        if self.push_to_hub and self.push_to_hub.count("/") != 1:
            raise ValueError(f"push_to_hub must look like <org>/<name>, got {self.push_to_hub!r}")


class AdapterMismatchError(ValueError):
    """The adapter's tensors do not fit the base model (different architecture or size)."""


@dataclass
class Source:
    kind: str  # adapter | prm
    folder: Path  # the adapter or PRM folder itself
    run_dir: Optional[Path]  # the run it came from, when known (config.yaml, summary.json)
    step: Optional[int] = None
    run_config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- finding what to export

def resolve_source(source: str | Path) -> Source:
    """Accepts a run dir (its ``final/``, else its newest checkpoint), ``checkpoints/step_<n>``, a
    ``final/`` or other adapter folder, or a PRM folder."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source={source}: no such run dir, checkpoint or adapter folder")
    if _is_prm(path):
        return _with_run_info(Source("prm", path, _run_dir_of(path)))
    if STEP_DIR.match(path.name):
        if (path / "adapter" / "head.safetensors").exists():
            raise ValueError(f"source={source} is a PRM training checkpoint; export the PRM run's final/ folder "
                             "(a PRM folder needs prm.json)")
        if not (path / "state.json").exists() or not (path / "adapter" / "adapter_config.json").exists():
            raise FileNotFoundError(f"source={source}: {path} is not a complete checkpoint "
                                    "(needs state.json and adapter/adapter_config.json)")
        step = json.loads((path / "state.json").read_text())["step"]
        return _with_run_info(Source("adapter", path / "adapter", path.parent.parent, step))
    if (path / "adapter_config.json").exists():
        return _with_run_info(Source("adapter", path, _run_dir_of(path)))
    if (path / "final").is_dir() and not _is_prm(path / "final"):
        return _with_run_info(Source("adapter", path / "final", path))
    if (path / "final").is_dir() and _is_prm(path / "final"):
        return _with_run_info(Source("prm", path / "final", path))
    ckpts = list_checkpoints(path)
    if ckpts:
        log.info("%s has no final/ adapter; exporting its newest checkpoint %s", path, ckpts[-1].name)
        return resolve_source(ckpts[-1])
    raise FileNotFoundError(f"source={source}: found no adapter in {path} (expected final/adapter_config.json, "
                            "checkpoints/step_<n>/adapter/ or an adapter_config.json in the folder itself)")


def missing_files(src: Source) -> list[str]:
    """What an export needs from ``src`` and does not find, each as a path. A training run's ``final/``
    needs the adapter (config + weights), the tokenizer and the run's ``summary.json`` (written last: a
    run killed during its final save has no summary); a PRM folder needs ``prm.json`` and its adapter
    head; a checkpoint must pass its manifest (:func:`frugal.runtime.checkpoints.verify_checkpoint`)."""
    from frugal.runtime.checkpoints import verify_checkpoint

    folder, missing = src.folder, []
    # a training run's final/ (the run dir has its config.yaml), not a bare folder that happens to be named so
    run_final = folder.name == "final" and src.run_dir is not None and (src.run_dir / "config.yaml").exists()
    if src.step is not None:  # checkpoints/step_<n>/adapter
        return verify_checkpoint(folder.parent)
    if src.kind == "prm":
        from frugal.train import prm as prm_module

        need = [prm_module.PRM_CONFIG_FILE, f"{prm_module.ADAPTER_DIR}/{prm_module.HEAD_FILE}"]
    else:
        need = ["adapter_config.json"]
        if not any((folder / n).exists() for n in ("adapter_model.safetensors", "adapter_model.bin")):
            missing.append(str(folder / "adapter_model.safetensors"))
        if run_final:  # a training run's final save holds the tokenizer too
            need.append("tokenizer_config.json")
            if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
                missing.append(str(folder / "tokenizer.json"))
    missing = [str(folder / n) for n in need if not (folder / n).exists()] + missing
    if run_final and not (src.run_dir / "summary.json").exists():
        missing.append(str(src.run_dir / "summary.json"))
    return missing


def check_complete(src: Source) -> None:
    """Refuse an incomplete source, naming every missing file (e.g. a ``final/`` cut short by a kill)."""
    missing = missing_files(src)
    if missing:
        hint = (f"; the run was likely killed during its final save: resume it (resume={src.run_dir}) or export "
                "one of its checkpoints" if src.run_dir is not None else "")
        raise FileNotFoundError(f"source={src.folder} is incomplete, missing: {', '.join(missing)}{hint}")


def _is_prm(path: Path) -> bool:
    # A PRM folder as train.prm.PRM.save writes it: prm.json + adapter/ (LoRA adapter and head.safetensors).
    return (path / "prm.json").exists()


def _run_dir_of(folder: Path) -> Optional[Path]:
    if folder.name == "final" and (folder.parent / "config.yaml").exists():
        return folder.parent
    if folder.name == "adapter" and STEP_DIR.match(folder.parent.name):
        return folder.parent.parent.parent
    return None


def _with_run_info(src: Source) -> Source:
    if src.run_dir is not None:
        if (src.run_dir / "config.yaml").exists():
            src.run_config = OmegaConf.to_container(OmegaConf.load(src.run_dir / "config.yaml"), resolve=True)
        if (src.run_dir / "summary.json").exists() and src.step is None:
            src.summary = json.loads((src.run_dir / "summary.json").read_text())
    return src


def base_model_config(src: Source, override: Optional[str] = None) -> ModelConfig:
    """The base model the adapter was trained on: ``override``, else the run's ``model`` config, else the
    adapter config's ``base_model_name_or_path``."""
    run_model = dict(src.run_config.get("model") or {})
    run_model.pop("adapter", None)
    if override:
        return ModelConfig(name_or_path=override, dtype=run_model.get("dtype", "auto"))
    if run_model.get("name_or_path"):
        return ModelConfig(**run_model)
    base = json.loads((src.folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{src.folder}: no run config.yaml next to it and no base_model_name_or_path in "
                         "adapter_config.json; pass base_model=<hub id or path>")
    return ModelConfig(name_or_path=base)


# ---------------------------------------------------------------------- export

def export(cfg: ExportConfig) -> dict:
    """Write the export folder (and push it unless ``dry_run``). Returns a report dict."""
    src = resolve_source(cfg.source)
    check_complete(src)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if src.kind == "prm" and cfg.merge:
        raise ValueError(f"merge=true applies to policy adapters; {src.folder} is a PRM folder (exported as is)")
    out = Path(cfg.output_dir) if cfg.output_dir else _default_output(src)
    _check_target(out, cfg.overwrite)
    with atomic_dir(out) as tmp:  # replaces `out` only with overwrite=true (or an empty folder): _check_target
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is meant to be shared
        if src.kind == "prm":
            info = _export_prm(src, tmp)
        else:
            info = _export_adapter(src, cfg, tmp)
        eval_rows = _eval_rows(src.summary, cfg.eval_summary)
        card = model_card(src, cfg, info, eval_rows)
        atomic_write_text(tmp / "README.md", card)
        if info.get("merged"):
            atomic_write_text(tmp / "merged" / "README.md", model_card(src, cfg, {**info, "is_merged": True}, eval_rows))
        if src.run_config:
            atomic_write_text(tmp / "frugal_config.yaml", OmegaConf.to_yaml(OmegaConf.create(scrub_secrets(src.run_config))))
        assert_no_secrets(tmp)
        for path in tmp.rglob("*"):  # temp-file writers (ours, transformers') leave 0600 files behind
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    report = {"output_dir": str(out), "kind": src.kind, "files": files, "source": str(src.folder), **info}
    if cfg.push_to_hub:
        report["push"] = push(out, cfg.push_to_hub, cfg.private, cfg.revision, cfg.commit_message, cfg.dry_run)
    return report


def _default_output(src: Source) -> Path:
    if src.run_dir is not None:
        return src.run_dir / ("export" if src.step is None else f"export_step_{src.step}")
    return src.folder.parent / f"{src.folder.name}-export"


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir={out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir={out} exists and is not empty; pass overwrite=true to replace it "
                              "or choose another output_dir")


def _export_adapter(src: Source, cfg: ExportConfig, tmp: Path) -> dict:
    from safetensors.torch import load_file

    model_cfg = base_model_config(src, cfg.base_model)
    hub_base = HUB_IDS.get(model_cfg.name_or_path, model_cfg.name_or_path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if not (src.folder / name).exists():
            raise FileNotFoundError(f"{src.folder}: missing {name}; not a complete PEFT adapter")
    shutil.copy2(src.folder / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
    adapter_cfg = json.loads((src.folder / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = hub_base  # so AutoPeftModelForCausalLM finds the base
    if model_cfg.revision:
        adapter_cfg["revision"] = model_cfg.revision
    atomic_write_text(tmp / "adapter_config.json", json.dumps(adapter_cfg, indent=2, sort_keys=True))
    _copy_or_save_tokenizer(src.folder, model_cfg, tmp)

    info: dict[str, Any] = {"base_model": hub_base, "frugal_base": model_cfg.name_or_path, "merged": False}
    if model_cfg.name_or_path in BUILTIN_NOTES:
        info["base_note"] = BUILTIN_NOTES[model_cfg.name_or_path]
    if not (cfg.verify or cfg.merge):
        return info
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    saved_dtype = _checkpoint_dtype(model_cfg)
    model_cfg.dtype = "float32"  # merge in full precision, cast afterwards
    base, tokenizer = load_model(model_cfg, device)
    model = load_adapter_checked(base, src.folder, load_file(str(src.folder / "adapter_model.safetensors")),
                                 model_cfg.name_or_path)
    if cfg.merge:
        merged = model.merge_and_unload()
        dtype = getattr(torch, cfg.merged_dtype) if cfg.merged_dtype else saved_dtype
        merged.to(dtype)
        merged.config.name_or_path = hub_base
        merged.save_pretrained(tmp / "merged", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "merged")
        info.update(merged=True, merged_dtype=str(dtype).replace("torch.", ""))
    return info


def _checkpoint_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype the base checkpoint is stored in (what a merged copy is saved in by default)."""
    if model_cfg.name_or_path.startswith("builtin:"):
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                        trust_remote_code=model_cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)


def load_adapter_checked(base, adapter_dir: Path, saved: dict, base_name: str):
    """``PeftModel.from_pretrained`` plus a check that every saved tensor landed in the model with the same
    shape: peft only warns about missing keys, and a silently half-loaded adapter is worse than an error."""
    from peft import PeftModel, get_peft_model_state_dict

    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        raise AdapterMismatchError(f"adapter {adapter_dir} does not fit base model {base_name!r}: {err}\n"
                                   "Hint: pass the base model it was trained on (base_model=...)") from err
    loaded = get_peft_model_state_dict(model)
    missing = sorted(set(saved) - set(loaded))
    wrong = sorted(k for k in set(saved) & set(loaded) if saved[k].shape != loaded[k].shape)
    if missing or wrong:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit base model {base_name!r}: "
            f"{len(missing)} tensors have no place in the model (e.g. {missing[:2]}), "
            f"{len(wrong)} have another shape (e.g. {wrong[:2]})")
    model.eval()
    return model


def _copy_or_save_tokenizer(folder: Path, model_cfg: ModelConfig, tmp: Path) -> None:
    present = [name for name in TOKENIZER_FILES if (folder / name).exists()]
    if "tokenizer_config.json" in present:
        for name in present:
            shutil.copy2(folder / name, tmp / name)
    else:  # checkpoints hold the adapter only
        load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code).save_pretrained(tmp)


def _export_prm(src: Source, tmp: Path) -> dict:
    """A PRM folder is copied as written by ``frugal.train.prm`` and checked to load with ``load_prm``."""
    from frugal.train import prm as prm_module

    prm_module.load_prm(str(src.folder))  # fails loudly on a broken folder before anything is written
    for path in src.folder.rglob("*"):
        if path.is_file() and path.name != "README.md":
            target = tmp / path.relative_to(src.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    meta = json.loads((src.folder / prm_module.PRM_CONFIG_FILE).read_text())
    # load_prm rebuilds the backbone from prm.json's name, so it stays Frugal's name (builtin:… included);
    # the card shows the Hub id where there is one.
    return {"base_model": HUB_IDS.get(meta["backbone"], meta["backbone"]), "merged": False, "prm": meta}


# ---------------------------------------------------------------------- model card

def _eval_rows(summary: dict, eval_summary: Optional[str]) -> list[tuple[str, str]]:
    rows = []
    for key in ("accuracy_before", "accuracy_after"):
        if summary.get(key) is not None:
            rows.append((f"held-out greedy accuracy ({key.split('_')[1]} RL)", f"{summary[key]:.4f}"))
    rows += [(key, f"{v:.4f}") for key, v in sorted(summary.items())  # a PRM run's held-out step metrics
             if key.startswith("eval_") and isinstance(v, float)]
    if eval_summary:
        path = Path(eval_summary)
        if not path.exists():
            raise FileNotFoundError(f"eval_summary={eval_summary}: no such file")
        data = json.loads(path.read_text())
        for r in data.get("rows", []):  # `frugal eval`: one row per strategy and budget
            rows.append((f"{r['strategy']} accuracy at N={r['budget']} ({r['problems']} problems, "
                         f"{r['flops_total']:.3g} FLOPs)", f"{r['accuracy']:.4f}"))
        for key, value in sorted(flatten({k: v for k, v in data.items() if k != "rows"}, sep=".").items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    return rows




def model_card(src: Source, cfg: ExportConfig, info: dict, eval_rows: list[tuple[str, str]]) -> str:
    from huggingface_hub import ModelCardData

    conf = src.run_config
    algo, task = conf.get("algo", {}), conf.get("task", {})
    base = info.get("base_model") or "unknown"
    is_merged, is_prm = info.get("is_merged", False), src.kind == "prm"
    repo = cfg.push_to_hub or "path/to/this/folder"
    title = cfg.model_name or (cfg.push_to_hub.split("/")[1] if cfg.push_to_hub else Path(src.folder).parent.name)
    hub_base = "/" in base and not base.startswith(("builtin:", "/", "."))  # a Hub id the Hub can link
    tags = ["frugal", "reinforcement-learning"] + ([] if is_merged or is_prm else ["lora", "peft"])
    tags += ["process-reward-model"] if is_prm else ([algo["name"]] if algo.get("name") else [])
    meta = ModelCardData(
        base_model=base if hub_base else None, library_name=None if (is_merged or is_prm) else "peft",
        license=cfg.license, tags=tags, pipeline_tag=None if is_prm else "text-generation",
    )
    lines = ["---", meta.to_yaml(), "---", "", f"# {title}", ""]
    what = ("a process reward model (PRM)" if is_prm else
            "the merged model (base + LoRA adapter)" if is_merged else "a LoRA adapter (PEFT)")
    lines += [f"This is {what} trained with [Frugal](https://github.com/frugal-rl/frugal) "
              "(compute-frugal RL fine-tuning for LLM reasoning).", ""]
    facts = [("base model", f"`{base}`"), ("task", f"`{task.get('name', 'unknown')}`")]
    if algo:
        facts.append(("algorithm", f"`{algo.get('name')}` (critic-free RL, group size {algo.get('group_size')})"))
    if info.get("base_note"):
        facts.append(("note", info["base_note"]))
    if src.step is not None:
        facts.append(("checkpoint step", str(src.step)))
    elif src.summary.get("steps") is not None:
        facts.append(("training steps", str(src.summary["steps"])))
    lines += ["| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in facts], ""]
    key_config = _key_config(conf)
    if key_config:
        lines += ["## Training configuration", "", "| key | value |", "| --- | --- |",
                  *[f"| `{k}` | `{v}` |" for k, v in key_config], "",
                  "The full resolved config (secrets removed) is in `frugal_config.yaml`.", ""]
    if eval_rows:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |",
                  *[f"| {k} | {v} |" for k, v in eval_rows], ""]
    lines += ["## Usage", ""] + _usage(base, info.get("frugal_base", base), repo, is_merged, is_prm, conf)
    lines += ["", "## License", "", f"`{cfg.license}` (the base model's own license also applies)." if not is_prm
              else f"`{cfg.license}`.", ""]
    return scrub_secrets("\n".join(lines))


def _key_config(conf: dict) -> list[tuple[str, Any]]:
    # The algorithm's own knobs (its variant dataclass, train/config.py), whichever algorithm the run used.
    variant = ALGO_VARIANTS.get(str(conf.get("algo", {}).get("name")))
    algo_keys = [f"algo.{f.name}" for f in dataclasses.fields(variant)] if variant else []
    keys = [*algo_keys, "optim.lr", "optim.schedule",
            "max_steps", "prompts_per_step", "lora.r", "lora.alpha", "lora.target_modules",
            "generation.max_new_tokens", "generation.temperature", "prm.separator", "prm.aggregation",
            "prm.num_layers", "prm.lora_last_layers", "task.name", "seed"]
    out = []
    for key in keys:
        node: Any = conf
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out.append((key, node))
    return out


def _usage(base: str, frugal_base: str, repo: str, is_merged: bool, is_prm: bool, conf: dict) -> list[str]:
    if is_prm:
        return ["```bash", f"huggingface-cli download {repo} --local-dir prm   # then, with `pip install frugal-rl`:",
                "```", "", "```python", "from frugal.train.prm import load_prm", "",
                'prm = load_prm("prm")',
                'print(prm.score(["What is 3 + 4 * 5?"], [["4 * 5 = 20", "3 + 20 = 23"]]))  # one score per step',
                "```", "", "PRM-guided search with Frugal's evaluator:", "", "```bash",
                "frugal eval prm_path=prm search=best_of_n", "```"]
    task = (conf.get("task") or {}).get("name", "arith")
    if is_merged:
        py = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="merged")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}", subfolder="merged")', "```"]
    else:
        py = ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'base = AutoModelForCausalLM.from_pretrained("{base}")',
              f'model = PeftModel.from_pretrained(base, "{repo}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
              'messages = [{"role": "user", "content": "What is 12 * 7?"}]',
              'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
              'print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))', "```"]
    cli = ["", "Evaluate it with Frugal (`pip install frugal-rl`; download the folder first with "
           f"`huggingface-cli download {repo} --local-dir export`):", "", "```bash"]
    if is_merged:
        cli.append(f"frugal eval model.name_or_path=export/merged task={task}")
    else:
        cli.append(f"frugal eval model.name_or_path={frugal_base} model.adapter=export task={task}")
    return py + cli + ["```"]


# ---------------------------------------------------------------------- secrets and the Hub

def assert_no_secrets(folder: Path) -> None:
    """Refuse to publish a folder in which any secret from the environment appears verbatim."""
    secrets = [os.environ[name].encode() for name in SECRET_ENV if len(os.environ.get(name, "")) >= 8]
    if not secrets:
        return
    for path in Path(folder).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, secret in zip(SECRET_ENV, secrets):
                if secret in data:
                    raise RuntimeError(f"{path.name} contains the value of a secret environment variable; "
                                       "refusing to export it")


def push(folder: Path, repo_id: str, private: bool, revision: Optional[str], commit_message: str,
         dry_run: bool) -> dict:
    """Upload ``folder`` to ``repo_id``. The token is whatever huggingface_hub finds (``HF_TOKEN`` or the
    saved login); it is never passed, printed or stored by Frugal."""
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    target = {"repo_id": repo_id, "url": f"https://huggingface.co/{repo_id}", "revision": revision or "main",
              "private": private, "commit_message": commit_message, "files": files}
    if dry_run:
        log.info("dry run: would upload %d files to %s (revision %s, %s)", len(files), target["url"],
                 target["revision"], "private" if private else "public")
        return {**target, "dry_run": True}
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                               commit_message=commit_message)
    return {**target, "dry_run": False, "commit_url": str(getattr(commit, "commit_url", commit))}

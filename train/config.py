"""Structured configs (dataclasses registered in Hydra's ConfigStore).

Hydra merges the YAML files in ``conf/`` onto these schemas, so an unknown key or a wrong type fails at
composition time with the key's full name. Range checks live in each dataclass's ``__post_init__`` and
run when a recipe calls :func:`to_config` — before any model is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from frugal.rewards.combine import RewardConfig
from frugal.tasks.config import TaskConfig
from frugal.train.models import LoraConfig, ModelConfig
from frugal.train.rollout import GenerationConfig

ALGOS = ("sgrpo", "grpo", "tspmo")


@dataclass
class AlgoConfig:
    name: str = "sgrpo"  # sgrpo | grpo | tspmo
    group_size: int = 8  # G completions per prompt
    # S-GRPO token selection: first k_early completion tokens always, later ones with prob p_keep·decay^(t-k)
    k_early: int = 8
    p_keep: float = 0.3
    decay: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0  # KL to the base model (adapter disabled); 0 = no reference pass at all
    num_iterations: int = 1  # optimisation passes over each batch of completions
    adv_eps: float = 1e-4
    scale_by_std: bool = True
    # T-SPMO (train/tspmo.py): credit at the branch points of a prefix trie over each group's completions
    min_visits: int = 1  # a transition counts only if >= min_visits completions took it
    weighting: str = "unique"  # unique (each transition once, the paper) | visits (once per completion taking it)
    adv_norm: str = "none"  # none | reward_std (per group) | batch_std (over the step's selected tokens)
    max_selected: int = 0  # cap on selected tokens per step, largest |A| kept (0 = no cap)
    replay_samples: int = 0  # extra continuations per group from its highest-|A| prefix (0 = no replay)

    def __post_init__(self):
        if self.name not in ALGOS:
            raise ValueError(f"algo.name must be one of {'|'.join(ALGOS)}, got {self.name!r}")
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.k_early < 0:
            raise ValueError(f"algo.k_early must be >= 0, got {self.k_early}")
        if not 0.0 <= self.p_keep <= 1.0:
            raise ValueError(f"algo.p_keep must be in [0, 1], got {self.p_keep}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"algo.decay must be in (0, 1], got {self.decay}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.beta < 0:
            raise ValueError(f"algo.beta must be >= 0, got {self.beta}")
        if self.num_iterations < 1:
            raise ValueError(f"algo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.min_visits < 1:
            raise ValueError(f"algo.min_visits must be >= 1, got {self.min_visits}")
        if self.weighting not in ("unique", "visits"):
            raise ValueError(f"algo.weighting must be unique|visits, got {self.weighting!r}")
        if self.adv_norm not in ("none", "reward_std", "batch_std"):
            raise ValueError(f"algo.adv_norm must be none|reward_std|batch_std, got {self.adv_norm!r}")
        if self.max_selected < 0:
            raise ValueError(f"algo.max_selected must be >= 0 (0 = no cap), got {self.max_selected}")
        if self.replay_samples < 0:
            raise ValueError(f"algo.replay_samples must be >= 0, got {self.replay_samples}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0  # 0 = no clipping
    micro_batch_size: int = 16  # completions per forward/backward; gradients accumulate over the step

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine|linear|constant, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.warmup_steps and optim.max_grad_norm must be >= 0")
        if self.micro_batch_size < 1:
            raise ValueError(f"optim.micro_batch_size must be >= 1, got {self.micro_batch_size}")


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb
    mode: str = "offline"  # online | offline | disabled (wandb)
    project: str = "frugal"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    completions_every: int = 10  # steps between sample-completion tables (0 = never)

    def __post_init__(self):
        if self.backend not in ("none", "wandb"):
            raise ValueError(f"logger.backend must be none|wandb, got {self.backend!r}")
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online|offline|disabled, got {self.mode!r}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    max_steps: int = 100
    prompts_per_step: int = 8
    max_minutes: Optional[float] = None  # wall-time budget for the whole run: the loop stops early enough to evaluate and save
    eval_every: int = 0  # steps between held-out evaluations (0 = only before and after)
    eval_before: bool = True
    eval_limit: Optional[int] = None  # held-out problems per evaluation (None = whole split)
    save_every: int = 25
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "true"/"latest" = newest checkpoint under output_root, or a path
    output_dir: Optional[str] = None  # default: Hydra's run dir outputs/train/<date>/<time>
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch CPU threads (None = torch's default)
    samples_every: int = 1  # steps between rows written to samples.jsonl (0 = never)

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.save_every < 0 or self.eval_every < 0 or self.samples_every < 0:
            raise ValueError("save_every, eval_every and samples_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got {self.device!r}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_config(cfg: DictConfig, schema=TrainConfig) -> Any:
    """Validate a composed Hydra config and return the typed dataclass (runs every ``__post_init__``)."""
    # Merge a plain copy onto a fresh schema: Hydra lets ``+group.key=value`` append a key to a struct
    # config (and a typed merge keeps it); merging plain values is what rejects it, naming the key.
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
    return OmegaConf.to_object(merged)


SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|apikey)$", re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


def scrub_secrets(obj: Any) -> Any:
    """A copy of a nested dict/list with secret-named keys (``hf_token``, ``api_key``...) and any value
    equal to a secret from the environment (or shaped like a Hub token) replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: ("***" if v and SECRET_KEY.search(str(k)) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, str):
        secrets = [os.environ[name] for name in SECRET_ENV if os.environ.get(name)]
        if any(s in obj for s in secrets) or re.fullmatch(r"hf_[A-Za-z0-9]{20,}", obj):
            return "***"
    return obj

"""Structured configs (dataclasses registered in Hydra's ConfigStore).

Hydra merges the YAML files in ``conf/`` onto these schemas, so a wrong type fails at composition time
with the key's full name. Range checks live in each dataclass's ``__post_init__`` and run when a recipe
calls :func:`to_config` — before any model is loaded.

Defaults are written once, here: a YAML file in ``conf/`` states only its choice and the values that
differ from these dataclasses.

Config groups with variants (``algo=sgrpo|grpo|tspmo``, ``search=…``): each variant is a dataclass of its
own (:class:`SGRPOConfig`, :class:`GRPOConfig`, :class:`TSPMOConfig`), holding only the knobs that variant
reads, so ``algo=grpo algo.p_keep=0.1`` is refused instead of silently ignored. How:

* each variant is stored in the ConfigStore as ``<group>/<name>_schema`` and its YAML file extends it
  (``conf/algo/grpo.yaml``: ``defaults: [grpo_schema]``), so ``--cfg job`` shows the variant's keys and
  their defaults, typed;
* that stored node is left open (struct flag off), so Hydra lets an override of another variant's key
  through composition instead of refusing it with a message that cannot name the owner;
* :func:`to_config` (every recipe's first line, before anything heavy) picks the variant by ``name`` and
  refuses a key that belongs to another variant, naming the key and the variant(s) it belongs to; a key
  that belongs to no variant gets OmegaConf's unknown-key error, naming its full key.

The recipe schemas declare such a field with :func:`variant_field` (typed ``Any`` for Hydra: a field typed
as one variant would refuse the others).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from frugal.rewards.combine import RewardConfig
from frugal.tasks.config import TaskConfig
from frugal.train.models import LoraConfig, ModelConfig
from frugal.train.rollout import GenerationConfig

DEVICES = ("auto", "cpu", "cuda")


# ---------------------------------------------------------------------- the run-level base

@dataclass
class RunConfig:
    """Where a recipe runs and writes: the keys every recipe has, validated here once."""

    output_dir: Optional[str] = None  # default: Hydra's run dir outputs/<recipe>/<date>/<time>
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None  # torch CPU threads (None = torch's default)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be {'|'.join(DEVICES)}, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null (torch's default), got {self.num_threads}")


@dataclass
class SeededRunConfig(RunConfig):
    """A run that draws random numbers (every recipe but ``frugal export``)."""

    seed: int = 0


@dataclass
class TimedRunConfig(SeededRunConfig):
    """A run with a wall-time budget (``frugal train``, ``frugal train-prm``)."""

    max_minutes: Optional[float] = None  # wall-time budget: the loop stops early enough to evaluate and save

    def __post_init__(self):
        super().__post_init__()
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


# ---------------------------------------------------------------------- config groups with variants

@dataclass
class Variant:
    """Base of one config group's variants: ``name`` says which one; each subclass sets its own default
    (the group's YAML file states it again, as its choice)."""

    GROUP: ClassVar[str] = ""  # the config group, for messages: "algo", "search"
    name: str

    def __post_init__(self):
        own = type(self).__dataclass_fields__["name"].default
        if own is dataclasses.MISSING:
            raise TypeError(f"{type(self).__name__} is the base of the {self.GROUP} variants; use one of them")
        if self.name != own:
            raise ValueError(f"{self.GROUP}.name must be {own!r} in {type(self).__name__}, got {self.name!r} "
                             f"(choose the variant with {self.GROUP}={self.name})")


def own_keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def variant_field(variants: Mapping[str, type], default: str, renamed: Optional[Mapping[str, str]] = None):
    """A recipe-schema field holding one of ``variants`` (name -> dataclass), ``default`` when absent.
    ``renamed``: former keys of the group -> the message that says where they went."""
    return field(default=None, metadata={"variants": dict(variants), "default": default,
                                         "renamed": dict(renamed or {})})


def variant_problems(group: str, node: Mapping[str, Any], variants: Mapping[str, type],
                     renamed: Mapping[str, str], name: str) -> list[str]:
    """Why the keys of ``node`` do not fit variant ``name``: keys of other variants (named with their
    owners) and renamed keys. Unknown keys are left to the structured merge (OmegaConf's own error)."""
    cls, problems = variants[name], []
    for key in node:
        if key in own_keys(cls):
            continue
        if key in renamed:
            problems.append(renamed[key])
            continue
        owners = [n for n, c in variants.items() if key in own_keys(c)]
        if owners:
            problems.append(f"{group}.{key} belongs to {group}={'|'.join(owners)}, not {group}={name}")
    return problems


def make_variant(group: str, variants: Mapping[str, type], name: str, renamed: Optional[Mapping[str, str]] = None,
                 **knobs):
    """Python-side construction by name (scripts, tests): ``make_variant("search", SEARCH_VARIANTS,
    "beam", beam_width=2)``, with the same refusals as :func:`to_config`."""
    return _check_variant(group, knobs, variants, renamed or {}, name)(**knobs)


def _check_variant(group: str, node: Mapping[str, Any], variants: Mapping[str, type], renamed: Mapping[str, str],
                   name: Any) -> type:
    if name not in variants:
        raise ValueError(f"{group}.name must be one of {'|'.join(variants)}, got {name!r}")
    problems = variant_problems(group, node, variants, renamed, name)
    if problems:
        raise ValueError("; ".join(problems))
    return variants[name]


def _variant_class(group: str, raw: Any, node: Mapping[str, Any], meta: Mapping[str, Any]) -> type:
    variants = meta["variants"]
    chosen = OmegaConf.get_type(raw) if isinstance(raw, DictConfig) else None  # the group's choice (Hydra)
    chosen_name = next((n for n, c in variants.items() if c is chosen), None)
    name = node.get("name", chosen_name or meta["default"])
    if chosen_name is not None and name in variants and chosen_name != name:
        raise ValueError(f"{group}.name={name!r} contradicts {group}={chosen_name}: choose the variant with "
                         f"{group}={name} ({group}.name only repeats the group's choice)")
    return _check_variant(group, node, variants, meta["renamed"], name)


def fill_variants(cfg: Any) -> None:
    """In a recipe config's ``__post_init__``: an absent variant field becomes its default variant, and a
    present one must be one of its variants."""
    for f in dataclasses.fields(cfg):
        meta = f.metadata
        if "variants" not in meta:
            continue
        value = getattr(cfg, f.name)
        if value is None:
            setattr(cfg, f.name, meta["variants"][meta["default"]]())
        elif type(value) not in meta["variants"].values():
            raise TypeError(f"{f.name} must be one of {', '.join(c.__name__ for c in meta['variants'].values())}, "
                            f"got {type(value).__name__}")


def register_variants(group: str, variants: Mapping[str, type]) -> None:
    """Store each variant as ``<group>/<name>_schema`` (its YAML file's first default), left open: a key of
    another variant then reaches :func:`to_config`, which names the variant it belongs to."""
    cs = ConfigStore.instance()
    for name, cls in variants.items():
        node = OmegaConf.structured(cls)
        OmegaConf.set_struct(node, False)
        cs.store(group=group, name=f"{name}_schema", node=node)


# ---------------------------------------------------------------------- algo=sgrpo | grpo | tspmo

@dataclass
class AlgoConfig(Variant):
    """What every algorithm reads (recipes/train.py): the group size and the clipped policy-gradient update."""

    GROUP: ClassVar[str] = "algo"
    group_size: int = 8  # G completions per prompt
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0  # KL to the base model (adapter disabled); 0 = no reference pass at all
    num_iterations: int = 1  # optimisation passes over each batch of completions
    adv_eps: float = 1e-4  # GRPO / S-GRPO: added to the group reward std; T-SPMO: to its adv_norm std

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"algo.group_size must be >= 2 (advantages are relative within a group), got {self.group_size}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.beta < 0:
            raise ValueError(f"algo.beta must be >= 0, got {self.beta}")
        if self.num_iterations < 1:
            raise ValueError(f"algo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.adv_eps < 0:
            raise ValueError(f"algo.adv_eps must be >= 0, got {self.adv_eps}")


@dataclass
class GroupAdvantageConfig(AlgoConfig):
    """GRPO and S-GRPO: one group-relative advantage per completion (train/advantages.py)."""

    scale_by_std: bool = True  # A = (R - mean) / (std + adv_eps); false: R - mean


@dataclass
class GRPOConfig(GroupAdvantageConfig):
    """Full-token GRPO: every completion token in the loss."""

    name: str = "grpo"


@dataclass
class SGRPOConfig(GroupAdvantageConfig):
    """S-GRPO token selection (train/token_selection.py): the first k_early completion tokens always, later
    ones with probability p_keep·decay^(t-k). The defaults come from scripts/bench_length.py (docs/benchmarks.md,
    "Completion length"): with decay < 1 a row's last selected token comes early and its update is cropped there."""

    name: str = "sgrpo"
    k_early: int = 16
    p_keep: float = 0.5
    decay: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        if self.k_early < 0:
            raise ValueError(f"algo.k_early must be >= 0, got {self.k_early}")
        if not 0.0 <= self.p_keep <= 1.0:
            raise ValueError(f"algo.p_keep must be in [0, 1], got {self.p_keep}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"algo.decay must be in (0, 1], got {self.decay}")


@dataclass
class TSPMOConfig(AlgoConfig):
    """T-SPMO (train/tspmo.py): credit at the branch points of a prefix trie over each group's completions."""

    name: str = "tspmo"
    min_visits: int = 1  # a transition counts only if >= min_visits completions took it
    weighting: str = "unique"  # unique (each transition once, the paper) | visits (once per completion taking it)
    adv_norm: str = "none"  # none | reward_std (per group) | batch_std (over the step's selected tokens)
    max_selected: int = 0  # cap on selected tokens per step, largest |A| kept (0 = no cap)
    replay_samples: int = 0  # extra continuations per group from its highest-|A| prefix (0 = no replay)

    def __post_init__(self):
        super().__post_init__()
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


ALGO_VARIANTS = {"sgrpo": SGRPOConfig, "grpo": GRPOConfig, "tspmo": TSPMOConfig}
ALGOS = tuple(ALGO_VARIANTS)


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
class TrainConfig(TimedRunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algo: Any = variant_field(ALGO_VARIANTS, "sgrpo")  # SGRPOConfig | GRPOConfig | TSPMOConfig, by algo.name
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    max_steps: int = 100
    prompts_per_step: int = 8
    eval_every: int = 0  # steps between held-out evaluations (0 = only before and after)
    eval_before: bool = True
    eval_limit: Optional[int] = None  # held-out problems per evaluation (None = whole split)
    save_every: int = 25
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # "true"/"latest" = newest checkpoint under output_root, or a path
    samples_every: int = 1  # steps between rows written to samples.jsonl (0 = never)
    # exit non-zero when held-out accuracy after training is not above the accuracy before (`make demo`
    # sets it: a demo that did not improve must not look like a success; a plain run just reports)
    require_improvement: bool = False

    def __post_init__(self):
        super().__post_init__()
        fill_variants(self)
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        if self.save_every < 0 or self.eval_every < 0 or self.samples_every < 0:
            raise ValueError("save_every, eval_every and samples_every must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_variants("algo", ALGO_VARIANTS)


def to_config(cfg: DictConfig, schema=TrainConfig) -> Any:
    """Validate a composed Hydra config and return the typed dataclass (runs every ``__post_init__``).

    A variant field (:func:`variant_field`) becomes the dataclass its ``name`` picks, after the check that
    every key set under it belongs to that variant (see the module docstring)."""
    # Merge a plain copy onto a fresh schema: Hydra lets ``+group.key=value`` append a key to a struct
    # config (and a typed merge keeps it); merging plain values is what rejects it, naming the key.
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    target = OmegaConf.structured(schema)
    for f in dataclasses.fields(schema):
        if "variants" not in f.metadata or not isinstance(plain, dict) or not isinstance(plain.get(f.name), dict):
            continue  # absent (or null): __post_init__ fills in the default variant
        raw = cfg.get(f.name) if isinstance(cfg, DictConfig) else None
        target[f.name] = OmegaConf.structured(_variant_class(f.name, raw, plain[f.name], f.metadata))
    merged = OmegaConf.merge(target, plain)
    return OmegaConf.to_object(merged)


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

"""The structured-config machinery every recipe uses (dataclasses registered in Hydra's ConfigStore).

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
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

DEVICES = ("auto", "cpu", "cuda")


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


def to_config(cfg: DictConfig, schema: type) -> Any:
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

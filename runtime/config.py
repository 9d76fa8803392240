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
as one variant would refuse the others), naming the group; the variants are the classes registered in it
(:mod:`frugal.runtime.registry`: ``@register("algo")`` on each dataclass), read when a config is validated.
A group's base sets the key that chooses a variant (``KEY``: ``name`` by default, so ``search=beam``; an
``engine`` base with ``KEY = "backend"`` chooses by ``engine.backend=hf``) and messages name it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from frugal.runtime import registry

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


class Variant:
    """Mixin base of one config group's variants (a dataclass base derives from it and declares the key
    field): the field named ``KEY`` says which variant; each registered subclass sets its own default
    there (the group's YAML file states it again, as its choice)."""

    GROUP: ClassVar[str] = ""  # the config group, for messages: "algo", "search", "engine"
    KEY: ClassVar[str] = "name"  # the field that chooses the variant (``engine``: "backend")

    def __post_init__(self):
        key = self.KEY
        own = type(self).__dataclass_fields__[key].default
        if own is dataclasses.MISSING:
            raise TypeError(f"{type(self).__name__} is the base of the {self.GROUP} variants; use one of them")
        value = getattr(self, key)
        if value != own:
            raise ValueError(f"{self.GROUP}.{key} must be {own!r} in {type(self).__name__}, got {value!r} "
                             f"(choose the variant with {registry.choice(self.GROUP, key, value)})")


def own_keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def variant_field(group: str, default: str, renamed: Optional[Mapping[str, str]] = None):
    """A recipe-schema field holding one of the variants registered in ``group`` (read from the registry
    when a config is validated), ``default`` when absent. ``renamed``: former keys of the group -> the
    message that says where they went."""
    return field(default=None, metadata={"group": group, "default": default, "renamed": dict(renamed or {})})


def variant_problems(group: str, node: Mapping[str, Any], name: str, renamed: Optional[Mapping[str, str]] = None,
                     label: Optional[str] = None) -> list[str]:
    """Why the keys of ``node`` do not fit variant ``name`` of ``group``: keys of other variants (named
    with their owners: ``search.tau belongs to search=early_rejection, not search=beam``) and renamed keys.
    Unknown keys are left to the structured merge (OmegaConf's own error). ``label``: the config key the
    messages name (default: the group; a recipe schema's field name)."""
    variants, key, renamed = registry.variants(group), registry.key(group), renamed or {}
    label = label or group
    cls, problems = variants[name], []
    for k in node:
        if k in own_keys(cls):
            continue
        if k in renamed:
            problems.append(renamed[k])
            continue
        owners = [n for n, c in variants.items() if k in own_keys(c)]
        if owners:
            problems.append(f"{label}.{k} belongs to {registry.choice(label, key, '|'.join(owners))}, "
                            f"not {registry.choice(label, key, name)}")
    return problems


def make_variant(group: str, name: str, renamed: Optional[Mapping[str, str]] = None, **knobs):
    """Python-side construction by name (scripts, tests): ``make_variant("search", "beam", beam_width=2)``,
    with the same refusals as :func:`to_config`."""
    return _check_variant(group, knobs, renamed or {}, name)(**knobs)


def _check_variant(group: str, node: Mapping[str, Any], renamed: Mapping[str, str], name: Any,
                   label: Optional[str] = None) -> type:
    variants = registry.variants(group)
    if name not in variants:
        raise ValueError(f"{label or group}.{registry.key(group)} must be one of "
                         f"{'|'.join(variants) or '(none registered)'}, got {name!r}")
    problems = variant_problems(group, node, name, renamed, label)
    if problems:
        raise ValueError("; ".join(problems))
    return variants[name]


def _variant_class(label: str, raw: Any, node: Mapping[str, Any], meta: Mapping[str, Any]) -> type:
    """The variant class of the recipe-schema field ``label`` (its ``group`` in ``meta``)."""
    variants, key = registry.variants(meta["group"]), registry.key(meta["group"])
    chosen = OmegaConf.get_type(raw) if isinstance(raw, DictConfig) else None  # the group's choice (Hydra)
    chosen_name = next((n for n, c in variants.items() if c is chosen), None)
    name = node.get(key, chosen_name or meta["default"])
    if chosen_name is not None and name in variants and chosen_name != name:
        raise ValueError(f"{label}.{key}={name!r} contradicts {registry.choice(label, key, chosen_name)}: choose "
                         f"the variant with {registry.choice(label, key, name)} ({label}.{key} only repeats the "
                         "group's choice)")
    return _check_variant(meta["group"], node, meta["renamed"], name, label)


def fill_variants(cfg: Any) -> None:
    """In a recipe config's ``__post_init__``: an absent variant field becomes its default variant, and a
    present one must be one of its group's variants."""
    for f in dataclasses.fields(cfg):
        meta = f.metadata
        if "group" not in meta:
            continue
        value, variants = getattr(cfg, f.name), registry.variants(meta["group"])
        if value is None:
            setattr(cfg, f.name, registry.get(meta["group"], meta["default"])())
        elif type(value) not in variants.values():
            raise TypeError(f"{f.name} must be one of {', '.join(c.__name__ for c in variants.values())}, "
                            f"got {type(value).__name__}")


def register_variants(group: str) -> None:
    """Store each variant registered in ``group`` as ``<group>/<name>_schema`` (its YAML file's first
    default), left open: a key of another variant then reaches :func:`to_config`, which names the variant
    it belongs to. A variant registered later needs this called again to be composed by Hydra."""
    cs = ConfigStore.instance()
    for name, cls in registry.variants(group).items():
        node = OmegaConf.structured(cls)
        OmegaConf.set_struct(node, False)
        cs.store(group=group, name=f"{name}_schema", node=node)
        registry.stored(group, name)


def store_open_choice(group: str, default: str) -> None:
    """Store ``<group>/default`` as an open node ``{<key>: default}`` for a group chosen by a key rather
    than by a YAML file (``engine.backend=vllm``): Hydra then composes ``<group>.<key>=...`` and any
    backend's knob, and :func:`to_config` picks the variant and refuses another's knob by name."""
    key = registry.key(group)
    node = OmegaConf.create({key: default})
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(group=group, name="default", node=node)


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


def to_config(cfg: DictConfig, schema: Optional[type] = None) -> Any:
    """Validate a composed Hydra config and return the typed dataclass (runs every ``__post_init__``).
    ``schema``: the recipe's config dataclass (default: the one the composed config is typed as, i.e. the
    ``<recipe>_schema`` its primary YAML file extends).

    A variant field (:func:`variant_field`) becomes the dataclass its key (``name``) picks, after the check
    that every key set under it belongs to that variant (see the module docstring)."""
    if schema is None:
        schema = OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None
        if not dataclasses.is_dataclass(schema):
            raise TypeError("to_config: name the recipe's config dataclass (the composed config is not typed)")
    # Merge a plain copy onto a fresh schema: Hydra lets ``+group.key=value`` append a key to a struct
    # config (and a typed merge keeps it); merging plain values is what rejects it, naming the key.
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    refuse_renamed(_dotted_keys(plain), getattr(schema, "RENAMED", {}))
    target = OmegaConf.structured(schema)
    for f in dataclasses.fields(schema):
        if "group" not in f.metadata or not isinstance(plain, dict) or not isinstance(plain.get(f.name), dict):
            continue  # absent (or null): __post_init__ fills in the default variant
        raw = cfg.get(f.name) if isinstance(cfg, DictConfig) else None
        target[f.name] = OmegaConf.structured(_variant_class(f.name, raw, plain[f.name], f.metadata))
    merged = OmegaConf.merge(target, plain)
    return OmegaConf.to_object(merged)


def refuse_renamed(keys, renamed: Mapping[str, str]) -> None:
    """Refuse a setting by its former name (``renamed``: old dotted key -> new one), naming the new one.
    :func:`to_config` checks a config's keys; ``frugal <recipe>`` checks its command line before Hydra
    composes (where an unknown key would get Hydra's message, which cannot name the new key)."""
    old = [k for k in keys if k in renamed]
    if old:
        raise ValueError("; ".join(f"{k} is now {renamed[k]}" for k in old))


def override_keys(overrides) -> list[str]:
    """The dotted keys of Hydra command-line overrides (``key=value``, ``+key=value``, ``~key``)."""
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides if not o.startswith("-")]


def _dotted_keys(node, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    out = []
    for k, v in node.items():
        out.append(f"{prefix}{k}")
        out += _dotted_keys(v, f"{prefix}{k}.")
    return out

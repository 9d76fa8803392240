"""One registry for what a config chooses by name: the variants of a config group (``algo=``, ``search=``,
``engine.backend=``) and other named parts (the Hub PRM families, ``prm_family=``).

Registering is a class decorator, next to the class, in the module that defines it::

    @register("search")
    @dataclass
    class BeamConfig(PRMSearchConfig):
        name: str = "beam"
        beam_width: int = 4

An entry's name is its value of the group's discriminator: the class attribute ``KEY`` names that key
(``"name"`` unless the group's base sets another, e.g. ``KEY = "backend"`` for ``engine.backend=hf|vllm``),
and the entry's default for it is its name (``BeamConfig.name`` → ``"beam"``). A class without ``KEY``
(a PRM family) is named by its ``name`` attribute.

Lookups: :func:`variants` (name -> class, in registration order: the order messages list the choices
in), :func:`names`, :func:`get` (an unknown name is refused, listing the choices) and :func:`view` (a live
read-only mapping, for module-level tables such as ``SEARCH_VARIANTS``). A group whose entries live in
modules nothing else imports names them with :func:`discover`: the first lookup imports them (the search
strategies: ``frugal.evaluator.strategies``, which imports each of its modules). A recipe schema's
variant field (:func:`frugal.runtime.config.variant_field`) names its group and reads the registry when a
config is validated, so an entry registered after the schema was defined (a user's strategy, a test's
toy) is accepted like a built-in one.

:func:`unregister` and :func:`scope` undo registrations (tests): ``with scope(): @register("search") …``
leaves the registry, and the Hydra ConfigStore entries :func:`frugal.runtime.config.register_variants`
made for them, as they were.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

_entries: dict[str, dict[str, Any]] = {}  # group -> name -> class, in registration order
_pending: dict[str, list[str]] = {}  # group -> modules to import before its first lookup
_loading: set[str] = set()
_stored: dict[str, set[str]] = {}  # group -> names stored in Hydra's ConfigStore (register_variants)


def name_of(cls) -> str:
    """The name ``cls`` registers under: its default of its ``KEY`` (``name`` when it has no ``KEY``)."""
    key = getattr(cls, "KEY", "name")
    value = getattr(cls, key, None)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{getattr(cls, '__name__', cls)} has no default {key!r} to register under "
                        f"(a group's base is not registered; each variant sets its own {key})")
    return value


def register(group: str, name: Optional[str] = None) -> Callable:
    """Class decorator: register the class in ``group`` under ``name`` (default: :func:`name_of`).
    Registering another class under a taken name is refused; the same class again (a module reloaded)
    replaces it in place."""

    def decorate(cls):
        entry = name or name_of(cls)
        own_group = getattr(cls, "GROUP", group) or group
        if own_group != group:
            raise ValueError(f"{cls.__name__} belongs to group {own_group!r} (its GROUP), not {group!r}")
        entries = _entries.setdefault(group, {})
        if entries:
            first = next(iter(entries.values()))
            if getattr(first, "KEY", "name") != getattr(cls, "KEY", "name"):
                raise ValueError(f"{cls.__name__}: group {group!r} is chosen by {getattr(first, 'KEY', 'name')!r}, "
                                 f"not {getattr(cls, 'KEY', 'name')!r}")
        old = entries.get(entry)
        if old is not None and old is not cls and _where(old) != _where(cls):
            raise ValueError(f"{_choice(group, cls, entry)} is already registered by {_where(old)}; "
                             f"{_where(cls)} must take another name")
        entries[entry] = cls
        return cls

    return decorate


def unregister(group: str, name: str) -> None:
    """Forget ``name`` in ``group`` (and its ``<group>/<name>_schema`` in Hydra's ConfigStore, if stored)."""
    _entries.get(group, {}).pop(name, None)
    if name in _stored.get(group, set()):
        _stored[group].discard(name)
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().repo.get(group, {}).pop(f"{name}_schema.yaml", None)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Registrations made inside the block are undone when it ends (and ones it replaced restored) —
    except those of Frugal's own modules imported for the first time inside it (a recipe imported lazily
    registers its built-ins once: they must stay)."""
    for group in list(_pending):
        _load(group)
    saved = {group: dict(entries) for group, entries in _entries.items()}
    imported = set(sys.modules)
    try:
        yield
    finally:
        for group, entries in list(_entries.items()):
            for entry, cls in list(entries.items()):
                if saved.get(group, {}).get(entry) is cls:
                    continue
                module = getattr(cls, "__module__", "")
                if module.startswith("frugal.") and module not in imported:
                    saved.setdefault(group, {})[entry] = cls  # a built-in, first imported in the block
                    continue
                unregister(group, entry)
        for group, entries in saved.items():
            _entries[group] = entries


def discover(group: str, module: str) -> None:
    """Import ``module`` (whose import registers entries of ``group``) before the group's first lookup."""
    if module not in _pending.setdefault(group, []):
        _pending[group].append(module)


def variants(group: str) -> dict[str, Any]:
    """``group``'s entries, name -> class, in registration order (a copy)."""
    _load(group)
    return dict(_entries.get(group, {}))


def names(group: str) -> tuple[str, ...]:
    return tuple(variants(group))


def get(group: str, name: str):
    """The entry ``name`` of ``group``; an unknown name is refused, listing the choices."""
    entries = variants(group)
    if name not in entries:
        label = f"{group}.{key(group)}" if any(hasattr(c, "KEY") for c in entries.values()) else group
        raise ValueError(f"{label} must be one of {'|'.join(entries) or '(none registered)'}, got {name!r}")
    return entries[name]


def key(group: str) -> str:
    """The key that chooses ``group``'s variant (``name`` unless the group's base sets ``KEY``)."""
    entries = variants(group)
    return getattr(next(iter(entries.values())), "KEY", "name") if entries else "name"


def choice(group: str, key_name: str, value: str) -> str:
    """How a choice is written on the command line: ``search=beam``, ``engine.backend=vllm``."""
    return f"{group}={value}" if key_name == "name" else f"{group}.{key_name}={value}"


def view(group: str, value: Optional[Callable[[Any], Any]] = None) -> "View":
    """A live read-only mapping name -> ``value(class)`` over ``group`` (``value``: the class itself by
    default), for module-level tables: ``SEARCH_VARIANTS = view("search")``."""
    return View(group, value)


class View(Mapping):
    """See :func:`view`."""

    def __init__(self, group: str, value: Optional[Callable[[Any], Any]] = None):
        self.group, self.value = group, value

    def __getitem__(self, name: str):
        entries = variants(self.group)
        if name not in entries:
            raise KeyError(name)
        return entries[name] if self.value is None else self.value(entries[name])

    def __iter__(self):
        return iter(variants(self.group))

    def __len__(self) -> int:
        return len(variants(self.group))

    def __repr__(self) -> str:
        return f"View({self.group!r}: {'|'.join(self)})"


def stored(group: str, name: str) -> None:
    """Note that ``<group>/<name>_schema`` was stored in Hydra's ConfigStore (:func:`unregister` drops it)."""
    _stored.setdefault(group, set()).add(name)


def _load(group: str) -> None:
    for module in list(_pending.get(group, ())):
        if module in _loading:  # looked up while that module is being imported: what is registered so far
            continue
        _loading.add(module)
        try:
            importlib.import_module(module)
        finally:
            _loading.discard(module)
        _pending[group].remove(module)


def _where(cls) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"


def _choice(group: str, cls, name: str) -> str:
    return choice(group, getattr(cls, "KEY", "name"), name)

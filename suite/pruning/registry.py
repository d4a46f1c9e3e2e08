"""Method name -> Pruner class.

A method registers itself where it is written (`@registry.register` on its Pruner class), so a
new method is one file: Hyperflux in suite/pruning/hyperflux.py, every baseline in
baselines/<family>.py (each module of that package is imported on first use). Methods from
outside the repository come in as plugins:
  - a sweep's `plugins:` list (a .py file, relative to the sweep file, or an importable module),
    carried into each run's config so a SLURM task imports it too;
  - the `hfbench.pruners` entry-point group of an installed package;
  - HFBENCH_PLUGINS, paths or modules separated by os.pathsep.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from suite.pruning.base import Pruner
    from suite.schema import Strict

CONTROL = "dense"  # the dense control every method is compared with (not a pruning method)
BUILTIN = ("suite.pruning.hyperflux", "baselines")  # modules, or packages whose modules are all imported

_METHODS: dict[str, type[Pruner]] = {}
_LOADED: set[str] = set()  # plugin specs already imported
_READY = False


class PluginError(ValueError):
    """A plugin could not be imported or registers something invalid."""


_FAILED: PluginError | None = None


_PrunerClass = TypeVar("_PrunerClass", bound="type[Pruner]")


def register(cls: _PrunerClass) -> _PrunerClass:
    """Class decorator: make a Pruner subclass available by its `name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "base":
        raise PluginError(f"{cls.__module__}.{cls.__qualname__}: a registered method needs a class attribute `name`")
    old = _METHODS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise PluginError(
            f"method {name!r} is registered twice: {old.__module__}.{old.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    opts = getattr(cls, "options", None)
    sec = getattr(cls, "section", None)
    if (opts is None) != (sec is None):
        raise PluginError(f"method {name!r}: declare both `section` and `options` (its pydantic model), or neither")
    _METHODS[name] = cls
    try:
        _check_sections()
    except PluginError:
        del _METHODS[name]
        raise
    return cls


def own_variants(cls: type[Pruner]) -> dict[str, dict[str, Any]]:
    """The variants a class declares itself (a subclass of a built-in does not inherit its names)."""
    return cast("dict[str, dict[str, Any]]", vars(cls).get("variants", {}))


def _check_sections() -> None:
    from pydantic import BaseModel

    from suite.config import _CORE_FIELDS, RunConfig  # a section must not shadow a run field or method

    seen: dict[str, Any] = {}
    labels: dict[str, str] = {}  # variant name -> its method
    for name, cls in _METHODS.items():
        for v in own_variants(cls):
            if labels.setdefault(v, name) != name or v in _METHODS:
                raise PluginError(f"method {name!r}: variant {v!r} is already a method or another method's variant")
        if name in labels and labels[name] != name:
            raise PluginError(f"method {name!r}: the name is already a variant of {labels[name]!r}")
        if cls.section is None:
            continue
        sec = cls.section
        if (
            not (isinstance(sec, str) and sec.isidentifier())
            or sec.startswith(("_", "model_"))
            or sec in _CORE_FIELDS
            or (hasattr(RunConfig, sec) and sec not in RunConfig.model_fields)
        ):
            raise PluginError(
                f"method {name!r}: section {sec!r} is not a free name for a run config section "
                f"(a Python identifier, not a field or method of every run); choose another"
            )
        if not (isinstance(cls.options, type) and issubclass(cls.options, BaseModel)):
            raise PluginError(f"method {name!r}: `options` must be a pydantic model class (suite.schema.Strict)")
        if seen.setdefault(sec, cls.options) is not cls.options:
            raise PluginError(f"method {name!r}: section {sec!r} is already declared with another model")


def _ensure() -> None:
    """Import the built-in methods, the entry points and HFBENCH_PLUGINS once. A failure is kept and
    raised again on every later use: a registry without the failed plugin (and those after it) is
    never handed out as if it were complete."""
    global _READY, _FAILED
    if _FAILED is not None:
        raise _FAILED
    if _READY:
        return
    _READY = True  # re-entrancy guard: a module imported below may use the registry
    try:
        for mod in BUILTIN:
            m = importlib.import_module(mod)
            if hasattr(m, "__path__"):  # a package: every module in it
                for info in sorted(pkgutil.iter_modules(m.__path__), key=lambda i: i.name):
                    importlib.import_module(f"{mod}.{info.name}")
        for ep in metadata.entry_points(group="hfbench.pruners"):
            if ep.value not in _LOADED:
                try:
                    ep.load()
                except PluginError as e:
                    raise PluginError(f"entry point {ep.name} = {ep.value} (group hfbench.pruners): {e}") from e
                except Exception as e:  # noqa: BLE001 - named, with the package it came from
                    raise PluginError(
                        f"entry point {ep.name} = {ep.value} (group hfbench.pruners): {type(e).__name__}: {e}"
                    ) from e
                _LOADED.add(ep.value)
        env = os.environ.get("HFBENCH_PLUGINS", "")
        _load([p for p in env.split(os.pathsep) if p], where="HFBENCH_PLUGINS")
    except PluginError as e:
        _FAILED = e
        raise
    except Exception as e:  # a built-in module that does not import: named, and kept
        _FAILED = PluginError(f"the built-in methods failed to import: {type(e).__name__}: {e}")
        raise _FAILED from e


def load_plugins(specs: list[str], where: str = "plugins") -> None:
    """Import each plugin: a path to a .py file (absolute, or relative to the working directory)
    or a module name. Importing it registers its methods. Idempotent."""
    _ensure()
    _load(specs, where)


def _load(specs: list[str], where: str) -> None:
    for spec in specs:
        try:
            key = str(Path(spec).resolve()) if spec.endswith(".py") else spec
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
            raise PluginError(f"{where}: plugin path {spec!r} cannot be resolved: {e}") from e
        if key in _LOADED:
            continue
        before = set(_METHODS)
        try:
            if spec.endswith(".py"):
                path = Path(key)
                if not path.is_file():
                    raise PluginError("no such file")
                modname = "hfbench_plugin_" + hashlib.sha256(key.encode()).hexdigest()[:10]
                module_spec = importlib.util.spec_from_file_location(modname, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[modname] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(modname, None)
                    raise
            else:
                importlib.import_module(spec)
        except PluginError as e:
            for name in set(_METHODS) - before:  # nothing half-registered stays behind
                del _METHODS[name]
            raise PluginError(f"{where}: plugin {spec!r}: {e}") from e
        except Exception as e:  # noqa: BLE001 - a plugin's own error, named with the plugin
            for name in set(_METHODS) - before:
                del _METHODS[name]
            raise PluginError(f"{where}: plugin {spec!r} failed to import: {type(e).__name__}: {e}") from e
        _LOADED.add(key)


def names() -> list[str]:
    _ensure()
    return sorted(_METHODS)


def pruning_names() -> list[str]:
    """Every method but the dense control."""
    return [n for n in names() if n != CONTROL]


def get(name: str) -> type[Pruner]:
    _ensure()
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}")
    return _METHODS[name]


def sections() -> dict[str, type[Strict]]:
    """Config section name -> its pydantic model, over every registered method."""
    _ensure()
    # register() refuses a section without its model, so `options` is set wherever `section` is
    return {cls.section: cast("type[Strict]", cls.options) for cls in _METHODS.values() if cls.section is not None}


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Variant name -> (its method, the run fields that make it)."""
    _ensure()
    return {v: (name, preset) for name, cls in sorted(_METHODS.items()) for v, preset in own_variants(cls).items()}


def family(label: str) -> str:
    """The registered method of a report label: a method, one of its variants or a label its
    `variant()` produces (<method>-<suffix>); '' when none."""
    _ensure()
    if label in _METHODS:
        return label
    v = variants().get(label)
    if v:
        return v[0]
    best = ""
    for name in _METHODS:  # the longest method name the label starts with
        if label.startswith(name + "-") and len(name) > len(best):
            best = name
    return best

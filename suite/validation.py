"""Reading and checking configuration files: YAML without duplicate keys or shared anchors,
paths and names that are safe to use as folders, tracking URIs, and pydantic errors rewritten
as one line per field at the place it was written (with a did-you-mean). Used by the run
configuration (suite/config.py) and the sweep configuration (suite/sweeps.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from suite.schema import did_you_mean


class ConfigError(ValueError):
    """A configuration was rejected. The message names the file and the field."""


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


MAX_CONFIG_NODES = 200_000


def _unshared(data: Any, where: str) -> Any:
    """A copy in which no mapping or list is shared: YAML aliases (&a / *a) become separate
    copies, so a `--set` on one place cannot change another. A document whose aliases expand to
    more than MAX_CONFIG_NODES values (an alias bomb) is refused instead of expanded."""
    count = [0]

    def walk(v: Any) -> Any:
        count[0] += 1
        if count[0] > MAX_CONFIG_NODES:
            raise ConfigError(
                f"{where}: the config expands to more than {MAX_CONFIG_NODES:,} values (nested YAML aliases?); refused"
            )
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(data)


# --------------------------------------------------------------------------- safe names and paths

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def _tracking_uri(v: Optional[str], what: str) -> Optional[str]:
    """A tracking URI MLflow can use as a store: one of its schemes, or an absolute path."""
    if v is None:
        return v
    _no_control(v, what)
    scheme = v.split(":", 1)[0].split("+", 1)[0].lower() if ":" in v else ""
    if not (scheme in TRACKING_SCHEMES or v.startswith("/")):
        raise ValueError(
            f"{what}: {v!r} is not a tracking store MLflow can use (schemes: "
            f"{', '.join(TRACKING_SCHEMES)}; e.g. http://host:5000 or sqlite:////path/mlflow.db)"
        )
    if scheme == "sqlite" and v.startswith("sqlite:///"):
        db = Path(v[len("sqlite:///") :].split("?", 1)[0])
        if db.is_dir():
            raise ValueError(f"{what}: {v!r} names a folder, not a database file (e.g. sqlite:///{db / 'mlflow.db'})")
    return v


def _no_control(v: str, what: str) -> str:
    """Refuse NUL, newlines and other control characters (they end up in file names, sbatch
    scripts and log lines)."""
    import unicodedata

    bad = [c for c in v if unicodedata.category(c) in ("Cc", "Zl", "Zp")]  # C0, DEL, C1 (\x85, \x9b), U+2028/9
    if bad:
        raise ValueError(f"{what} must not contain control characters (found {bad[0]!r})")
    return v


def safe_path(v: Optional[str], what: str = "path") -> Optional[str]:
    """A path from a config: no control characters, and a relative path may not climb out of
    the working directory with '..' (give an absolute path to write elsewhere on purpose)."""
    if v is None:
        return v
    _no_control(v, what)
    if not v.strip():
        raise ValueError(f"{what} must not be empty")
    if v.startswith("~"):  # expanded by some tools (submitit) and not by others: ambiguous
        raise ValueError(f"{what} {v!r}: '~' is not expanded consistently; write the absolute path")
    if not Path(v).is_absolute() and ".." in Path(v).parts:
        raise ValueError(
            f"{what} {v!r}: a relative path must not contain '..' "
            "(use an absolute path to write outside the working directory)"
        )
    return v


def safe_component(v: str, what: str = "name") -> str:
    """A string that becomes one path component (a folder name): no '/', '\\', NUL/control
    characters, and not '.' or '..'."""
    _no_control(v, what)
    if v in (".", "..") or "/" in v or "\\" in v:
        raise ValueError(f"{what} {v!r} must be a single folder name (no '/', not '.' or '..')")
    return v


def _plain(v: Any, where: str) -> None:
    """Values of free-form sections (base, overrides, grid.params) must be plain YAML data:
    mappings with string keys, lists, strings, numbers, booleans, null. A YAML date or
    !!binary would otherwise fail deep inside the sweep's expansion."""
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} must be a string")
            _plain(x, f"{where}.{k}")
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _plain(x, f"{where}[{i}]")
    elif isinstance(v, float) and not math.isfinite(v):
        return  # refused (or accepted) by the field it lands in
    elif v is not None and not isinstance(v, (str, int, float, bool)):
        raise ValueError(
            f"{where}: a value of type {type(v).__name__} is not allowed here "
            f"(got {v!r}; quote it if it is meant as text)"
        )


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge src into dst; nested mappings are merged, not replaced."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = _deep_copy(v) if isinstance(v, dict) else v


# --------------------------------------------------------------------------- loading
def _unknown_keys(d: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Keys of `d` that `model` (and its nested sections) does not have, each with its dotted
    place and the closest known key: a typo is named where it was written."""
    out: list[str] = []
    if not isinstance(d, dict):
        return out
    fields = model.model_fields
    for k, v in d.items():
        if k not in fields:
            out.append(f"{prefix}.{k}: unknown key{did_you_mean(k, fields)}")
            continue
        ann = fields[k].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_unknown_keys(v, ann, f"{prefix}.{k}"))
    return out


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _model_at(model: Any, loc: tuple) -> Any:
    """The pydantic model class that holds the field at `loc` (None past a dict or list)."""
    for part in loc[:-1]:
        f = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        ann = getattr(f, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _format_errors(err: ValidationError, where: Any = "", model: Any = None) -> str:
    """One line per error at its dotted place; `where` is a prefix, or a function of the error's
    location that gives it (a run's field may come from base or from its method's overrides)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        w = where(e["loc"]) if callable(where) else where
        if w:
            loc = f"{w}.{loc}" if e["loc"] else w
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            holder = _model_at(model, tuple(e["loc"])) if model is not None else None
            if holder is not None and e["loc"]:
                msg += did_you_mean(e["loc"][-1], holder.model_fields)
        elif e["type"] == "missing":
            msg = "required field missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if e["type"] == "value_error" and not e["loc"] and not where:
            lines.append(f"  {msg}")  # a whole-config check: its message names the field
        elif e["type"] == "missing" or (e["type"] == "value_error" and not e["loc"]):
            lines.append(f"  {loc}: {msg}")
        else:
            lines.append(f"  {loc}: {msg} (got {_short(e.get('input'))})")
    return "\n".join(lines)


def _validate(model: type[BaseModel], data: Any, where: Any = "", source: str = "config"):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid {model.__name__}:\n{_format_errors(err, where, model)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error naming its line
    (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:  # ValueError: e.g. a date 2020-13-45
        raise ConfigError(f"{p}: not valid YAML: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b'] for 'a.b', creating mappings on the way (for CLI overrides)."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value

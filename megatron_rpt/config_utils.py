"""Typed dataclass configs: dotted overrides, YAML load/dump, field docs, validation helpers.

Every component defines one ``@dataclass(kw_only=True)`` next to its code, with a docstring
string literal under each field (as torchtitan does). This module knows nothing about the
components: it walks any dataclass tree. ``megatron_rpt/config.py`` assembles the tree.

Overrides use ``a.b=value`` strings. The value is converted to the field's declared type:

>>> from megatron_rpt.config import RPTConfig
>>> cfg = apply_overrides(RPTConfig(), ["data.entropy_threshold=0.75", "run.seed=7",
...                                     "data.max_documents=none"])
>>> cfg.data.entropy_threshold, cfg.run.seed, cfg.data.max_documents
(0.75, 7, None)
>>> apply_overrides(RPTConfig(), ["data.entropy_treshold=1"])
Traceback (most recent call last):
...
megatron_rpt.errors.ConfigError: unknown config key 'data.entropy_treshold' (did you mean 'data.entropy_threshold'?)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, Union

import yaml

from megatron_rpt.errors import ConfigError
from megatron_rpt.fileio import atomic_write_text


class ConfigTree(Protocol):
    """Any dataclass instance: ``RPTConfig``, one of its sections, or a tool's own config.

    These helpers walk fields generically and know no component (the config layer must not
    import the components' configs), so a structural type is as precise as they can be.
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


T = TypeVar("T", bound=ConfigTree)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", "~"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field.

    Python drops these at run time, so they are read back from the source with ``ast``. Used for
    CLI help and ``describe``; missing source (e.g. a frozen app) gives empty docs.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + "|".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def convert_value(raw: Any, tp: Any, key: str) -> Any:
    """Convert ``raw`` (a string from the CLI, or a YAML scalar/list/dict) to type ``tp``.

    Raises ConfigError naming ``key`` when the value does not fit the type.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return raw
    if origin in (Union, types.UnionType):
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in _NONE)):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert_value(raw, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: cannot read {raw!r} as {_type_name(tp)}")
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and raw == str(choice)):
                return choice
        raise ConfigError(f"{key}: {raw!r} is not one of {list(args)}")
    if origin in (list, tuple) or tp in (list, tuple):
        items = raw
        if isinstance(raw, str):
            items = yaml.safe_load(raw) if raw.strip().startswith("[") else raw.split(",")
            items = [] if items is None else items
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {raw!r}")
        elem = args[0] if args else Any
        out = [convert_value(v, elem, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        val = yaml.safe_load(raw) if isinstance(raw, str) else raw
        if val is None:
            return {}
        if not isinstance(val, dict):
            raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
        return dict(val)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ConfigError(f"{key}: expected true/false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        try:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if tp is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
        return value
    if tp is str:
        if isinstance(raw, str | int | float) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    if tp is Path:
        return Path(raw)
    if dataclasses.is_dataclass(tp):
        if isinstance(raw, tp):
            return raw
        if isinstance(raw, str):
            raw = yaml.safe_load(raw)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {raw!r}")
        return update_from_dict(tp(), raw, prefix=key)
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _unknown_key(cfg: ConfigTree, name: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cfg)]
    full = f"{prefix}{name}"
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint}")


def set_by_path(cfg: ConfigTree, dotted: str, raw: Any) -> None:
    """Set ``cfg.a.b.c = convert(raw)`` in place; errors name the full dotted key."""
    parts = dotted.split(".")
    node = cfg
    for i, name in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if not dataclasses.is_dataclass(node) or name not in {
            f.name for f in dataclasses.fields(node)
        }:
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"config key '{dotted}': '{prefix[:-1]}' is not a section")
            raise _unknown_key(node, name, prefix)
        if i == len(parts) - 1:
            tp = _hints(type(node))[name]
            setattr(node, name, convert_value(raw, tp, dotted))
        else:
            node = getattr(node, name)


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """Apply ``["a.b=value", ...]`` to ``cfg`` in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        set_by_path(cfg, key.strip(), value)
    return cfg


def update_from_dict(cfg: T, data: Mapping[str, Any], prefix: str = "") -> T:
    """Recursively update ``cfg`` from a nested mapping (e.g. loaded YAML); unknown keys raise."""
    for name, value in data.items():
        if name not in {f.name for f in dataclasses.fields(cfg)}:
            raise _unknown_key(cfg, name, f"{prefix}." if prefix else "")
        key = f"{prefix}.{name}" if prefix else name
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            update_from_dict(current, value, key)
        else:
            setattr(cfg, name, convert_value(value, _hints(type(cfg))[name], key))
    return cfg


def to_dict(cfg: ConfigTree) -> dict[str, Any]:
    """Plain nested dict (Paths and tuples made YAML-friendly)."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return clean(dataclasses.asdict(cfg))


def dump_yaml(cfg: ConfigTree, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(cfg: T, path: str | Path) -> T:
    """Update ``cfg`` from a YAML file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return update_from_dict(cfg, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def describe(cfg: ConfigTree, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (dotted key, type, current value, doc) for every leaf field."""
    rows = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows.extend(describe(value, key + "."))
        else:
            rows.append(
                (key, _type_name(_hints(type(cfg))[f.name]), repr(value), docs.get(f.name, ""))
            )
    return rows


def format_description(cfg: ConfigTree) -> str:
    """Human-readable listing of every key, for ``--help-config``."""
    lines = []
    for key, tp, value, doc in describe(cfg):
        lines.append(f"  {key} ({tp}) = {value}")
        if doc:
            lines.extend("      " + line for line in textwrap.wrap(doc, 88))
    return "\n".join(lines)

"""Typed config machinery: YAML + dotted overrides -> frozen dataclasses, every error at once.

    cfg = load(PipelineConfig, "configs/tiny.yaml", ["pretrain.lr=3e-4", "ingest.sources=[a.jsonl]"])

The schema is plain frozen dataclasses whose fields carry a docstring (a string literal right
below the field, read with `field_docs`). Values from YAML and from `--set` are checked against the
annotations (int, float, bool, str, Literal, Optional, tuple[...], dict[str, ...], nested dataclass);
unknown keys get the nearest valid key suggested. Nothing here knows any one stage.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """All problems found in a config, each as `key.path: message`."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"{len(errors)} problem(s) in {source}:\n{lines}")


def load(schema: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read a YAML preset, apply `key.path=value` overrides, build and validate `schema`."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError([f"config file not found: {path}"], source) from None
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(["the top level must be a mapping of sections"], source)
    errors: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            errors.append(f"--set {item!r}: expected KEY=VALUE, e.g. pretrain.lr=3e-4")
            continue
        _set_dotted(raw, key.strip(), _parse_scalar(value), errors)
    cfg = _build(schema, raw, "", errors)
    errors.extend(_check_tree(cfg, "", tuple(errors)))
    if errors:
        if overrides:
            source += " with --set " + " ".join(overrides)
        raise ConfigError(errors, source)
    return cfg


def to_dict(cfg: Any) -> Any:
    """JSON-ready plain data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (attribute docstrings), its bases' included."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
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


def all_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema (for suggestions and docs)."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], key + "."))
        else:
            keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------------
# building


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 3 -> int, 3e-4 -> float, true -> bool, [a,b] -> list."""
    text = text.strip()
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    # YAML reads 3e-4 as a string (it wants 3.0e-4); users type the former.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


def _set_dotted(raw: dict, key: str, value: Any, errors: list[str]) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            errors.append(f"{key}: '{part}' is a value, not a section")
            return
        node = child
    node[parts[-1]] = value


def _build(schema: type, raw: Any, path: str, errors: list[str], root: type | None = None) -> Any:
    root = root or schema
    if not isinstance(raw, dict):
        errors.append(f"{path.rstrip('.') or '<top>'}: expected a section (mapping), got {raw!r}")
        return None
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            hint = _suggest(str(key), path, list(fields), all_keys(root))
            valid = ", ".join(sorted(fields))
            errors.append(f"{path}{key}: unknown key{hint} (valid keys here: {valid})")
    values = {}
    for name, f in fields.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw.get(name, {}), f"{path}{name}.", errors, root)
        elif name in raw:
            values[name] = _coerce(raw[name], tp, f"{path}{name}", errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}{name}: required, no default")
    try:
        return schema(**{k: v for k, v in values.items() if v is not _BAD})
    except TypeError:
        return None


def _suggest(key: str, path: str, here: list[str], every: list[str]) -> str:
    """'; did you mean ...?' for an unknown key: the same name in another section (a key from the
    wrong section), else a close name in this section, else a close name anywhere."""
    elsewhere = [k for k in every if k.rpartition(".")[2] == key and not (path and k.startswith(path))]
    near = [path + n for n in difflib.get_close_matches(key, here, n=1, cutoff=0.6)]
    if not (elsewhere or near):
        leaves = {}
        for k in every:
            leaves.setdefault(k.rpartition(".")[2], k)
        near = [leaves[n] for n in difflib.get_close_matches(key, list(leaves), n=1, cutoff=0.6)]
    found = elsewhere or near
    return f"; did you mean '{found[0]}'?" if found else ""


_BAD = object()


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for option in options:
            out = _coerce(value, option, key, sub)
            if out is not _BAD:
                return out
        errors.append(sub[0] if len(options) == 1 else f"{key}: {value!r} is none of {_name(tp)}")
        return _BAD
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        errors.append(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return _BAD
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single source is a list of one
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key}: expected a list, got {value!r}")
            return _BAD
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return _BAD if _BAD in items else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {value!r}")
            return _BAD
        out = {str(k): _coerce(v, args[1], f"{key}.{k}", errors) for k, v in value.items()}
        return _BAD if _BAD in out.values() else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key}: expected true or false, got {value!r}")
        return _BAD
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(f"{key}: expected an integer, got {value!r}")
        return _BAD
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{key}: expected a number, got {value!r}")
        return _BAD
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key}: expected a string, got {value!r}")
        return _BAD
    raise TypeError(f"{key}: unsupported annotation {tp!r} in the config schema")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_tree(cfg: Any, path: str, build_errors: tuple[str, ...]) -> list[str]:
    """Run each section's `check()` (cross-field and range rules), children first, so that they are
    reported together with the build errors; but not in a section with a build error in it (an unknown
    key, a bad value, in it or in a section inside it): its check() would judge the default that
    stands in for the user's value and report nonsense. Errors start with their key path, which tells
    whose they are."""
    if not dataclasses.is_dataclass(cfg):
        return []  # a section that could not be built at all
    errors = []
    for f in dataclasses.fields(cfg):
        errors.extend(_check_tree(getattr(cfg, f.name), f"{path}{f.name}.", build_errors))
    if hasattr(cfg, "check") and not any(e.startswith(path) for e in build_errors):
        errors.extend(f"{path}{msg}" for msg in cfg.check())
    return errors

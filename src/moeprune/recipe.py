"""Recipes: a YAML file holding the settings of one one-shot run (`moeprune run recipe.yaml`).

Keys (the options of `moeprune prune MODEL --data ...`)::

    model: path/to/model          # required: a model folder or a cached hub id
    data: [demos.jsonl]           # required: calibration files (a single string works too)
    method: mone                  # optional (default mone, docs/methods.md)
    keep: 0.5                     # required: a count or a fraction
    out: pruned/                  # required: the output folder
    self_generate: 0              # optional, and: scope, mode, eval (list), eval_limit,
                                  # max_length, seed, top_k, force, pad_uniform

Relative paths (model, data, out, eval task files) are relative to the recipe file's folder.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import read_yaml
from .oneshot import OneShot
from .score import DEFAULT_METHOD

REQUIRED = ("model", "data", "keep", "out")
_INT = ("self_generate", "eval_limit", "max_length", "seed", "top_k")
_BOOL = ("force", "pad_uniform")
_STR = ("method", "scope", "mode")


def keys() -> list[str]:
    return [f.name for f in fields(OneShot)]


def load_recipe(path: str | Path) -> OneShot:
    """Read and check a recipe file; any problem is a one-line :class:`UserError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"recipe '{path}' does not exist", "pass the path of a recipe YAML file")
    raw = read_yaml(path, "recipe", "fix the file")
    return parse_recipe(raw, base=path.resolve().parent, name=str(path))


def parse_recipe(raw: Any, *, base: Path, name: str = "recipe") -> OneShot:
    """A recipe mapping -> :class:`OneShot`, relative paths resolved against ``base``."""
    if not isinstance(raw, dict):
        raise UserError(
            f"{name} is not a mapping of settings", f"write 'key: value' lines ({', '.join(REQUIRED)})"
        )
    allowed = keys()
    unknown = [str(k) for k in raw if k not in allowed]
    if unknown:
        raise UserError(f"{name} has unknown key(s): {', '.join(unknown)}", f"use only {', '.join(allowed)}")
    missing = [k for k in REQUIRED if raw.get(k) is None]
    if missing:
        raise UserError(f"{name} lacks required key(s): {', '.join(missing)}", "add them to the recipe")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        values[key] = _check_type(name, key, value)
    values["data"] = [_path(base, d) for d in values["data"]]
    values["out"] = _path(base, values["out"])
    model = values["model"]
    if (base / model).expanduser().exists() or model.startswith((".", "/", "~")):
        values["model"] = _path(base, model)
    if "eval" in values:
        values["eval"] = [_task(base, t) for t in values["eval"]]
    values.setdefault("method", DEFAULT_METHOD)
    return OneShot(**values)


def _check_type(name: str, key: str, value: Any) -> Any:
    def bad(what: str) -> UserError:
        return UserError(f"{name}: '{key}' must be {what}, got {value!r}", f"fix '{key}' in the recipe")

    if key in ("data", "eval"):
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
        if not ok or (key == "data" and not value):
            raise bad("a list of strings")
        return value
    if key in _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
        return value
    if key in _BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "keep":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad("a count, a fraction or a percentage")
        return str(value)
    if key in _STR or key in ("model", "out"):
        if not isinstance(value, str) or not value:
            raise bad("a string")
        return value
    return value


def _path(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def _task(base: Path, spec: str) -> str:
    """Resolve the file of an eval task spec (PATH, NAME=PATH, kind:PATH); 'testbed...' stays."""
    from .evaluate.tasks import _KIND_ALIASES, _NAME_RE

    if Path(spec).is_absolute():
        return spec
    if (base / spec).exists():
        return os.path.normpath(base / spec)
    prefix = ""
    head, eq, tail = spec.partition("=")
    if eq and _NAME_RE.match(head):
        prefix, rest = head + "=", tail
    else:
        rest = spec
    head, colon, tail = rest.partition(":")
    if colon and head.lower() in _KIND_ALIASES:
        prefix, rest = prefix + head + ":", tail
    if rest and (base / rest).exists():
        return prefix + os.path.normpath(base / rest)
    return spec

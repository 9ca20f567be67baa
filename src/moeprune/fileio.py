"""Reading the JSON and YAML files moeprune is given (configs, plans, libraries, recipes), safely.

Every reader here turns whatever can go wrong with a hostile or broken file into one
:class:`UserError` line naming the file and, where the parser knows it, the line and column:
a file larger than a config can be, bytes that are not UTF-8, malformed syntax, nesting deeper
than any real config (Python's parsers recurse and would raise ``RecursionError``), and, in YAML,
a key given twice (PyYAML silently keeps the last one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError

MAX_BYTES = 64 * 1024 * 1024  # far above any config, plan, library index or recipe
MAX_DEPTH = 64  # real files nest a handful of levels


def read_text(path: str | os.PathLike, what: str, fix: str, max_bytes: int = MAX_BYTES) -> str:
    """The UTF-8 text of ``path`` (``what`` names the file in errors, ``fix`` says what to do)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(f"{what} '{path}' is {size} bytes, more than such a file can be", fix)
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} '{path}' ({exc.strerror or exc})", fix) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte {exc.start})", fix) from None


def parse_json(text: str, where: str, fix: str) -> Any:
    """``json.loads`` with one-line errors (``where`` names the source: a file, ``file:line``)."""
    _check_depth(text, where, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", fix
        ) from None
    except RecursionError:  # a backstop: _check_depth counts brackets outside strings
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels", fix) from None


def read_json(path: str | os.PathLike, what: str, fix: str, max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value in ``path``; any problem is one :class:`UserError` line."""
    text = read_text(path, what, fix, max_bytes)
    return parse_json(text, f"{what} '{path}'", fix)


def read_yaml(path: str | os.PathLike, what: str, fix: str, max_bytes: int = MAX_BYTES) -> Any:
    """The YAML document in ``path`` (safe loader, duplicate keys refused)."""
    import yaml

    text = read_text(path, what, fix, max_bytes)
    where = f"{what} '{path}'"
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what_wrong = exc.problem or exc.context or "malformed"
        raise UserError(f"{where} is not valid YAML: {what_wrong}{at}", fix) from None
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}", fix) from None
    except RecursionError:
        raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels", fix) from None


def _check_depth(text: str, where: str, fix: str) -> None:
    """Refuse JSON whose brackets nest deeper than ``MAX_DEPTH`` (before the recursive parser,
    which would raise ``RecursionError`` or exhaust the stack); brackets in strings are skipped."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    in_string = False
    escape = False
    for ch in text:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{where} nests deeper than {MAX_DEPTH} levels", fix)
        elif ch in "]}":
            depth = max(0, depth - 1)


_LOADER: list[type] = []


def _strict_loader() -> type:
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (built on first use)."""
    if _LOADER:
        return _LOADER[0]
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        dup = key in seen
                        seen.add(key)
                    except TypeError:  # an unhashable key: SafeLoader reports it itself
                        continue
                    if dup:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key '{key}' is given twice", key_node.start_mark
                        )
            return super().construct_mapping(node, deep=deep)

    _LOADER.append(StrictLoader)
    return StrictLoader

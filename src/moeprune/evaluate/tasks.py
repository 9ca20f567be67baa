"""Evaluation tasks: loading and validating task files, and a small registry of named task sources.

A :class:`Task` has a name, a kind and its records. Three kinds exist:

``perplexity``
    records ``{"text": str}`` (or a ``.txt`` file: one document per blank-line-separated block).
``exact_match``
    records ``{"prompt": str, "answer": str}``: greedy generation, compared after stripping.
``multiple_choice``
    records ``{"prompt": str, "choices": [str, ...], "label": int}``: log-likelihood of each choice.

The kind is inferred from the fields of the first record, or forced with a ``kind:`` prefix.
A task is named on the command line as ``PATH``, ``NAME=PATH``, ``kind:PATH``, ``NAME=kind:PATH``,
or through a registered source: ``testbed`` (every task of the packaged testbed) and
``testbed:<name>`` (one of them). More sources can be added with :func:`register_source`.

This module needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moeprune.errors import UserError

__all__ = [
    "KINDS",
    "Task",
    "infer_kind",
    "load_task_file",
    "parse_task_spec",
    "register_source",
    "resolve_tasks",
    "testbed_data_dir",
    "testbed_tasks",
]

PERPLEXITY = "perplexity"
EXACT_MATCH = "exact_match"
MULTIPLE_CHOICE = "multiple_choice"
KINDS = (PERPLEXITY, EXACT_MATCH, MULTIPLE_CHOICE)

# Accepted spellings of a forced kind (`kind:PATH`).
_KIND_ALIASES = {
    "perplexity": PERPLEXITY,
    "ppl": PERPLEXITY,
    "exact_match": EXACT_MATCH,
    "exact-match": EXACT_MATCH,
    "em": EXACT_MATCH,
    "multiple_choice": MULTIPLE_CHOICE,
    "multiple-choice": MULTIPLE_CHOICE,
    "mc": MULTIPLE_CHOICE,
}

_LAYOUTS = (
    "'text' (perplexity), 'prompt'+'answer' (exact_match) or 'prompt'+'choices'+'label' (multiple_choice)"
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass
class Task:
    """One evaluation task: a name, a kind (one of :data:`KINDS`) and its records."""

    name: str
    kind: str
    records: list[dict[str, Any]]
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {KINDS}")

    def limited(self, limit: int | None) -> Task:
        """The same task with only its first ``limit`` records (all of them for ``None``)."""
        if limit is None or limit >= len(self.records):
            return self
        return replace(self, records=self.records[:limit])

    def __len__(self) -> int:
        return len(self.records)


# ---------------------------------------------------------------------------------------------
# records


def infer_kind(record: dict[str, Any]) -> str | None:
    """The task kind a record's fields say, or ``None`` when the layout is unknown."""
    if "text" in record:
        return PERPLEXITY
    if "prompt" in record and "choices" in record and "label" in record:
        return MULTIPLE_CHOICE
    if "prompt" in record and "answer" in record:
        return EXACT_MATCH
    return None


def _check_record(record: Any, kind: str, where: str, why: str = "") -> dict[str, Any]:
    """Validate one record for ``kind``; ``where`` is ``file:line`` and ``why`` how the kind was chosen."""
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object, got {type(record).__name__}", "write one JSON object per line"
        )

    def need(name: str) -> Any:
        if name not in record:
            raise UserError(
                f"{where}: missing field '{name}' (a {kind} task needs {_fields_of(kind)}{why})",
                "fix the record",
            )
        return record[name]

    def need_str(name: str) -> str:
        value = need(name)
        if not isinstance(value, str):
            raise UserError(
                f"{where}: field '{name}' must be a string, got {type(value).__name__}", "fix the record"
            )
        return value

    if kind == PERPLEXITY:
        need_str("text")
    elif kind == EXACT_MATCH:
        need_str("prompt")
        need_str("answer")
    else:
        need_str("prompt")
        choices = need("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError(
                f"{where}: field 'choices' must be a list of at least two strings", "fix the record"
            )
        for c in choices:
            if not isinstance(c, str) or not c:
                raise UserError(
                    f"{where}: every choice must be a non-empty string, got {c!r}", "fix the record"
                )
        label = need("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise UserError(
                f"{where}: field 'label' must be an integer index into 'choices' (0..{len(choices) - 1}), got {label!r}",
                "fix the record",
            )
    return record


def _fields_of(kind: str) -> str:
    return {
        PERPLEXITY: "'text'",
        EXACT_MATCH: "'prompt' and 'answer'",
        MULTIPLE_CHOICE: "'prompt', 'choices' and 'label'",
    }[kind]


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})",
                    "write one JSON object per line",
                ) from None
            except RecursionError:
                raise UserError(f"{path}:{lineno}: the JSON nests too deeply", "fix the line") from None
            _check_unicode(row, f"{path}:{lineno}")
            out.append((lineno, row))
    return out


def _check_unicode(row: Any, where: str) -> None:
    """No lone surrogate (a ``\\ud800`` escape without its pair) in any string of ``row``: a
    tokenizer cannot encode one (it raised a TypeError). Iterative: rows may nest deeply."""
    from ..data import _SURROGATE

    stack = [row]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            bad = _SURROGATE.search(item)
            if bad is not None:
                raise UserError(
                    f"{where}: a string holds a lone surrogate (\\u{ord(bad.group()):04x}) at character {bad.start()}",
                    "write valid Unicode (a pair of \\u escapes or the character itself)",
                )
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    blocks = re.split(r"\n[ \t]*\n", text)
    return [b.strip("\n") for b in blocks if b.strip()]


def default_task_name(path: Path) -> str:
    """``data/math.eval.jsonl`` -> ``math``; ``notes.txt`` -> ``notes``."""
    name = path.name
    for suffix in (".jsonl", ".json", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(".eval"):
        name = name[: -len(".eval")]
    return name or path.name


def load_task_file(path: str | Path, name: str | None = None, kind: str | None = None) -> Task:
    """Read and validate a task file (``.jsonl``, or ``.txt`` for perplexity)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"task file '{path}' does not exist", "check the path given to --task")
    if path.is_dir():
        raise UserError(f"task path '{path}' is a directory", "pass a .jsonl or .txt file to --task")
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown task kind '{kind}'", f"use one of {', '.join(KINDS)}")
    name = name or default_task_name(path)
    try:
        if path.suffix.lower() == ".txt":
            if kind not in (None, PERPLEXITY):
                raise UserError(
                    f"{path}: a .txt task is a perplexity task, not {kind}",
                    "write a .jsonl file for other kinds",
                )
            records: list[dict[str, Any]] = [{"text": t} for t in _read_txt(path)]
            if not records:
                raise UserError(
                    f"task file '{path}' is empty (no text blocks)", "give it at least one document"
                )
            return Task(name=name, kind=PERPLEXITY, records=records, source=str(path.resolve()))
        rows = _read_jsonl(path)
    except UnicodeDecodeError:
        raise UserError(f"task file '{path}' is not UTF-8 text", "write it as UTF-8 JSON lines") from None
    except OSError as exc:
        raise UserError(f"cannot read task file '{path}' ({exc.strerror or exc})", "check the file") from None
    if not rows:
        raise UserError(f"task file '{path}' is empty (no records)", "give it at least one JSON record")
    first_line, first = rows[0]
    why = "; kind forced by the 'kind:' prefix" if kind else f"; kind inferred from line {first_line}"
    if kind is None:
        if not isinstance(first, dict):
            raise UserError(
                f"{path}:{first_line}: expected a JSON object, got {type(first).__name__}",
                "write one JSON object per line",
            )
        kind = infer_kind(first)
        if kind is None:
            found = ", ".join(repr(k) for k in first) or "none"
            raise UserError(
                f"{path}:{first_line}: unknown record layout (fields {found})",
                f"records need {_LAYOUTS}",
            )
    records = [_check_record(rec, kind, f"{path}:{lineno}", why) for lineno, rec in rows]
    return Task(name=name, kind=kind, records=records, source=str(path.resolve()))


# ---------------------------------------------------------------------------------------------
# registry of named sources


# A source maps an optional sub-name (`testbed:<name>` -> "<name>", `testbed` -> None)
# to a list of (task name, file path).
SourceResolver = Callable[[str | None], list[tuple[str, Path]]]
_SOURCES: dict[str, SourceResolver] = {}


def register_source(prefix: str, resolver: SourceResolver) -> None:
    """Make ``--task <prefix>`` and ``--task <prefix>:<name>`` resolve through ``resolver``."""
    _SOURCES[prefix] = resolver


def testbed_data_dir() -> Path | None:
    """The packaged testbed's data directory, or ``None`` when the testbed is not available.

    Imported lazily: ``moeprune.testbed`` is optional, and its data is produced by a script.
    """
    try:
        mod = importlib.import_module("moeprune.testbed")
    except ModuleNotFoundError as exc:
        if exc.name in ("moeprune.testbed", "moeprune"):
            return None
        raise
    candidates: list[Path] = []
    data_dir = getattr(mod, "DATA_DIR", None)
    if data_dir is not None:
        candidates.append(Path(data_dir))
    fn = getattr(mod, "testbed_path", None)
    if callable(fn):
        root = Path(fn())
        candidates += [root / "data", root.parent / "data", root]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("*.eval.jsonl")):
            return cand
    return None


def testbed_tasks() -> dict[str, Path]:
    """Name -> path of every ``<name>.eval.jsonl`` in the testbed data directory."""
    data = testbed_data_dir()
    if data is None:
        return {}
    return {p.name[: -len(".eval.jsonl")]: p for p in sorted(data.glob("*.eval.jsonl"))}


def _testbed_source(sub: str | None) -> list[tuple[str, Path]]:
    available = testbed_tasks()
    if not available:
        raise UserError(
            "the testbed is not available in this installation (no moeprune.testbed data files)",
            "build it with scripts/train_testbed.py, or pass task files with --task PATH",
        )
    if sub is None:
        return list(available.items())
    if sub not in available:
        raise UserError(f"unknown testbed task '{sub}'", f"choose one of {', '.join(available)}")
    return [(sub, available[sub])]


register_source("testbed", _testbed_source)


# ---------------------------------------------------------------------------------------------
# command-line specs


def parse_task_spec(spec: str) -> list[Task]:
    """Turn one ``--task`` value into tasks (a registered source may give several)."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty --task value", "pass --task PATH or --task NAME=PATH")
    if Path(spec).expanduser().exists():
        return [load_task_file(spec)]
    name: str | None = None
    rest = spec
    head, eq, tail = spec.partition("=")
    if eq and _NAME_RE.match(head):
        name, rest = head, tail
        if not rest:
            raise UserError(f"--task '{spec}' names no file", "pass --task NAME=PATH")
    kind: str | None = None
    head, colon, tail = rest.partition(":")
    if colon and head.lower() in _KIND_ALIASES and not Path(rest).expanduser().exists():
        kind, rest = _KIND_ALIASES[head.lower()], tail
    head, colon, tail = rest.partition(":")
    if head in _SOURCES and not Path(rest).expanduser().exists():
        entries = _SOURCES[head](tail if colon else None)
        if name is not None and len(entries) != 1:
            raise UserError(
                f"--task '{spec}' gives {len(entries)} tasks but one name", "drop 'NAME=' or pick one task"
            )
        return [load_task_file(path, name=name or task_name, kind=kind) for task_name, path in entries]
    return [load_task_file(rest, name=name, kind=kind)]


def resolve_tasks(specs: list[str]) -> list[Task]:
    """All tasks named by ``--task`` values, with distinct names."""
    tasks: list[Task] = []
    seen: dict[str, str] = {}
    for spec in specs:
        for task in parse_task_spec(spec):
            if task.name in seen:
                raise UserError(
                    f"task name '{task.name}' is given twice ('{seen[task.name]}' and '{spec}')",
                    "name them apart with --task NAME=PATH",
                )
            seen[task.name] = spec
            tasks.append(task)
    return tasks

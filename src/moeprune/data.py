"""Calibration data: reading records, turning them into token sequences, and batching them.

Accepted inputs (each record becomes its own sequence; records are never packed together):

- ``.jsonl``: one JSON object per line. A record is, in this order of preference, a ``text`` field
  (``text_field`` picks another name, and then that field is required), a ``prompt`` with an
  optional ``response`` (or ``answer``) that follows it, or chat ``messages`` rendered with the
  tokenizer's chat template.
- ``.txt``: one document per block of lines separated by blank lines.
- ``.parquet``, ``.arrow``, ``.json``, ``.csv``: through ``datasets`` (``load_dataset(<format>,
  data_files=...)``, offline), rows read like jsonl objects.

Every mistake in the input is a :class:`~moeprune.errors.UserError` naming the file and the line
(or row). Tokenisation uses the tokenizer's own special tokens (a BOS it adds is kept); a prompt
and its response are tokenised separately and concatenated (the response without special
tokens), so the prompt tokens are exactly those a generation would see.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = [
    "DATASETS_FORMATS",
    "DataFile",
    "Record",
    "batches",
    "encode_prompt",
    "encode_record",
    "file_sha256",
    "load_records",
    "pad_token_id",
    "read_file",
    "select_records",
    "tokenize_records",
]

# Characters per token that no tokenizer exceeds on real text (long merges of spaces or repeats
# stay far below): a record is cut to max_length * this many characters before it is tokenised,
# so one huge line costs memory in proportion to max_length, not to its own size.
MAX_CHARS_PER_TOKEN = 32
_SURROGATE = re.compile("[\ud800-\udfff]")

DATASETS_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".csv": "csv"}
KNOWN_SUFFIXES = (".jsonl", ".txt", *DATASETS_FORMATS)


@dataclass
class Record:
    """One calibration record, with where it came from (for error messages)."""

    where: str  # "path:line" (jsonl/txt) or "path:row N" (datasets formats)
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, Any]] | None = None

    @property
    def kind(self) -> str:
        if self.messages is not None:
            return "messages"
        if self.prompt is not None:
            return "prompt"
        return "text"


@dataclass
class DataFile:
    """A data file as recorded in a profile's metadata."""

    path: str
    sha256: str
    records: int
    records_list: list[Record] = field(default_factory=list, repr=False)

    def to_meta(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "records": self.records}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- records from rows ------------------------------------------------------------------------


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(
            f"{where}: field '{name}' is a {type(value).__name__}, not a string",
            "every text field must hold a string",
        )
    bad = _SURROGATE.search(value)
    if bad is not None:
        raise UserError(
            f"{where}: field '{name}' holds a lone surrogate (\\u{ord(bad.group()):04x}) at character {bad.start()}",
            "write valid Unicode (a pair of \\u escapes or the character itself)",
        )
    return value


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok or not value:
        raise UserError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects",
            'fix the record, e.g. [{"role": "user", "content": "..."}]',
        )
    for m in value:
        _string(m["role"], "role", where)
        _string(m["content"], "content", where)
    return list(value)


def record_from_row(row: Any, where: str, text_field: str | None = None) -> Record:
    """A :class:`Record` from one JSON object / dataset row."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(row).__name__}", "fix the line")
    if text_field is not None:
        if text_field not in row:
            raise UserError(
                f"{where}: the record has no field '{text_field}'", "fix the record or --text-field"
            )
        return Record(where=where, text=_string(row[text_field], text_field, where))
    if "text" in row:
        return Record(where=where, text=_string(row["text"], "text", where))
    if "prompt" in row:
        response = None
        for name in ("response", "answer"):
            if row.get(name) is not None:
                response = _string(row[name], name, where)
                break
        return Record(where=where, prompt=_string(row["prompt"], "prompt", where), response=response)
    if "messages" in row:
        return Record(where=where, messages=_messages(row["messages"], where))
    fields = ", ".join(repr(k) for k in list(row)[:6]) or "none"
    raise UserError(
        f"{where}: the record has no 'text', 'prompt' or 'messages' field (fields: {fields})",
        "name the text field with --text-field",
    )


# --- files ------------------------------------------------------------------------------------


def _read_jsonl(path: Path, text_field: str | None) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{where}: not valid JSON ({exc.msg}, column {exc.colno})", "fix the line"
                ) from None
            except RecursionError:
                raise UserError(f"{where}: the JSON nests too deeply", "fix the line") from None
            records.append(record_from_row(row, where, text_field))
    return records


def _read_txt(path: Path) -> list[Record]:
    records = []
    block: list[str] = []
    start = 0
    with open(path, encoding="utf-8") as f:  # line by line: the file is never held twice
        for lineno, line in enumerate(itertools.chain(f, [""]), start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                records.append(Record(where=f"{path}:{start}", text="\n".join(block)))
                block = []
    return records


def _read_datasets(path: Path, fmt: str, text_field: str | None) -> list[Record]:
    import os
    import tempfile

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    with tempfile.TemporaryDirectory(prefix="moeprune-ds-") as cache:
        try:
            ds = load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            first = (str(exc).splitlines() or [exc.__class__.__name__])[0][:200]
            raise UserError(
                f"{path}: cannot read it as {fmt} ({first})", f"check that it is a valid {fmt} file"
            ) from None
        return [record_from_row(row, f"{path}:row {i + 1}", text_field) for i, row in enumerate(ds)]


def read_file(path: str | Path, text_field: str | None = None) -> DataFile:
    """Read one data file into records (no tokenisation). Raises UserError for any bad input."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data file '{path}' does not exist", "check the path")
    if not p.is_file():
        raise UserError(f"data path '{path}' is not a file", "pass files, not directories")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = _read_jsonl(p, text_field)
        elif suffix == ".txt":
            records = _read_txt(p)
        elif suffix in DATASETS_FORMATS:
            records = _read_datasets(p, DATASETS_FORMATS[suffix], text_field)
        else:
            raise UserError(
                f"data file '{path}' has an unknown format '{suffix or '(no extension)'}'",
                f"use one of {', '.join(KNOWN_SUFFIXES)}",
            )
    except UnicodeDecodeError:
        raise UserError(f"data file '{path}' is not UTF-8 text", "convert it to UTF-8") from None
    if not records:
        raise UserError(f"data file '{path}' holds no records", "pass a file with at least one record")
    return DataFile(path=str(path), sha256=file_sha256(p), records=len(records), records_list=records)


def load_records(
    paths: Sequence[str | Path], text_field: str | None = None
) -> tuple[list[Record], list[DataFile]]:
    """All records of all files, in file order, and the files' descriptions."""
    if not paths:
        raise UserError(
            "no calibration data given", "pass --data FILE (jsonl, txt, parquet, arrow, json, csv)"
        )
    files = [read_file(p, text_field) for p in paths]
    return [r for f in files for r in f.records_list], files


def select_records(records: list[Record], max_samples: int | None, seed: int) -> list[Record]:
    """A seeded random subset of ``max_samples`` records (kept in their original order), or all."""
    if max_samples is None or max_samples >= len(records):
        return list(records)
    if max_samples <= 0:
        raise UserError(f"--max-samples must be positive, got {max_samples}", "pass a number >= 1")
    chosen = sorted(random.Random(seed).sample(range(len(records)), max_samples))
    return [records[i] for i in chosen]


# --- tokenisation -----------------------------------------------------------------------------


def _require_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: a chat 'messages' record needs a chat template, and this tokenizer has none",
            "use text or prompt/response records, or a model whose tokenizer has a chat template",
        )


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer: Any, record: Record, max_chars: int | None = None) -> list[int]:
    """The token ids a generation starts from: the prompt (chat: all messages before a final
    assistant turn, with the generation prompt). An EOS the tokenizer appends is dropped. With
    ``max_chars``, each text is cut to that many characters before tokenising, as in
    :func:`encode_record` (callers truncate the tokens)."""

    def cut(text: str) -> str:
        return text if max_chars is None else text[:max_chars]

    if record.messages is not None:
        _require_template(tokenizer, record.where)
        msgs = list(record.messages)
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        if not msgs:
            raise UserError(f"{record.where}: the conversation has no user turn", "fix the record")
        msgs = [{**m, "content": cut(m["content"])} for m in msgs]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer, cut(text), special=False)
    if record.prompt is None:
        raise UserError(
            f"{record.where}: --self-generate needs records with a 'prompt' (or chat 'messages')",
            "give prompt records, or drop --self-generate",
        )
    prompt = cut(record.prompt)
    ids = _ids(tokenizer, prompt, special=True)
    eos = getattr(tokenizer, "eos_token_id", None)
    if ids and eos is not None and ids[-1] == eos and _ids(tokenizer, prompt, special=False)[-1:] != [eos]:
        ids = ids[:-1]
    return ids


def encode_record(tokenizer: Any, record: Record, max_chars: int | None = None) -> list[int]:
    """The token sequence of one record; [] for a record without content. With ``max_chars``,
    each text is cut to that many characters before tokenising (callers truncate the tokens)."""

    def cut(text: str) -> str:
        return text if max_chars is None else text[:max_chars]

    if record.messages is not None:
        _require_template(tokenizer, record.where)
        if not any(m["content"].strip() for m in record.messages):
            return []
        msgs = [{**m, "content": cut(m["content"])} for m in record.messages]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        return _ids(tokenizer, cut(text), special=False)
    if record.prompt is not None:
        if not record.prompt.strip() and not (record.response or "").strip():
            return []
        ids = encode_prompt(tokenizer, Record(record.where, prompt=record.prompt), max_chars)
        if record.response:
            ids += _ids(tokenizer, cut(record.response), special=False)
        return ids
    if not (record.text or "").strip():
        return []
    return _ids(tokenizer, cut(record.text or ""), special=True)


def check_max_length(max_length: int) -> None:
    if max_length <= 0:
        raise UserError(f"--max-length must be positive, got {max_length}", "pass a number of tokens >= 1")


def tokenize_records(
    tokenizer: Any, records: Sequence[Record], max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token sequences truncated at ``max_length``, and the index (into ``records``) of each.

    Records without content are dropped; if none is left this is a UserError.
    """
    check_max_length(max_length)
    if tokenizer is None:
        raise UserError("the model has no tokenizer", "save a tokenizer in the model directory")
    seqs: list[list[int]] = []
    kept: list[int] = []
    for i, rec in enumerate(records):
        ids = encode_record(tokenizer, rec, max_chars=max_length * MAX_CHARS_PER_TOKEN)
        if ids:
            seqs.append(ids[:max_length])
            kept.append(i)
    if not seqs:
        raise UserError(
            "every calibration record is empty after tokenisation", "check the data files and --text-field"
        )
    return seqs, kept


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding (the tokenizer's pad, else its EOS, else 0; padding never counts)."""
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


# --- batching ---------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: Any  # LongTensor [B, S]
    attention_mask: Any  # LongTensor [B, S], 1 for real tokens
    indices: list[int]  # which sequences (positions in the list given to `batches`)
    tokens: int  # real tokens in the batch


def batches(
    seqs: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    order: Sequence[int] | None = None,
    left: bool = False,
) -> Iterator[Batch]:
    """Padded batches of ``seqs`` (by default all of them), longest first.

    Right padding by default (calibration); ``left=True`` pads on the left (generation).
    Sorting by length only changes how much padding is computed, never any result.
    """
    import torch

    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}", "pass a number >= 1")
    pool = list(range(len(seqs))) if order is None else list(order)
    pool.sort(key=lambda i: (-len(seqs[i]), i))
    for start in range(0, len(pool), batch_size):
        chunk = pool[start : start + batch_size]
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(seqs[i])
            sl = slice(width - n, width) if left else slice(0, n)
            ids[row, sl] = torch.tensor(seqs[i], dtype=torch.long)
            mask[row, sl] = 1
        yield Batch(
            input_ids=ids, attention_mask=mask, indices=chunk, tokens=sum(len(seqs[i]) for i in chunk)
        )

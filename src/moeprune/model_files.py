"""Which files of the source model travel with a pruned checkpoint (besides its weights).

Only files moeprune knows are copied: the generation config, tokenizer and processor files, chat
templates, and the license (``LICENSE*``, ``NOTICE*``: the weights' terms travel with them); the
source's ``README.md`` is kept as ``README.original.md``. Everything else stays behind and is
listed as skipped: other weight formats and shards outside the index (stale, unpruned copies),
optimizer states, training logs, sub-folders.

Python code is copied only when the config's (or tokenizer config's) ``auto_map`` names it: the
model then needs ``trust_remote_code=True`` as its source did, and the model card says so.

Symbolic links are followed only to a target inside the model: the model folder, or for a folder
of the Hugging Face cache (``models--org--name/snapshots/<rev>``, whose files link into
``../../blobs``) the cached repository. A link that leads anywhere else is skipped.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Files copied as they are (exact names).
KNOWN_FILES = frozenset(
    {
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tiktoken.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "feature_extractor_config.json",
    }
)
# Files copied by pattern: tiktoken vocabularies, license terms.
_KNOWN_PATTERN = re.compile(r"[\w.-]+\.tiktoken|(LICEN[CS]E|NOTICE|COPYING)([._-][\w.-]*)?", re.IGNORECASE)
# Folders copied with only their files of one kind (transformers 5 saves extra chat templates here).
KNOWN_FOLDERS = {"additional_chat_templates": re.compile(r"[\w.-]+\.jinja")}
_LICENSE = re.compile(r"(LICEN[CS]E|COPYING)([._-][\w.-]*)?", re.IGNORECASE)
# auto_map value: "module.Class" or "org/repo--module.Class" (code in another repository)
_AUTO_REF = re.compile(r"(?:(?P<repo>[\w.-]+/[\w.-]+)--)?(?P<module>[A-Za-z_]\w*)\.[A-Za-z_]\w*")


@dataclass
class SourceFiles:
    """What :func:`copy_source_files` did."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name (why)"
    remote_code: list[str] = field(default_factory=list)  # the auto_map entries, e.g. "AutoModel: m.C"
    code_files: list[str] = field(default_factory=list)  # the .py files copied for them
    license_files: list[str] = field(default_factory=list)


def model_root(src: Path) -> Path:
    """The folder a link from ``src`` may lead into: ``src``, or its cached repository."""
    base = src.resolve()
    if base.parent.name == "snapshots" and base.parent.parent.name.startswith("models--"):
        return base.parent.parent
    return base


def inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved, if it is a regular file inside ``root`` (links followed); else None."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return real if real.is_relative_to(root) and real.is_file() else None


def auto_map_entries(src: Path) -> list[tuple[str, str, str | None]]:
    """(class kind, reference, repo or None) for each ``auto_map`` entry of the config and the
    tokenizer config."""
    out: list[tuple[str, str, str | None]] = []
    root = model_root(src)
    for name in ("config.json", "tokenizer_config.json"):
        real = inside(src / name, root)
        if real is None:
            continue
        try:
            data = json.loads(real.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        amap = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(amap, dict):
            continue
        for kind, value in amap.items():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str):
                    m = _AUTO_REF.fullmatch(ref)
                    out.append((str(kind), ref, m.group("repo") if m else None))
    return out


def _code_files(src: Path, entries: list[tuple[str, str, str | None]]) -> set[str]:
    """The ``<module>.py`` files in the model folder that ``auto_map`` names."""
    names = set()
    for _kind, ref, repo in entries:
        m = _AUTO_REF.fullmatch(ref)
        if m is not None and repo is None:
            names.add(f"{m.group('module')}.py")
    return names


def is_license(name: str) -> bool:
    return bool(_LICENSE.fullmatch(name))


def copy_source_files(src: Path, dst: Path, handled: set[str]) -> SourceFiles:
    """Copy the known files of ``src`` into ``dst``; ``handled``: names the caller writes itself
    (config, weights, index, README) and that are neither copied nor reported."""
    root = model_root(src)
    res = SourceFiles()
    entries = auto_map_entries(src)
    res.remote_code = [f"{kind}: {ref}" for kind, ref, _ in entries]
    code = _code_files(src, entries)
    for path in sorted(src.iterdir()):
        name = path.name
        if name in handled or name.startswith("."):
            continue
        if path.is_dir() and not path.is_symlink() and name in KNOWN_FOLDERS:
            _copy_folder(path, dst / name, root, KNOWN_FOLDERS[name], res)
            continue
        if not (name in KNOWN_FILES or name in code or _KNOWN_PATTERN.fullmatch(name)):
            res.skipped.append(f"{name}{'/' if path.is_dir() else ''} (not a file moeprune copies)")
            continue
        real = inside(path, root)
        if real is None:
            res.skipped.append(f"{name} (a link out of the model folder, or not a file)")
            continue
        shutil.copyfile(real, dst / name)
        res.copied.append(name)
        if name in code:
            res.code_files.append(name)
        elif is_license(name):
            res.license_files.append(name)
    return res


def _copy_folder(folder: Path, dst: Path, root: Path, pattern: re.Pattern[str], res: SourceFiles) -> None:
    for path in sorted(folder.iterdir()):
        rel = f"{folder.name}/{path.name}"
        real = inside(path, root) if pattern.fullmatch(path.name) else None
        if real is None:
            res.skipped.append(f"{rel} (not a file moeprune copies)")
            continue
        dst.mkdir(exist_ok=True)
        shutil.copyfile(real, dst / path.name)
        res.copied.append(rel)


def source_card_metadata(src: Path) -> dict[str, Any]:
    """The YAML metadata block of the source's ``README.md`` ({} when absent or unreadable)."""
    real = inside(src / "README.md", model_root(src))
    if real is None:
        return {}
    try:
        text = real.read_text(encoding="utf-8")[:200_000]
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, flags=re.DOTALL)
    if m is None:
        return {}
    import yaml  # (here: PyYAML's import is ~15 ms, and most local checkpoints have no card)

    try:
        data = yaml.safe_load(m.group(1))
    except (yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}

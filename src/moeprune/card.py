"""The model card (``README.md``) of a pruned checkpoint: what was pruned, how, and how to load it.

Written by :func:`moeprune.surgery.rewrite_checkpoint` from the rewrite's result, the plan and the
profile's metadata. The metadata block the Hub reads (YAML between ``---`` lines, every string
JSON-quoted, see :func:`_yaml_lines`): ``base_model`` (a hub id only, never a local path), the source's license,
``library_name``, tags and the moeprune version. Every string that comes from a file (model and
folder names, the plan's method, data paths, task names, ``auto_map`` entries) goes through
:func:`text`, which makes it one line of inert Markdown: no HTML, no table break, no heading, no
front-matter fence.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch.pruned import PrunedLayout

if TYPE_CHECKING:
    from .surgery import RewriteResult


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPDX_LIKE = re.compile(r"[A-Za-z0-9][\w.+-]{0,63}")
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+!|~=-])")
INSTALL = (
    "moeprune is not on PyPI: install it from its source (`pip install -e .` in a checkout of its repository)"
)


def text(value: Any, limit: int = 200) -> str:
    """``value`` (from a file) as one line of inert Markdown: control characters and line breaks
    become spaces, HTML is escaped, Markdown punctuation is backslash-escaped (so it opens no
    code span, link, emphasis or table cell), and it is cut to ``limit`` characters."""
    s = "".join(" " if unicodedata.category(c).startswith(("C", "Z")) else c for c in str(value))
    s = " ".join(s.split())
    if len(s) > limit:
        s = s[: limit - 3] + "..."
    return _MD_PUNCT.sub(r"\\\1", html.escape(s, quote=False))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _hub_id(src: Path, raw_config: dict[str, Any]) -> str | None:
    """The hub id of a cached snapshot (…/models--org--name/snapshots/<rev>), if it is one."""
    parts = src.resolve().parts
    for part in parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    name = raw_config.get("_name_or_path")
    if not isinstance(name, str) or not HUB_ID.fullmatch(name) or Path(name).exists():
        return None  # a local path, not a hub id
    return name


def _counts_text(counts: list[int]) -> str:
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _mode_paragraph(result: RewriteResult, base: str, layout: PrunedLayout) -> str:
    """``base``: the source's name, already Markdown."""
    e = result.num_experts
    counts = list(result.kept_counts.values()) or [result.kept_per_layer]
    share = 100 * sum(counts) / (e * len(counts))
    if result.mode == "novice":
        text = (
            f"This checkpoint was written by moeprune from {base} in **novice mode** (MoNE): the router "
            f"is unchanged, so all {e} routed experts stay routable; each MoE layer keeps "
            f"{_counts_text(counts)} experts as computed experts ({share:.1f}% overall) and every other "
            "expert is a *novice*: a constant vector (its mean output on the calibration data) times its "
            "gate weight. "
        )
        if layout.novice_storage == "down_bias":
            text += (
                "The novices are stored as experts with zero weights whose down-projection bias is the "
                "constant (exact: the gated activation of 0 is 0), so the checkpoint keeps all "
                f"{e} experts' tensors and loads with stock transformers."
            )
        else:
            text += (
                "Only the kept experts' weights are stored, plus one vector per novice "
                "(`experts.novice_outputs`); the model is built by `moeprune.load`."
            )
        return text
    text = (
        f"This checkpoint was written by moeprune from {base} by **removing routed experts** (the "
        f"Remove mode of EASY-EP and PreMoe's PEP): each MoE layer keeps {_counts_text(counts)} of its {e} "
        f"routed experts ({share:.1f}% overall), with their router rows and selection-bias entries; the "
        "kept experts stay in their original order and are renumbered from 0. Routing picks the top-k "
        "among the kept experts and renormalises exactly as the architecture does, so the model equals "
        "the original one with the removed experts' router logits set to -inf. Shared experts, attention "
        "and dense layers are unchanged."
    )
    if result.whole_layers:
        text += (
            f" The {len(result.whole_layers)} hash-routed MoE layers (decoder layers "
            f"{', '.join(map(str, result.whole_layers))}) choose experts by a fixed token-id -> expert "
            f"table, not by their router: they are kept whole, with all {e} experts and their table, so "
            "`moeprune.experts_per_layer` records them beside the pruned layers and the model is built "
            "by `moeprune.load`."
        )
    if result.ragged and result.padded:
        text += (
            f" Layers differ in their counts; every layer is padded to {max(counts)} experts with *dead* "
            "experts (zero weights and router row, selection bias -1e4: never selected), so stock "
            "transformers loads it and the padding changes no output."
        )
    elif result.ragged:
        text += (
            " Layers differ in their counts; one config count cannot describe that, so `config.json` holds "
            f"the largest ({max(counts)}) and `moeprune.experts_per_layer` every layer's own."
        )
    return text


def _wrapper_class_name(raw_config: dict[str, Any]) -> str | None:
    """The stock wrapper class of a multimodal checkpoint (:mod:`.arch.wrappers`), else None."""
    from .arch.wrappers import WRAPPED

    facts = WRAPPED.get(str(raw_config.get("model_type")))
    archs = raw_config.get("architectures") or []
    if facts is None or facts.cls not in archs:
        return None
    return facts.cls


def model_card(
    src: Path,
    result: RewriteResult,
    kept: dict[int, list[int]],
    raw_config: dict[str, Any],
    plan: dict[str, Any] | None,
    profile_meta: dict[str, Any] | None,
    layout: PrunedLayout | None = None,
) -> str:
    base = _hub_id(src, raw_config)
    name = f"`{base}`" if base else text(src.name)
    e = result.num_experts
    counts = [len(kept[layer]) for layer in result.layers]
    if layout is None:
        layout = PrunedLayout(mode="remove", experts_per_layer=dict(zip(result.layers, counts, strict=True)))
    if not result.kept_counts:
        result.kept_counts = dict(zip(result.layers, counts, strict=True))
    license_lines, license_meta = _license(src, result)
    lines = [front_matter(base, license_meta, result.mode), ""]
    what = "computed experts" if result.mode == "novice" else "routed experts"
    per = "per MoE layer" if len(set(counts)) == 1 else "per MoE layer (differs by layer)"
    lines.append(f"# {base or text(src.name)}, {_counts_text(counts)}/{e} {what} {per}")
    lines.append("")
    lines.append(_mode_paragraph(result, name, layout))
    lines.append("")
    top = str(result.top_k)
    if result.top_k != result.original_top_k:
        top += f" (lowered from {result.original_top_k})"
    ragged = result.mode == "remove" and result.ragged and not result.padded
    mode = result.mode + (" (ragged)" if ragged else "")
    if result.padded:
        mode += ", padded to a uniform count" if result.mode == "remove" else ", novices in expert biases"
    rows = [
        ("mode", mode),
        ("model type", text(raw_config.get("model_type", "?"))),
        ("MoE layers", str(len(result.layers))),
        (f"{what} per MoE layer", f"{e} -> {_counts_text(counts)}"),
        ("active experts per token (top-k)", top),
        ("weights", f"{human_bytes(result.bytes_in)} -> {human_bytes(result.bytes_out)}"),
        ("checkpoint layout", f"{result.layout}, {len(result.shards)} shard(s)"),
        ("loads with", "stock transformers" if result.stock else "`moeprune.load`"),
    ]
    if result.quantization:
        rows.append(("quantization", f"{result.quantization}, kept experts copied as stored"))
    if result.whole_layers:
        rows.append(
            (
                "hash-routed layers",
                f"{len(result.whole_layers)} kept whole (all {e} experts): they route by a token-id -> "
                "expert table that routing statistics cannot score",
            )
        )
    if result.dropped_mtp:
        rows.append(
            (
                "multi-token prediction",
                f"layer left out ({result.dropped_mtp} tensors; its experts are not pruned by this plan), "
                "`num_nextn_predict_layers: 0`",
            )
        )
    if plan:
        rows.append(("scoring method", text(plan.get("method", "?"))))
        settings = plan.get("settings") or {}
        if isinstance(settings, dict) and settings.get("scope"):
            rows.append(("budget", f"{text(settings.get('scope'))} scope"))
    data = _data_sources(plan, profile_meta)
    if data:
        rows.append(("calibration data", data))
    if profile_meta and profile_meta.get("tokens"):
        rows.append(("calibration tokens", text(profile_meta["tokens"])))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    replaced_name = "novice" if result.mode == "novice" else "removed"
    lines += ["", "## Experts kept per layer", ""]
    header = f"| layer | kept | {replaced_name} expert ids (original numbering) |"
    rule = "|---:|---:|---|"
    if layout.dead_experts:
        header += " dead padding slots |"
        rule += "---:|"
    lines += [header, rule]
    for layer in result.layers:
        removed = sorted(set(range(e)) - set(kept[layer]))
        row = f"| {layer} | {len(kept[layer])} | {', '.join(map(str, removed))} |"
        if layout.dead_experts:
            row += f" {len(layout.dead_experts.get(layer, []))} |"
        lines.append(row)
    lines += [
        "",
        "`plan.json` lists the kept experts of every layer in the original numbering"
        + (" and `profile-meta.json` describes the calibration run." if profile_meta else "."),
    ]
    wrapper = _wrapper_class_name(raw_config)
    if wrapper is not None:  # a multimodal checkpoint: only the language model's experts were pruned
        lines.append(
            f"Only the language model's routed experts were pruned; the rest of this `{wrapper}` "
            "checkpoint (vision/audio towers, projectors) is copied unchanged."
        )
    if result.stock:
        cls = wrapper or "AutoModelForCausalLM"
        lines.append(f"Load it with stock transformers: `{cls}.from_pretrained(path)`.")
    else:
        why = (
            "novice experts need moeprune's own experts module"
            if result.mode == "novice"
            else "its layers do not match one config count"
        )
        lines.append(
            f"Load it with `moeprune.load(path)` (keyword arguments go to `from_pretrained`; {INSTALL}). "
            f"Stock `from_pretrained` refuses it: {why}."
        )
        lines.append("")
        if result.remote_code_problem is None:
            lines.append(
                "Without moeprune, plain transformers loads it with its own small loader "
                "(`modeling_moeprune.py`, torch + transformers only, named by `auto_map`): "
                "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` or "
                '`pipeline("text-generation", model=path, trust_remote_code=True)`. Its `model_type` '
                "starts with `moeprune_` so that transformers refuses it without `trust_remote_code` "
                "rather than load it into the stock class (see docs/deploying.md)."
            )
        else:
            lines.append(
                "Plain transformers cannot load it without moeprune: no `modeling_moeprune.py` was "
                f"written because {result.remote_code_problem}. Its `model_type` starts with `moeprune_` "
                "so that transformers refuses it rather than load it into the stock class."
            )
    lines += _remote_code_section(result)
    lines += ["", "## License", "", *license_lines]
    return "\n".join(lines) + "\n"


def front_matter(base: str | None, license_meta: dict[str, str], mode: str) -> str:
    """The YAML metadata block the Hub reads (``---`` fenced)."""
    from . import __version__

    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta.update(license_meta)
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["moeprune", "mixture-of-experts", "expert-pruning", f"moeprune-{mode}"]
    meta["moeprune"] = {"version": __version__, "mode": mode}
    return "---\n" + "".join(_yaml_lines(meta)) + "---"


def _yaml_lines(meta: dict[str, Any], indent: str = "") -> list[str]:
    """Block-style YAML of a mapping of strings, lists of strings and such mappings, each string
    written as a JSON string (a valid YAML double-quoted scalar, ASCII, never read as another
    type). Written by hand because importing PyYAML to dump it was a third of a rewrite's fixed
    cost after the copy (docs/benchmarks.md); tests/test_card.py reads it back with PyYAML."""
    lines = []
    for key, value in meta.items():
        name = key if re.fullmatch(r"[a-z_]+", key) else json.dumps(str(key))
        if isinstance(value, dict):
            lines += [f"{indent}{name}:\n", *_yaml_lines(value, indent + "  ")]
        elif isinstance(value, list):
            lines += [f"{indent}{name}:\n", *(f"{indent}- {json.dumps(str(v))}\n" for v in value)]
        else:
            lines.append(f"{indent}{name}: {json.dumps(str(value))}\n")
    return lines


def _license(src: Path, result: RewriteResult) -> tuple[list[str], dict[str, str]]:
    """The card's license paragraph and the license fields of its metadata, from the source's card
    metadata (``license``, ``license_name``, ``license_link``) or its license files."""
    from .model_files import source_card_metadata

    source = source_card_metadata(src)
    files = list(result.source.license_files)
    meta: dict[str, str] = {}
    lic = source.get("license")
    if isinstance(lic, str) and _SPDX_LIKE.fullmatch(lic):
        meta["license"] = lic
        name = source.get("license_name")
        if isinstance(name, str) and _SPDX_LIKE.fullmatch(name):
            meta["license_name"] = name
        link = source.get("license_link")
        if isinstance(link, str) and (re.fullmatch(r"https://[\w./%#?=&~:+-]{1,300}", link) or link in files):
            meta["license_link"] = link
    elif files:
        meta = {"license": "other", "license_link": files[0]}
    lines: list[str] = []
    if "license" in meta and lic == meta["license"]:
        lines.append(
            f"The source model's card declares the license `{meta['license']}`; it applies to these weights."
        )
    if files:
        lines.append(f"The source's license file(s) are copied: {', '.join(text(f) for f in files)}.")
    if not lines:
        lines.append(
            "The source model states no license moeprune could read: check its terms before sharing."
        )
    if (src / "README.md").is_file():
        lines.append("The original model card is kept as `README.original.md`.")
    return lines, meta


def _remote_code_section(result: RewriteResult) -> list[str]:
    """A warning when the source needs its own Python code (``auto_map``)."""
    files = result.source
    if not files.remote_code:
        return []
    entries = ", ".join(text(x) for x in files.remote_code[:8])
    copied = ", ".join(text(f) for f in files.code_files)
    lines = [
        "",
        "## Remote code",
        "",
        f"**Warning:** the source model's config maps classes to its own Python code (`auto_map`: {entries}).",
    ]
    if copied:
        lines.append(
            f"The file(s) it names were copied unchanged ({copied}) and `auto_map` is kept, so "
            "`from_pretrained(path, trust_remote_code=True)` runs that code on your machine, as with the "
            "source: read it first. It was written for the unpruned model; moeprune lowered only the "
            "expert counts in `config.json` and did not check that the code honours them. moeprune itself "
            "never runs it (it builds the model from transformers' own class for the model type)."
        )
    else:
        lines.append("moeprune copied no Python file (none named by `auto_map` is in the model folder).")
    return lines


def _data_sources(plan: dict[str, Any] | None, profile_meta: dict[str, Any] | None) -> str:
    paths: list[str] = []
    metas: list[Any] = []
    if profile_meta:
        metas.append(profile_meta.get("data"))
    settings = (plan or {}).get("settings") or {}
    for p in (settings.get("profiles") if isinstance(settings, dict) else None) or []:
        if isinstance(p, dict):
            metas.append(p.get("data"))
    for data in metas:
        for d in data if isinstance(data, list) else []:
            path = d.get("path") if isinstance(d, dict) else d
            if path and str(path) not in paths:
                paths.append(str(path))
    return ", ".join(text(Path(p).name) for p in paths)

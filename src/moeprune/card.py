"""The model card (``README.md``) of a pruned checkpoint: what was pruned, how, and how to load it.

Written by :func:`moeprune.surgery.rewrite_checkpoint` from the rewrite's result, the plan and the
profile's metadata.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arch.pruned import PrunedLayout

if TYPE_CHECKING:
    from .surgery import RewriteResult


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
    return name if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name or "") else None


def _counts_text(counts: list[int]) -> str:
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _mode_paragraph(result: RewriteResult, base: str, layout: PrunedLayout) -> str:
    e = result.num_experts
    counts = list(result.kept_counts.values()) or [result.kept_per_layer]
    share = 100 * sum(counts) / (e * len(counts))
    if result.mode == "novice":
        text = (
            f"This checkpoint was written by moeprune from `{base}` in **novice mode** (MoNE): the router "
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
        f"This checkpoint was written by moeprune from `{base}` by **removing routed experts** (the "
        f"Remove mode of EASY-EP and PreMoe's PEP): each MoE layer keeps {_counts_text(counts)} of its {e} "
        f"routed experts ({share:.1f}% overall), with their router rows and selection-bias entries; the "
        "kept experts stay in their original order and are renumbered from 0. Routing picks the top-k "
        "among the kept experts and renormalises exactly as the architecture does, so the model equals "
        "the original one with the removed experts' router logits set to -inf. Shared experts, attention "
        "and dense layers are unchanged."
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
    e = result.num_experts
    counts = [len(kept[layer]) for layer in result.layers]
    if layout is None:
        layout = PrunedLayout(mode="remove", experts_per_layer=dict(zip(result.layers, counts, strict=True)))
    if not result.kept_counts:
        result.kept_counts = dict(zip(result.layers, counts, strict=True))
    lines: list[str] = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- moeprune", "- mixture-of-experts", "- expert-pruning", "---", ""]
    title = base or src.name
    what = "computed experts" if result.mode == "novice" else "routed experts"
    per = "per MoE layer" if len(set(counts)) == 1 else "per MoE layer (differs by layer)"
    lines.append(f"# {title}, {_counts_text(counts)}/{e} {what} {per}")
    lines.append("")
    lines.append(_mode_paragraph(result, base or src.name, layout))
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
        ("model type", str(raw_config.get("model_type", "?"))),
        ("MoE layers", str(len(result.layers))),
        (f"{what} per MoE layer", f"{e} -> {_counts_text(counts)}"),
        ("active experts per token (top-k)", top),
        ("weights", f"{human_bytes(result.bytes_in)} -> {human_bytes(result.bytes_out)}"),
        ("checkpoint layout", f"{result.layout}, {len(result.shards)} shard(s)"),
        ("loads with", "stock transformers" if result.stock else "`moeprune.load`"),
    ]
    if plan:
        rows.append(("scoring method", str(plan.get("method", "?"))))
        settings = plan.get("settings") or {}
        if settings.get("scope"):
            rows.append(("budget", f"{settings.get('scope')} scope"))
    data = _data_sources(plan, profile_meta)
    if data:
        rows.append(("calibration data", data))
    if profile_meta and profile_meta.get("tokens"):
        rows.append(("calibration tokens", str(profile_meta["tokens"])))
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
    if result.stock:
        lines.append("Load it with stock transformers: `AutoModelForCausalLM.from_pretrained(path)`.")
    else:
        why = (
            "novice experts need moeprune's own experts module"
            if result.mode == "novice"
            else "its layers do not match one config count"
        )
        lines.append(
            "Load it with `moeprune.load(path)` (`pip install moeprune`; keyword arguments go to "
            f"`from_pretrained`). Stock `from_pretrained` refuses it: {why}."
        )
    if (src / "README.md").is_file():
        lines.append("The original model card is kept as `README.original.md` (its license applies).")
    return "\n".join(lines) + "\n"


def _data_sources(plan: dict[str, Any] | None, profile_meta: dict[str, Any] | None) -> str:
    paths: list[str] = []
    metas: list[Any] = []
    if profile_meta:
        metas.append(profile_meta.get("data"))
    for p in ((plan or {}).get("settings") or {}).get("profiles") or []:
        if isinstance(p, dict):
            metas.append(p.get("data"))
    for data in metas:
        for d in data or []:
            path = d.get("path") if isinstance(d, dict) else d
            if path and str(path) not in paths:
                paths.append(str(path))
    return ", ".join(f"`{Path(p).name}`" for p in paths)

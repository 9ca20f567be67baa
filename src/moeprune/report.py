"""`moeprune report`: an HTML page of how domains use the experts (computations and writer).

The numbers are pure functions of profiles (``docs/profile-format.md``):

* :func:`gate_share` -- each layer's gate mass per expert, as a share of the layer's total;
* :func:`top_sets` / :func:`jaccard` / :func:`domain_overlap` -- the kept top-M expert sets of
  each domain by a method's score, and their per-layer Jaccard overlap between domains;
* :func:`few_shot_overlap` -- EASY-EP's few-shot expert localization: the overlap of the top-M set
  computed from n random demonstrations (``sample_gate``) with the set from all of them;
* :func:`kept_gate_mass` -- the share of calibration gate mass each layer keeps at a keep ratio.

:func:`write_report` draws the plots (matplotlib, Agg) and writes ``index.html`` beside them
into a folder; the command (``moeprune.commands.report``) handles files and errors.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .plan import experts_to_keep

__all__ = [
    "FEW_SHOT_NS",
    "RATIOS",
    "check_same_model",
    "compute_report",
    "domain_overlap",
    "few_shot_overlap",
    "gate_share",
    "jaccard",
    "kept_gate_mass",
    "top_sets",
    "write_report",
]

FEW_SHOT_NS = (1, 2, 5, 10, 25)
RATIOS = (0.75, 0.5, 0.25, 0.125)
FEW_SHOT_DRAWS = 5


# --- computations -------------------------------------------------------------------------------


def check_same_model(profiles: Sequence[Any], names: Sequence[str]) -> None:
    """Refuse profiles of different models (fingerprint, router weights or expert layout)."""
    from .identity import KEY, differs

    first = profiles[0]
    for prof, name in zip(profiles[1:], names[1:], strict=True):
        same_print = prof.meta.get("model_fingerprint") == first.meta.get("model_fingerprint")
        same_print = same_print and not differs(prof.meta.get(KEY), first.meta.get(KEY))  # router weights
        same_shape = tuple(prof.tensors["gate"].shape) == tuple(first.tensors["gate"].shape)
        if not (same_print and same_shape):
            raise UserError(
                f"profiles '{names[0]}' (model '{first.meta.get('model')}') and '{name}' "
                f"(model '{prof.meta.get('model')}') are of different models",
                "report only profiles made on the same model",
            )


def gate_share(gate: torch.Tensor) -> torch.Tensor:
    """[L, E] gate sums -> each expert's share of its layer's gate mass (an all-zero layer stays 0)."""
    gate = gate.to(torch.float64)
    total = gate.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, gate / torch.where(total > 0, total, 1.0), torch.zeros_like(gate))


def top_sets(scores: torch.Tensor, m: int) -> list[set[int]]:
    """The top-``m`` experts of every layer (ties: the lower id, as ``make_plan`` breaks them)."""
    order = torch.sort(scores.to(torch.float64), dim=-1, descending=True, stable=True).indices
    return [set(row[:m].tolist()) for row in order]


def jaccard(a: set[int], b: set[int]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def domain_overlap(scores: Sequence[torch.Tensor], m: int) -> dict[tuple[int, int], list[float]]:
    """Per-layer Jaccard of the top-``m`` sets of every pair (i, j), i < j, of the domains' scores."""
    sets = [top_sets(s, m) for s in scores]
    return {
        (i, j): [jaccard(a, b) for a, b in zip(sets[i], sets[j], strict=True)]
        for i, j in itertools.combinations(range(len(scores)), 2)
    }


def few_shot_overlap(
    sample_gate: torch.Tensor,
    m: int,
    ns: Sequence[int] = FEW_SHOT_NS,
    draws: int = FEW_SHOT_DRAWS,
    seed: int = 0,
) -> dict[int, list[float]]:
    """{n: per-layer Jaccard of the top-``m`` gate set from n random samples with the set from all},
    averaged over ``draws`` seeded draws (n is capped at the number of samples S; at n = S the
    overlap is exactly 1). ``sample_gate`` is [S, L, E]."""
    sg = sample_gate.to(torch.float64)
    n_samples = int(sg.shape[0])
    if n_samples < 1:
        return {}
    full = top_sets(sg.sum(0), m)
    out: dict[int, list[float]] = {}
    for n in sorted({min(int(x), n_samples) for x in ns if int(x) >= 1}):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
        total = [0.0] * len(full)
        k = 1 if n == n_samples else draws
        for _ in range(k):
            idx = torch.randperm(n_samples, generator=gen)[:n]
            part = top_sets(sg[idx].sum(0), m)
            for layer, (a, b) in enumerate(zip(part, full, strict=True)):
                total[layer] += jaccard(a, b)
        out[n] = [t / k for t in total]
    return out


def kept_gate_mass(gate: torch.Tensor, scores: torch.Tensor, ratio: float) -> list[float]:
    """Per layer, the share of the gate mass on the experts a per-layer top-K plan keeps at
    ``ratio`` (K = round(ratio x E), at least 1, as ``make_plan`` counts it; router groups ignored)."""
    gate = gate.to(torch.float64)
    k = experts_to_keep(float(ratio), int(gate.shape[1]))
    out = []
    for row, kept in enumerate(top_sets(scores, k)):
        total = float(gate[row].sum())
        out.append(float(gate[row, sorted(kept)].sum()) / total if total > 0 else 0.0)
    return out


def compute_report(
    profiles: Sequence[Any], names: Sequence[str], method: str, top: int | None = None
) -> dict[str, Any]:
    """Every number of the page, as plain Python data (lists indexed by layer position)."""
    from .score import score

    if not profiles:
        raise UserError("no profile given", "pass at least one profile")
    check_same_model(profiles, names)
    first = profiles[0]
    n_experts = int(first.tensors["gate"].shape[1])
    m = n_experts // 2 if top is None else int(top)
    if not 1 <= m <= n_experts:
        raise UserError(f"--top {m} is outside 1..{n_experts}", f"pass a count from 1 to {n_experts}")
    scores = [score(p, method) for p in profiles]
    shares = [gate_share(p.tensors["gate"]) for p in profiles]
    domains = []
    for name, prof, sc, share in zip(names, profiles, scores, shares, strict=True):
        sg = prof.tensors.get("sample_gate")
        domains.append(
            {
                "name": name,
                "tokens": int(prof.meta.get("tokens", 0)),
                "samples": int(prof.meta.get("samples", 0)),
                "share": share.tolist(),
                "kept_mass": {r: kept_gate_mass(prof.tensors["gate"], sc, r) for r in RATIOS},
                "few_shot": None if sg is None else few_shot_overlap(sg, m),
            }
        )
    overlap = domain_overlap(scores, m)
    return {
        "model": str(first.meta.get("model", "?")),
        "layers": [int(x) for x in first.meta.get("layers", range(len(shares[0])))],
        "num_experts": n_experts,
        "top_k": first.meta.get("top_k"),
        "method": method,
        "top": m,
        "domains": domains,
        "overlap": [{"a": i, "b": j, "per_layer": v} for (i, j), v in overlap.items()],
    }


# --- plots and page ------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _heatmap(path: Path, data: torch.Tensor, title: str, layers: list[int], diff: bool = False) -> None:
    import matplotlib.pyplot as plt

    n_layers, n_experts = data.shape
    fig, ax = plt.subplots(figsize=(min(14.0, 2.5 + 0.28 * n_experts), 1.6 + 0.35 * n_layers))
    if diff:
        lim = float(data.abs().max()) or 1.0
        im = ax.imshow(
            data.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest"
        )
    else:
        im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([str(x) for x in layers])
    step = max(1, n_experts // 16)
    ax.set_xticks(range(0, n_experts, step))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="difference of gate share" if diff else "share of layer gate mass")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _lines(
    path: Path,
    series: dict[str, tuple[list[Any], list[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    xlog: bool = False,
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    for label, (xs, ys) in series.items():
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if label == "mean" else {}
        ax.plot(xs, ys, marker="o", label=label, **style)
    if xlog:
        ax.set_xscale("log")
    xs_all = sorted({x for xs, _ in series.values() for x in xs})
    if len(xs_all) <= 24:  # label exactly the measured points (layer indices, n, ratios)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
        ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(name: str, alt: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;display:block;margin:.6em 0}.note{color:#555;font-size:.92em}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.4em .8em}
"""


def write_report(folder: Path, rep: dict[str, Any]) -> list[str]:
    """Draw the plots and write ``index.html`` into ``folder``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")

    folder = Path(folder)
    files: list[str] = []
    layers = rep["layers"]
    domains = rep["domains"]
    names = [d["name"] for d in domains]
    esc = html.escape
    parts: list[str] = []
    parts.append(f"<h1>Expert usage report: {esc(rep['model'])}</h1>")
    parts.append(
        f"<p>{len(layers)} MoE layers x {rep['num_experts']} routed experts (top-{esc(str(rep['top_k']))}). "
        f"Scoring method <b>{esc(rep['method'])}</b>; kept set size M = {rep['top']} experts per layer.</p>"
    )
    parts.append(
        _table(
            ["domain", "tokens", "samples", "per-sample data"],
            [
                [d["name"], f"{d['tokens']:,}", d["samples"], "yes" if d["few_shot"] is not None else "no"]
                for d in domains
            ],
        )
    )

    # --- heatmaps
    parts.append("<h2>Expert usage (share of each layer's gate mass)</h2>")
    for k, d in enumerate(domains):
        fname = f"usage_{k}.png"
        _heatmap(folder / fname, torch.tensor(d["share"]), f"{d['name']}: gate share", layers)
        files.append(fname)
        parts.append(f"<h3>{esc(d['name'])}</h3>" + _img(fname, f"usage heatmap of {d['name']}"))
    if len(domains) > 1:
        parts.append("<h2>Usage difference between domains</h2>")
        parts.append('<p class="note">Red: the first domain uses the expert more; blue: the second.</p>')
        for i, j in itertools.combinations(range(len(domains)), 2):
            fname = f"diff_{i}_{j}.png"
            data = torch.tensor(domains[i]["share"]) - torch.tensor(domains[j]["share"])
            _heatmap(folder / fname, data, f"{names[i]} minus {names[j]}", layers, diff=True)
            files.append(fname)
            parts.append(f"<h3>{esc(names[i])} − {esc(names[j])}</h3>" + _img(fname, "difference heatmap"))

    # --- overlap between domains
    parts.append(
        f"<h2>Overlap of the kept experts between domains (top-{rep['top']} by {esc(rep['method'])})</h2>"
    )
    if len(domains) < 2:
        parts.append('<p class="note">Only one profile was given; pass two or more to compare domains.</p>')
    else:
        parts.append(
            '<p class="note">Jaccard overlap |A ∩ B| / |A ∪ B| of the per-layer kept sets; 1 = the same '
            "experts, 0 = disjoint.</p>"
        )
        header = ["pair", *[f"layer {x}" for x in layers], "mean"]
        rows = [
            [f"{names[o['a']]} vs {names[o['b']]}", *o["per_layer"], _mean(o["per_layer"])]
            for o in rep["overlap"]
        ]
        parts.append(_table(header, rows))
        series = {f"{names[o['a']]} vs {names[o['b']]}": (layers, o["per_layer"]) for o in rep["overlap"]}
        _lines(folder / "overlap.png", series, "MoE layer", "Jaccard overlap", "Kept-set overlap per layer")
        files.append("overlap.png")
        parts.append(_img("overlap.png", "overlap per layer"))

    # --- few-shot stability
    parts.append(f"<h2>Few-shot stability (top-{rep['top']} by gate mass)</h2>")
    parts.append(
        '<p class="note">As in EASY-EP\'s few-shot expert localization: the kept set computed from n '
        "random demonstrations is compared (Jaccard) with the set from all of them; averaged over "
        f"{FEW_SHOT_DRAWS} seeded draws. Per-sample statistics hold only gate sums, so the sets are "
        "ranked by gate mass whatever the method.</p>"
    )
    for k, d in enumerate(domains):
        parts.append(f"<h3>{esc(d['name'])}</h3>")
        fs = d["few_shot"]
        if fs is None:
            parts.append(
                '<p class="warn">This profile has no per-sample data (it was made with '
                "<code>--no-per-sample</code>, over the default size limit, or by an older moeprune), "
                "so few-shot stability cannot be computed. Profile again: <code>moeprune profile</code> "
                "stores it by default, <code>--per-sample</code> whatever its size.</p>"
            )
            continue
        ns = sorted(fs)
        header = ["n demonstrations", *[f"layer {x}" for x in layers], "mean"]
        parts.append(_table(header, [[n, *fs[n], _mean(fs[n])] for n in ns]))
        series = {f"layer {x}": (ns, [fs[n][row] for n in ns]) for row, x in enumerate(layers)}
        series["mean"] = (ns, [_mean(fs[n]) for n in ns])
        fname = f"fewshot_{k}.png"
        _lines(
            folder / fname,
            series,
            "demonstrations n",
            "Jaccard with all samples",
            f"{d['name']}: few-shot stability",
            xlog=True,
        )
        files.append(fname)
        parts.append(_img(fname, f"few-shot stability of {d['name']}"))

    # --- gate mass kept
    parts.append(f"<h2>Calibration gate mass kept by {esc(rep['method'])}</h2>")
    parts.append(
        '<p class="note">Per layer, the share of the calibration gate mass on the experts a per-layer '
        "plan keeps at each keep ratio (router groups ignored).</p>"
    )
    for k, d in enumerate(domains):
        parts.append(f"<h3>{esc(d['name'])}</h3>")
        header = ["keep ratio", "experts kept", *[f"layer {x}" for x in layers], "mean"]
        rows = [
            [f"{r:g}", experts_to_keep(float(r), rep["num_experts"]), *v, _mean(v)]
            for r, v in d["kept_mass"].items()
        ]
        parts.append(_table(header, rows))
        ratios = list(d["kept_mass"])
        series = {
            f"layer {x}": (ratios, [d["kept_mass"][r][row] for r in ratios]) for row, x in enumerate(layers)
        }
        fname = f"kept_mass_{k}.png"
        _lines(folder / fname, series, "keep ratio", "gate mass kept", f"{d['name']}: gate mass kept")
        files.append(fname)
        parts.append(_img(fname, f"gate mass kept for {d['name']}"))

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>moeprune report: {esc(rep['model'])}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts)
        + '\n<p class="note">Written by <code>moeprune report</code>.</p></body></html>\n'
    )
    (folder / "index.html").write_text(page, encoding="utf-8")
    return ["index.html", *files]


def missing_stability_note(rep: dict[str, Any]) -> str | None:
    """One line naming the domains without few-shot stability (no per-sample data), or None."""
    missing = [d["name"] for d in rep["domains"] if d["few_shot"] is None]
    if not missing:
        return None
    return (
        f"no few-shot stability for {', '.join(missing)}: the profile has no per-sample data; profile "
        "again (`moeprune profile` stores it by default, --per-sample whatever its size)"
    )

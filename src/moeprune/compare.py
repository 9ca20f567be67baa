"""Compare scoring methods and keep ratios on one loaded model, without writing any checkpoint.

For every profile (domain), method and keep ratio, :func:`compare` makes the plan in memory
(:func:`moeprune.plan.make_plan`, honouring the profile's routing groups) and evaluates the model
with the plan's removed experts masked out of routing (:func:`moeprune.arch.patch.patch_moe`,
``BlockControl(allowed=...)``: the pruning reference semantics, so the numbers equal those of the
checkpoint ``moeprune prune`` would write). With ``novice=True`` it also evaluates MoNE's novice
mode: the router is unchanged and each replaced expert outputs its calibration mean ``mone_mean``.
In mask rows only the router is steered: the experts run their own forward (``stock_experts``,
the model's fastest implementation, as the pruned checkpoint runs it), over the kept experts alone
where the mask allows (:mod:`moeprune.arch.compact`: moved in front of the experts' tensors in
place for the row, and back); novice rows use the per-slot forward, which does not compute the
replaced experts (docs/benchmarks.md, "compare rows").

Several profiles: one plan per profile (each domain's own experts), and the mixed-domain plan
(EASY-EP: per-layer-normalised scores averaged over the domains), every one evaluated on all tasks.

Rows (``list[dict]``), in order: the full model, then per domain, keep and method the ``mask`` row
(and the ``novice`` row). A keep ratio that the model cannot honour (fewer experts than top-k, or
invalid for group-limited routing) gives one row per domain with ``skipped`` set to the reason.

Resuming: :class:`PartialRows` appends each finished row to ``<out>.partial.jsonl`` under a header
naming what the rows depend on (:func:`run_identity`: the model, each profile's and task's content
hash, the evaluation settings); a rerun with the same identity passes its rows as ``done`` and
evaluates only the others (methods and keeps may be added); the file goes once the results are
written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .plan import plan_from_profile

__all__ = [
    "DEFAULT_KEEPS",
    "MIXED",
    "PartialRows",
    "compare",
    "default_methods",
    "main_metric",
    "row_key",
    "run_identity",
    "task_metrics",
]

DEFAULT_KEEPS: tuple[float, ...] = (0.75, 0.5, 0.25, 0.125)
MIXED = "mixed"
FULL = "full"

# the metric shown per task kind, and whether higher is better
MAIN_METRIC = {
    "perplexity": ("perplexity", False),
    "exact_match": ("accuracy", True),
    "multiple_choice": ("acc", True),
}


def default_methods() -> list[str]:
    from .score import SCORES

    return list(SCORES)


def main_metric(kind: str) -> tuple[str, bool]:
    """(metric name, higher is better) of a task kind."""
    return MAIN_METRIC.get(kind, ("accuracy", True))


def check_keeps(keeps: Sequence[int | float], num_experts: int | None) -> list[int | float]:
    """Keep ratios (floats in (0, 1]) or expert counts (ints 1..E); anything else is a UserError."""
    out: list[int | float] = []
    for keep in keeps:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise UserError(
                f"keep {keep!r} is not a number", "pass a fraction such as 0.5, or an expert count"
            )
        if isinstance(keep, float):
            if math.isnan(keep) or not 0.0 < keep <= 1.0:
                raise UserError(
                    f"keep fraction {keep:g} is outside (0, 1]",
                    "pass fractions such as --keep 0.5 --keep 0.25",
                )
        elif keep < 1:
            raise UserError(
                f"cannot keep {keep} experts per layer", "pass a count of 1 or more, or a fraction"
            )
        elif num_experts is not None and keep > num_experts:
            raise UserError(
                f"cannot keep {keep} experts per layer: the model has {num_experts}",
                f"pass a count from 1 to {num_experts} or a fraction in (0, 1]",
            )
        if keep in out:
            raise UserError(f"keep {keep:g} is given twice", "pass each keep ratio once")
        out.append(keep)
    return out


def _keep_problem(meta: dict[str, Any], keep: int | float) -> str | None:
    """Why ``keep`` cannot be planned for this model (below top-k, invalid for the groups), or None."""
    n_experts = int(meta["num_experts"])
    n_layers = len(meta["layers"])
    try:
        plan_from_profile(torch.zeros(n_layers, n_experts, dtype=torch.float64), meta, keep=keep, method="check")
    except UserError as exc:
        return exc.problem
    return None


def _scores(profiles: Sequence[Any], method: str, seed: int) -> torch.Tensor:
    from .score import combined_score, score

    options = {"seed": seed} if method == "random" else {}
    if len(profiles) == 1:
        return score(profiles[0], method, **options)
    return combined_score(profiles, method, **options)


def _novice_means(profiles: Sequence[Any], fit: str = "mean") -> torch.Tensor:
    """The novices [L, E, H] of the union of the profiles' data: ``mean`` (mone_mean, the
    count-weighted mean of the means) or ``lsq`` (novice_lsq, weighted by Σ g²)."""
    vecs = [p.novices(fit).double() for p in profiles]
    if len(profiles) == 1:
        return vecs[0]
    weight = "count" if fit == "mean" else "gate_sq"
    num = sum(p.tensors[weight].to(torch.float64).unsqueeze(-1) * v for p, v in zip(profiles, vecs, strict=True))
    den = sum(p.tensors[weight].to(torch.float64) for p in profiles).unsqueeze(-1)
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def check_profiles(model: Any, profiles: Sequence[Any], blocks: Sequence[Any], names: Sequence[str]) -> None:
    """Error unless every profile was made on this model (same expert layout)."""
    from .identity import model_router_digest
    from .profile import fingerprint_fields, model_fingerprint

    mine = model_fingerprint(fingerprint_fields(model.config, blocks))
    router = model_router_digest(model, blocks)
    for prof, name in zip(profiles, names, strict=True):
        if prof.meta.get("model_fingerprint") != mine:
            prof.check_model(model.config, getattr(model, "name_or_path", None), blocks)  # names both
            raise UserError(f"profile '{name}' was made on another model", "profile this model first")
        prof.check_model(model.config, getattr(model, "name_or_path", None), blocks, router)


def task_metrics(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``evaluate()`` output -> {task: metrics}."""
    return {name: dict(res.get("metrics", {})) for name, res in result["tasks"].items()}


def compare(
    model: Any,
    tokenizer: Any,
    profiles: Sequence[Any],
    tasks: Sequence[Any],
    methods: Sequence[str] | None = None,
    keeps: Sequence[int | float] | None = None,
    novice: bool = True,
    *,
    profile_names: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    max_length: int = 1024,
    seed: int = 0,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    done: Mapping[str, dict[str, Any]] | None = None,
    novice_fit: str = "mean",
) -> list[dict[str, Any]]:
    """Evaluate the full model and every (domain, keep, method[, novice]) variant; see the module doc.

    ``novice_fit``: what the novice rows' vectors are fitted to (``mean`` or ``lsq``,
    :meth:`moeprune.profile.Profile.novices`).

    ``profiles`` are :class:`moeprune.profile.Profile` objects of this model; ``tasks`` are
    :class:`moeprune.evaluate.Task` objects or ``--task`` strings. Each row is a dict with
    ``domain``, ``method``, ``keep`` (as given), ``experts`` (kept per layer), ``kept_fraction``,
    ``mode`` (``full``, ``mask`` or ``novice``), ``skipped`` (None or the reason) and ``tasks``
    ({task: metrics}). ``on_row`` is called with each row as soon as it is done. ``done``
    ({:func:`row_key`: row}, rows of an interrupted run with the same :func:`run_identity`) are
    taken as they are instead of being evaluated again.
    """
    from .arch import find_moe_blocks
    from .arch.patch import BlockControl, patch_moe
    from .evaluate.runners import evaluate
    from .evaluate.tasks import parse_task_spec
    from .score import check_method

    if not profiles:
        raise UserError("no profile given", "pass at least one profile (--profile)")
    names = (
        list(profile_names)
        if profile_names is not None
        else [str(getattr(p, "path", None) or f"profile{i}") for i, p in enumerate(profiles)]
    )
    if len(names) != len(profiles):
        raise UserError("profile_names and profiles differ in length", "pass one name per profile")
    if len(set(names)) != len(names) or MIXED in names:
        raise UserError(f"profile names {names} are not distinct", f"name the domains apart (not '{MIXED}')")
    methods = list(methods) if methods else default_methods()
    for m in methods:
        check_method(m)
    if len(set(methods)) != len(methods):
        raise UserError("a method is given twice", "pass each --method once")
    task_list = []
    for t in tasks:
        task_list.extend(parse_task_spec(t) if isinstance(t, str) else [t])
    if not task_list:
        raise UserError("no task given", "pass at least one --task")
    blocks = find_moe_blocks(model)
    check_profiles(model, profiles, blocks, names)
    meta = profiles[0].meta
    keeps = check_keeps(list(keeps) if keeps else list(DEFAULT_KEEPS), int(meta["num_experts"]))
    n_experts = int(meta["num_experts"])
    by_layer = {b.layer: b for b in blocks}
    device = next(model.parameters()).device

    def run(controls: dict[int, Any] | None) -> dict[str, dict[str, Any]]:
        kwargs = dict(
            limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length
        )
        with torch.no_grad():
            if controls is None:
                return task_metrics(evaluate(model, tokenizer, task_list, progress=progress, **kwargs))
            # mask rows: the experts' own forward (as fast as the pruned checkpoint); novice rows
            # keep the per-slot forward, which skips the replaced experts' computation (the stock
            # forward would compute them at weight 0: slower when many are replaced)
            stock = not any(c.novices for c in controls.values())
            with patch_moe(model, blocks, controls=controls, stock_experts=stock):
                return task_metrics(evaluate(model, tokenizer, task_list, progress=progress, **kwargs))

    def mask_controls(plan: Any) -> dict[int, Any]:
        mask = plan.kept_mask()
        return {
            by_layer[layer].index: BlockControl(allowed=mask[row].to(device))
            for row, layer in enumerate(plan.layers)
        }

    def novice_controls(plan: Any, means: Any) -> dict[int, Any]:
        controls = {}
        for row, layer in enumerate(plan.layers):
            vecs = {i: means[row, i].to(device=device, dtype=torch.float32) for i in plan.replaced[layer]}
            controls[by_layer[layer].index] = BlockControl(novices=vecs)
        return controls

    rows: list[dict[str, Any]] = []
    done = done or {}

    def emit(row: dict[str, Any], controls: Callable[[], dict[int, Any] | None] | None = None) -> None:
        """Add ``row``: evaluated with ``controls()`` unless an earlier run finished it."""
        if controls is not None:
            row = done.get(row_key(row)) or {**row, "tasks": run(controls())}
        rows.append(row)
        if on_row is not None:
            on_row(row)

    full_row = {
        "domain": "-",
        "method": FULL,
        "keep": 1.0,
        "experts": n_experts,
        "kept_fraction": 1.0,
        "mode": FULL,
        "skipped": None,
    }
    emit(full_row, lambda: None)

    domains: list[tuple[str, list[Any]]] = [(n, [p]) for n, p in zip(names, profiles, strict=True)]
    if len(profiles) > 1:
        domains.append((MIXED, list(profiles)))
    for domain, group in domains:
        means = _novice_means(group, novice_fit) if novice else None
        scores = {m: _scores(group, m, seed) for m in methods}
        for keep in keeps:
            problem = _keep_problem(meta, keep)
            if problem is not None:
                emit(
                    {
                        "domain": domain,
                        "method": "*",
                        "keep": keep,
                        "experts": None,
                        "kept_fraction": (keep / n_experts if isinstance(keep, int) else float(keep)),
                        "mode": "-",
                        "skipped": problem,
                        "tasks": {},
                    }
                )
                continue
            for method in methods:
                plan = plan_from_profile(scores[method], meta, keep=keep, method=method)
                k = plan.settings["experts_per_layer"]
                base = {
                    "domain": domain,
                    "method": method,
                    "keep": keep,
                    "experts": k,
                    "kept_fraction": k / n_experts,
                    "skipped": None,
                    "kept": {str(layer): ids for layer, ids in plan.kept.items()},
                }
                emit({**base, "mode": "mask"}, functools.partial(mask_controls, plan))
                if novice:
                    emit({**base, "mode": "novice"}, functools.partial(novice_controls, plan, means))
    return rows


# --- resuming -------------------------------------------------------------------------------------

PARTIAL_FORMAT = "moeprune-compare-partial/1"


def row_key(row: Mapping[str, Any]) -> str:
    """What identifies a row within one run: domain, method, keep as given, mode."""
    return json.dumps([row["domain"], row["method"], row["keep"], row["mode"]])


def _file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_identity(
    model: str, profiles: Mapping[str, str | Path], tasks: Sequence[Any], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """What a compare row depends on besides its key: the model, each domain's profile (content
    hash), each task's records (content hash) and ``settings`` (limit, batch size, ...; not the
    methods, keeps or novice switch, so a rerun may add some)."""
    task_hashes = {
        t.name: hashlib.sha256(json.dumps([t.kind, t.records], sort_keys=True, default=str).encode()).hexdigest()
        for t in tasks
    }
    return {
        "model": str(model),
        "profiles": {name: _file_hash(path) for name, path in profiles.items()},
        "tasks": task_hashes,
        "settings": dict(settings),
    }


class PartialRows:
    """The finished rows of a compare run, one JSON line each, kept until the results are written.

    Opening reads the rows of an earlier run with the same identity (:attr:`done`); a file made
    with another identity is replaced (:attr:`note` says so)."""

    def __init__(self, path: str | Path, identity: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity, default=str))
        self.done: dict[str, dict[str, Any]] = {}
        self.note: str | None = None
        if self.path.exists():
            self._read()
        if not self.done:
            self.path.write_text(json.dumps({"format": PARTIAL_FORMAT, "identity": self.identity}) + "\n")

    def _read(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            head = json.loads(lines[0]) if lines else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            head = {}
        if not isinstance(head, dict) or head.get("format") != PARTIAL_FORMAT:
            self.note = f"replacing '{self.path}' (not a compare partial file)"
            return
        if head.get("identity") != self.identity:
            self.note = f"replacing '{self.path}': its rows were made with other data or settings"
            return
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the interruption
                continue
            if isinstance(row, dict) and "tasks" in row:
                self.done[row_key(row)] = row
        if self.done:
            self.note = f"resuming: {len(self.done)} finished rows from '{self.path}'"

    def add(self, row: Mapping[str, Any]) -> None:
        key = row_key(row)
        if key in self.done:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        self.done[key] = dict(row)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def interrupted(self) -> UserError:
        """The one line for Ctrl-C: where the finished rows are (exit code 130)."""
        err = UserError(
            f"interrupted; {len(self.done)} finished rows are kept in '{self.path}'",
            "run the same command again to resume",
        )
        err.exit_code = 130
        return err


def partial_path(out: str | Path) -> Path:
    """Where the finished rows of ``--out DIR`` are kept until DIR is written: ``DIR.partial.jsonl``."""
    out = Path(out).expanduser()
    return out.with_name(out.name + ".partial.jsonl")


# --- reporting ------------------------------------------------------------------------------------


def task_kinds(rows: Sequence[dict[str, Any]], kinds: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """{task: (main metric, higher is better)} for the tasks of ``kinds`` ({task: kind})."""
    return {name: main_metric(kind) for name, kind in kinds.items()}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def keep_label(row: dict[str, Any], num_experts: int) -> str:
    if row["experts"] is None:
        keep = row["keep"]
        return f"{keep:g}" if isinstance(keep, float) else f"{keep}/{num_experts}"
    return f"{row['experts']}/{num_experts}"


def table_rows(
    rows: Sequence[dict[str, Any]], metrics: dict[str, tuple[str, bool]], num_experts: int
) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table (one column per task's main metric, then a note)."""
    header = ["domain", "method", "keep", "mode"]
    header += [f"{task} {metric}{' ↑' if up else ' ↓'}" for task, (metric, up) in metrics.items()]
    header.append("note")
    cells = []
    for row in rows:
        line = [row["domain"], row["method"], keep_label(row, num_experts), row["mode"]]
        for task, (metric, _up) in metrics.items():
            line.append(_fmt(row["tasks"].get(task, {}).get(metric)))
        line.append(f"skipped: {row['skipped']}" if row["skipped"] else "")
        cells.append(line)
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def write_csv(path: Any, rows: Sequence[dict[str, Any]]) -> None:
    import csv

    metric_cols: list[str] = []
    for row in rows:
        for task, ms in row["tasks"].items():
            for m in ms:
                col = f"{task}.{m}"
                if col not in metric_cols:
                    metric_cols.append(col)
    fields = ["domain", "method", "keep", "experts", "kept_fraction", "mode", "skipped", *metric_cols]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for row in rows:
            vals = [
                row["domain"],
                row["method"],
                row["keep"],
                row["experts"],
                row["kept_fraction"],
                row["mode"],
            ]
            vals.append(row["skipped"] or "")
            for col in metric_cols:
                task, _, m = col.partition(".")
                v = row["tasks"].get(task, {}).get(m)
                vals.append("" if v is None else v)
            w.writerow(vals)


def write_plots(
    out_dir: Any, rows: Sequence[dict[str, Any]], metrics: dict[str, tuple[str, bool]]
) -> list[str]:
    """``plot_<task>.png`` per task: main metric against kept fraction, one line per method (solid:
    mask/removal, dashed: novice), one panel per domain, the full model as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r for r in rows if r["mode"] == FULL), None)
    variants = [r for r in rows if r["mode"] in ("mask", "novice") and not r["skipped"]]
    domains = list(dict.fromkeys(r["domain"] for r in variants)) or ["-"]
    methods = list(dict.fromkeys(r["method"] for r in variants))
    written = []
    for task, (metric, _up) in metrics.items():
        fig = plot_figure(task, metric, full, variants, domains, methods)
        name = f"plot_{_safe(task)}.png"
        # bbox "tight": the figure grows to hold the legend below the panels
        fig.savefig(f"{out_dir}/{name}", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written


def plot_figure(
    task: str,
    metric: str,
    full: dict[str, Any] | None,
    variants: Sequence[dict[str, Any]],
    domains: Sequence[str],
    methods: Sequence[str],
) -> Any:
    """One task's figure (see :func:`write_plots`); one legend for all panels, below them, so that
    it covers no curve."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for mi, method in enumerate(methods):
            for mode, style in (("mask", "-o"), ("novice", "--x")):
                pts = sorted(
                    (r["kept_fraction"], r["tasks"].get(task, {}).get(metric))
                    for r in variants
                    if r["domain"] == domain and r["method"] == method and r["mode"] == mode
                )
                pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
                if not pts:
                    continue
                label = method if mode == "mask" else f"{method} (novice)"
                ax.plot(
                    [p[0] for p in pts], [p[1] for p in pts], style, color=colors(mi % 10), label=label
                )
        if full is not None:
            level = full["tasks"].get(task, {}).get(metric)
            if level is not None and math.isfinite(level):
                ax.axhline(level, color="black", linestyle=":", linewidth=1.2, label="full model")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("kept fraction of experts")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}" + ("" if domain == "-" else f" — plan from {domain}"), fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    labelled: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(
            list(labelled.values()),
            list(labelled),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(len(labelled), 3 * len(domains)),
            fontsize=7,
            frameon=False,
        )
    return fig


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_results(out_dir: Any, rows: Sequence[dict[str, Any]], report: dict[str, Any]) -> list[str]:
    """results.md, results.csv, results.json and the plots into ``out_dir`` (which must exist).

    ``report`` carries ``tasks`` ({task: kind}), ``num_experts`` and anything else for the JSON."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    metrics = task_kinds(rows, report["tasks"])
    header, cells = table_rows(rows, metrics, int(report["num_experts"]))
    title = f"# moeprune compare: {report.get('model', '')}\n\n"
    (out / "results.md").write_text(title + markdown_table(header, cells), encoding="utf-8")
    write_csv(out / "results.csv", rows)
    data = {
        **report,
        "metrics": {t: {"metric": m, "higher_is_better": up} for t, (m, up) in metrics.items()},
        "rows": list(rows),
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    return ["results.md", "results.csv", "results.json", *write_plots(out, rows, metrics)]

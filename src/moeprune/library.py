"""A pattern library: per task, the experts it keeps and a key to find it (PreMoe TAER).

A library is a small folder, no expert weights in it::

    LIB/
      library.json            model identity, settings, the tasks and their kept counts
      keys.safetensors        per task: the planning scores [L, E] and the retrieval keys
      plans/<task>.plan.json  the task's plan (usable as `moeprune prune --plan`)

Retrieval keys are router-only statistics, so a query needs no expert to be computed:

- ``first`` (PreMoe's): the task's PreMoe PEU score vector at the first MoE layer [E]; a query
  computes the same statistic over its own tokens from a forward that stops at the first MoE
  router (no expert of any MoE layer is needed);
- ``records``: the same statistic for each calibration record of the task separately [N, E]
  (split by the profile's ``sample_tokens``); a query goes to the task of its nearest record
  (1-nearest-neighbour), and a task's distance is that of its nearest record. One short query's
  statistic is noisy; matching it to single demonstrations rather than to the task's mean routes
  better (docs/benchmarks.md);
- ``all``: the PEU vectors of every MoE layer, concatenated [L * E]; a query needs a forward
  through the whole model (every expert), so it serves analysis (`moeprune library route --key
  all`), not the adaptive model.

Nearest neighbour is exact L2 (PreMoe's FAISS IndexFlatL2): numpy, or faiss when installed.

A query far from every task is still routed to the nearest one, whose pattern may not suit it. How
far is "far" is measured on the task's own demonstrations: :meth:`Library.typical_distance` is the
spread of the task's record keys around the task (each record's distance to the task as a query
would measure it, leaving the record itself out), and a match farther than ``FAR_FACTOR`` times
its 95th percentile is flagged (:attr:`Match.far`). It is computed from the stored keys (so old
libraries get it too; a library without per-record keys has none) and written to library.json
for reading.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .fileio import read_json
from .plan import MAX_EXPERTS, Plan

__all__ = ["FAR_FACTOR", "KEY_KINDS", "LIBRARY_FORMAT", "Library", "Match", "TaskPattern", "nearest"]

LIBRARY_FORMAT = "moeprune-library/1"
KEY_KINDS = ("records", "first", "all")
INDEX_NAME = "library.json"
KEYS_NAME = "keys.safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A query is far from its task beyond this multiple of the 95th percentile of the task's own
# records' distances: one short query is noisier than a demonstration (on the testbed, held-out
# prompts of a library task stay within 1.25x, prompts of other tasks mostly beyond it).
FAR_FACTOR = 1.25


def check_task_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(
            f"task name '{name}' is not usable",
            "use letters, digits, '_', '.' or '-' (starting with a letter or digit)",
        )
    return name


@dataclass
class TaskPattern:
    """One task of a library."""

    name: str
    plan: Plan
    scores: torch.Tensor  # [L, E] the planning method's scores (float64)
    keys: dict[str, torch.Tensor]  # kind -> key vector (float64)
    info: dict[str, Any] = field(default_factory=dict)  # provenance: profile, tokens, data

    def kept(self, layer: int) -> list[int]:
        return list(self.plan.kept[layer])


@dataclass
class Match:
    """Where a query goes: the nearest task and the distance to every task."""

    task: str
    distances: dict[str, float]  # task -> L2 distance, in library order
    key: str = "first"
    typical: float | None = None  # the chosen task's typical distance (95th pct of its records)

    @property
    def distance(self) -> float:
        return self.distances[self.task]

    @property
    def far(self) -> bool:
        """Farther from its nearest task than that task's own demonstrations are (x FAR_FACTOR);
        False when the library cannot tell (no per-record keys)."""
        return self.typical is not None and self.distance > FAR_FACTOR * self.typical

    def far_warning(self) -> str | None:
        """One line for a far query, None otherwise."""
        if not self.far:
            return None
        return (
            f"warning: the query is far from every task: distance {self.distance:.3f} to the nearest, "
            f"'{self.task}', whose own demonstrations lie within {self.typical:.3f} (95%); its experts "
            "may not suit the query (add a task like it to the library)"
        )

    @property
    def margin(self) -> float:
        """Distance to the second nearest minus to the nearest (0 with one task)."""
        d = sorted(self.distances.values())
        return d[1] - d[0] if len(d) > 1 else 0.0


def nearest(keys: torch.Tensor, query: torch.Tensor, use_faiss: bool | None = None) -> torch.Tensor:
    """Exact L2 distances [N] from ``query`` [D] to each row of ``keys`` [N, D]."""
    if use_faiss is None:
        use_faiss = faiss_available()
    if use_faiss:
        import faiss
        import numpy as np

        index = faiss.IndexFlatL2(int(keys.shape[1]))
        index.add(np.ascontiguousarray(keys.double().numpy(), dtype="float32"))
        d2, order = index.search(
            np.ascontiguousarray(query.double().numpy()[None], dtype="float32"), len(keys)
        )
        out = torch.empty(len(keys), dtype=torch.float64)
        out[torch.from_numpy(order[0].astype("int64"))] = torch.from_numpy(d2[0].astype("float64")).clamp(
            min=0
        )
        return out.sqrt()
    k = keys.double().numpy()
    q = query.double().numpy()
    import numpy as np

    return torch.from_numpy(np.sqrt(((k - q[None, :]) ** 2).sum(axis=1)))


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Library:
    """The tasks of one model, each with a kept-expert plan and retrieval keys."""

    model: str  # the model it was built on, as given
    fields: dict[str, Any]  # the model's fingerprint fields (expert layout)
    model_fingerprint: str
    method: str
    keep: int  # experts kept per MoE layer (the same for every task and layer)
    ka: int  # PreMoe K_a of the keys
    layers: list[int]
    num_experts: int
    tasks: dict[str, TaskPattern]
    settings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    router_sha256: str = ""  # the model's router digest (moeprune.identity); "" in older libraries
    _typical: dict[tuple[str, str], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    # --- queries -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def task(self, name: str) -> TaskPattern:
        if name not in self.tasks:
            raise UserError(
                f"library '{self.path or '?'}' has no task '{name}'",
                f"use one of: {', '.join(self.tasks)}",
            )
        return self.tasks[name]

    @property
    def default_key(self) -> str:
        """``records`` when every task has per-record keys (the best-routing kind), else ``first``."""
        return "records" if all("records" in t.keys for t in self.tasks.values()) else "first"

    def key_matrix(self, kind: str) -> tuple[torch.Tensor, list[str]]:
        """All keys of ``kind`` as rows, and the task of each row."""
        check_key_kind(kind)
        missing = [n for n, t in self.tasks.items() if kind not in t.keys]
        if missing:
            raise UserError(
                f"task '{missing[0]}' of library '{self.path or '?'}' has no '{kind}' keys "
                "(built from a profile without per-sample token counts)",
                "use --key first, or re-profile the task with this version of moeprune",
            )
        rows = [t.keys[kind].reshape(-1, t.keys[kind].shape[-1]) for t in self.tasks.values()]
        owners = [n for n, r in zip(self.tasks, rows, strict=True) for _ in range(r.shape[0])]
        return torch.cat(rows), owners

    def match(self, query_key: torch.Tensor, kind: str | None = None, use_faiss: bool | None = None) -> Match:
        """The nearest task to ``query_key`` (a task's distance: that of its nearest key row)."""
        kind = kind or self.default_key
        keys, owners = self.key_matrix(kind)
        if query_key.shape != keys.shape[1:]:
            raise ValueError(f"query key {list(query_key.shape)} vs library keys {list(keys.shape)}")
        dist = nearest(keys, query_key, use_faiss)
        best: dict[str, float] = {}
        for name, d in zip(owners, dist.tolist(), strict=True):
            best[name] = min(d, best.get(name, float("inf")))
        task = min(best, key=best.__getitem__)
        typical = self.typical_distance(task, kind)
        return Match(task, best, kind, None if typical is None else typical["p95"])

    def typical_distance(self, name: str, kind: str | None = None) -> dict[str, float] | None:
        """How far the task's own demonstrations are from it with key ``kind``: the median and
        95th percentile over its records (leave-one-out nearest record for ``records``, the
        distance to the task key for ``first``); None without per-record keys, for ``all``
        (records are first-layer keys) or with a single record for ``records``."""
        kind = kind or self.default_key
        t = self.task(name)
        recs = t.keys.get("records")
        if recs is None or kind == "all":
            return None
        if (name, kind) not in self._typical:  # a cdist over the task's records: once per task
            self._typical[(name, kind)] = _spread(recs.double(), t.keys["first"].double(), kind)
        return self._typical[(name, kind)]

    def typical_distances(self) -> dict[str, dict[str, dict[str, float]]]:
        """{task: {kind: typical distance}} for every kind the library can tell (library.json)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name in self.tasks:
            kinds = {k: self.typical_distance(name, k) for k in ("records", "first")}
            out[name] = {k: v for k, v in kinds.items() if v is not None}
        return out

    def check_model(
        self, config: Any, name: str, blocks: list[Any] | None = None, router_sha256: str | None = None
    ) -> None:
        """Refuse a model whose expert layout is not the one this library was built on, or, when
        both are known, whose router weights differ (``router_sha256``)."""
        from .identity import check_router
        from .profile import _describe, fingerprint_fields, model_fingerprint

        fields = fingerprint_fields(config, blocks)
        if model_fingerprint(fields) != self.model_fingerprint:
            raise UserError(
                f"library '{self.path or '?'}' was built for model '{self.model}' ({_describe(self.fields)}), "
                f"not for '{name}' ({_describe(fields)})",
                "build a library for this model with `moeprune library build`",
            )
        fix = "build a library for this model with `moeprune library build`"
        check_router(self.router_sha256, router_sha256, f"library '{self.path or '?'}'", fix)

    # --- files ---------------------------------------------------------------------------------

    def save(self, out: str | Path, *, force: bool = False, inputs: Sequence[Any] = ()) -> Path:
        """Write the library folder atomically (nothing is left half-written); ``out`` is checked
        as :mod:`moeprune.outputs` says (never one of ``inputs``, replaced only with ``force``)."""
        from .outputs import prepare_output

        target = prepare_output(out, inputs=inputs, force=force, kind="library")
        out = Path(out).expanduser()
        with target as tmp:
            self.write_into(tmp)
        self.path = out
        return out

    def write_into(self, tmp: Path) -> None:
        """Write the library's files into the folder ``tmp`` (an output being written)."""
        from safetensors.torch import save_file

        (tmp / "plans").mkdir()
        tensors: dict[str, torch.Tensor] = {}
        for name, t in self.tasks.items():
            t.plan.save(tmp / "plans" / f"{name}.plan.json")
            tensors[f"{name}.scores"] = t.scores.double().contiguous()
            for kind, vec in t.keys.items():
                tensors[f"{name}.key.{kind}"] = vec.double().contiguous()
        save_file(tensors, str(tmp / KEYS_NAME), metadata={"format": LIBRARY_FORMAT})
        typical = self.typical_distances()
        index = {
            "format": LIBRARY_FORMAT,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            **({"router_sha256": self.router_sha256} if self.router_sha256 else {}),
            "model_fields": self.fields,
            "method": self.method,
            "keep": self.keep,
            "premoe_ka": self.ka,
            "key_statistic": "premoe",
            "key_kinds": list(KEY_KINDS),
            "layers": self.layers,
            "num_experts": self.num_experts,
            "settings": self.settings,
            "tasks": [
                {
                    "name": name,
                    "plan": f"plans/{name}.plan.json",
                    "kept_per_layer": self.keep,
                    **t.info,
                    "typical_distance": typical[name],
                }
                for name, t in self.tasks.items()
            ],
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Library:
        """Read and check a library folder; any problem is a one-line :class:`UserError`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path).expanduser()
        if not path.exists():
            raise UserError(f"library '{path}' does not exist", "build one with `moeprune library build`")
        index_file = path / INDEX_NAME
        if not path.is_dir() or not index_file.is_file():
            raise UserError(
                f"'{path}' is not a moeprune library (no {INDEX_NAME})",
                "build one with `moeprune library build`",
            )

        def bad(problem: str) -> UserError:
            return UserError(f"library '{path}': {problem}", "build it again with `moeprune library build`")

        index = read_json(index_file, "library index", "build it again with `moeprune library build`")
        if not isinstance(index, dict) or index.get("format") != LIBRARY_FORMAT:
            got = index.get("format") if isinstance(index, dict) else None
            raise bad(f"format is {got!r}, expected {LIBRARY_FORMAT!r}")
        entries = index.get("tasks")
        if not isinstance(entries, list) or not entries:
            raise UserError(
                f"library '{path}' holds no task", "add tasks with `moeprune library build --task`"
            )
        try:
            tensors = load_file(str(path / KEYS_NAME))
        except (OSError, SafetensorError, ValueError):
            raise bad(f"{KEYS_NAME} is missing or unreadable") from None
        try:
            layers = [_whole(x) for x in index["layers"]]
            num_experts = _whole(index["num_experts"])
            keep = _whole(index["keep"])
            ka = _whole(index["premoe_ka"])
            fp = str(index["model_fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise bad("library.json misses the model or settings fields") from None
        if not 1 <= num_experts <= MAX_EXPERTS:
            raise bad(f"num_experts {num_experts} is out of range")
        for what, value in (("keep", keep), ("premoe_ka", ka)):
            if not 1 <= value <= num_experts:
                raise bad(f"{what} {value} is outside 1..{num_experts} (the experts per layer)")
        tasks: dict[str, TaskPattern] = {}
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise bad("a task entry has no name")
            name = entry["name"]
            if name in tasks:
                raise bad(f"task '{name}' is listed twice")
            plan = Plan.load(_inside(path, str(entry.get("plan", f"plans/{name}.plan.json")), bad))
            if plan.model_fingerprint != fp or plan.layers != layers:
                raise bad(f"the plan of task '{name}' is for another model")
            counts = set(plan.kept_counts())
            if counts != {keep}:
                raise bad(f"the plan of task '{name}' keeps {sorted(counts)} experts per layer, not {keep}")
            try:
                scores = tensors[f"{name}.scores"]
                keys = {kind: tensors[f"{name}.key.{kind}"] for kind in ("first", "all")}
            except KeyError as exc:
                raise bad(f"{KEYS_NAME} has no tensor {exc.args[0]!r}") from None
            records = tensors.get(f"{name}.key.records")
            if records is not None:
                if records.dim() != 2 or records.shape[1] != num_experts or records.shape[0] < 1:
                    raise bad(f"the record keys of task '{name}' have the wrong shape")
                keys["records"] = records
            if list(scores.shape) != [len(layers), num_experts] or list(keys["first"].shape) != [num_experts]:
                raise bad(f"the keys of task '{name}' have the wrong shape")
            if list(keys["all"].shape) != [len(layers) * num_experts]:
                raise bad(f"the keys of task '{name}' have the wrong shape")
            for kind, t in [("scores", scores), *keys.items()]:
                # a NaN key is at distance NaN from every query and wins every comparison
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise bad(f"the {kind} key of task '{name}' holds non-finite values")
            # typical_distance is recomputed from the keys (written for reading only)
            skip = ("name", "plan", "kept_per_layer", "typical_distance")
            info = {k: v for k, v in entry.items() if k not in skip}
            tasks[name] = TaskPattern(name, plan, scores, keys, info)
        return cls(
            model=str(index.get("model", "?")),
            fields=dict(index.get("model_fields") or {}),
            model_fingerprint=fp,
            method=str(index.get("method", "?")),
            keep=keep,
            ka=ka,
            layers=layers,
            num_experts=num_experts,
            tasks=tasks,
            settings=dict(index.get("settings") or {}),
            path=path,
            router_sha256=str(index.get("router_sha256") or ""),
        )

    def overlap(self, a: str, b: str) -> float:
        """Fraction of the kept experts two tasks share (over all layers)."""
        pa, pb = self.task(a).plan, self.task(b).plan
        shared = sum(len(set(pa.kept[layer]) & set(pb.kept[layer])) for layer in self.layers)
        return shared / (self.keep * len(self.layers))


def _spread(records: torch.Tensor, first: torch.Tensor, kind: str) -> dict[str, float] | None:
    """Median and 95th percentile of the records' distances to their own task (see
    :meth:`Library.typical_distance`)."""
    if kind == "records":
        if records.shape[0] < 2:
            return None
        d = torch.cdist(records, records)
        d.fill_diagonal_(float("inf"))
        dist = d.min(dim=1).values
    else:
        dist = (records - first[None]).norm(dim=1)
    return {
        "median": float(dist.quantile(0.5)),
        "p95": float(dist.quantile(0.95)),
        "records": int(records.shape[0]),
    }


def _whole(value: Any) -> int:
    """A JSON integer (``int()`` would accept ``"8"``, ``8.9`` and ``1e9``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _inside(root: Path, relative: str, bad: Any) -> Path:
    """``root / relative``, refused unless it stays inside ``root`` (no absolute path, no ``..``,
    no symlink out): a library is a folder of its own files."""
    target = (root / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(root.resolve()):
        raise bad(f"the plan path '{relative}' points outside the library folder")
    return target


def check_out(out: str | Path, force: bool) -> Path:
    """The library folder to write: new, empty, or (with ``force``) a folder moeprune wrote; its
    parent must exist and be writable (:func:`moeprune.outputs.check_output`)."""
    from .outputs import check_output

    check_output(out, force=force)
    return Path(out).expanduser()


def check_key_kind(kind: str) -> str:
    if kind not in KEY_KINDS:
        raise UserError(f"unknown key '{kind}'", f"use one of: {', '.join(KEY_KINDS)}")
    return kind


def task_keys(profile: Any, ka: int) -> dict[str, torch.Tensor]:
    """The retrieval keys of a task from its profile: PEU at the first MoE layer, at all, and at the
    first MoE layer for each record (when the profile has ``sample_tokens``)."""
    from .score import premoe_entries, premoe_scores, score_premoe, stored_ka

    peu = score_premoe(profile, ka=ka)  # [L, E]
    if not bool(torch.isfinite(peu).all()):  # checked here too: the plan may use another method
        raise UserError(
            "the PreMoe statistics of the profile (the retrieval keys) contain NaN or infinite values",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    keys = {"first": peu[0].clone(), "all": peu.reshape(-1).clone()}
    lengths = profile.tensors.get("sample_tokens")
    per_record = profile.tensors.get("sample_premoe")  # [S, E] sums, each record with its own r
    if lengths is not None and per_record is not None and ka == stored_ka(profile):
        used = lengths > 0
        if bool(used.any()):
            keys["records"] = per_record[used].double() / lengths[used].unsqueeze(1).double()
    elif lengths is not None and "premoe_q" in profile.tensors:
        q, f, idx = premoe_entries(profile, ka)
        rows, start = [], 0
        for n in lengths.tolist():
            if n > 0:
                sl = slice(start, start + n)
                rows.append(premoe_scores(q[:1, sl], f[:1, sl], idx[:1, sl], int(profile.num_experts))[0])
            start += n
        if rows:
            keys["records"] = torch.stack(rows)
    return keys


def query_keys(
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_experts: int, all_layers: bool = False
) -> dict[str, torch.Tensor]:
    """The same statistic over a query's tokens: ``entries`` = PreMoe (q, f, idx), each [L', T, Ka],
    of the first MoE layer (key ``first``) or, with ``all_layers``, of every MoE layer (``all`` too)."""
    from .score import premoe_scores

    q, f, idx = entries
    peu = premoe_scores(q, f, idx, num_experts)
    out = {"first": peu[0].clone()}
    if all_layers:
        out["all"] = peu.reshape(-1).clone()
    return out


def build_library(
    profiles: dict[str, Any],
    *,
    model: str,
    method: str,
    keep: int | float,
    ka: int | None = None,
    options: dict[str, Any] | None = None,
    infos: dict[str, dict[str, Any]] | None = None,
) -> Library:
    """A library from one profile per task (all of the same model)."""
    from .identity import KEY, check_router
    from .plan import check_keep, plan_from_profile, profile_routing, sparse_warning
    from .score import check_method, nonzero_per_layer, score

    if not profiles:
        raise UserError("no task given", "pass --task NAME=DATA at least once")
    check_method(method)
    first = next(iter(profiles.values()))
    meta = first.meta
    for name, p in profiles.items():
        check_task_name(name)
        if p.meta.get("model_fingerprint") != meta.get("model_fingerprint"):
            raise UserError(
                f"the profile of task '{name}' was made on another model ({p.meta.get('model')})",
                "profile every task on the same model",
            )
        check_router(
            meta.get(KEY),
            p.meta.get(KEY),
            f"the profile of task '{name}'",
            "profile every task on the same model",
        )
    stored_ka = int(first.premoe_ka)
    ka = stored_ka if ka is None else int(ka)
    num_experts = int(first.num_experts)
    keep_n = check_keep(keep, num_experts, **profile_routing(meta))  # hints name only --keep
    layers = [int(x) for x in meta.get("layers") or range(first.num_layers)]
    tasks: dict[str, TaskPattern] = {}
    for name, p in profiles.items():
        if int(p.premoe_ka) < ka:
            raise UserError(
                f"the profile of task '{name}' stores the top {p.premoe_ka} logits per token, the keys need {ka}",
                f"pass --premoe-ka {p.premoe_ka} or re-profile",
            )
        scores = score(p, method, **(options or {}))
        settings = {"task": name, "options": options or {}, "library": True}
        plan = plan_from_profile(
            scores,
            meta,
            keep=keep_n,
            method=method,
            settings=settings,
            nonzero=nonzero_per_layer(p, method, **(options or {})),
        )
        warning = sparse_warning(plan)
        if warning:
            print(f"{warning} (task '{name}')", file=sys.stderr)
        info = {"tokens": p.meta.get("tokens"), "samples": p.meta.get("samples"), "data": p.meta.get("data")}
        info.update((infos or {}).get(name, {}))
        tasks[name] = TaskPattern(name, plan, scores.double(), task_keys(p, ka), info)
    return Library(
        model=model,
        fields=first._fields(),
        model_fingerprint=str(meta.get("model_fingerprint", "")),
        method=method,
        keep=keep_n,
        ka=ka,
        layers=layers,
        num_experts=num_experts,
        tasks=tasks,
        settings={"options": options or {}, "scope": "layer"},
        router_sha256=str(meta.get(KEY) or ""),
    )

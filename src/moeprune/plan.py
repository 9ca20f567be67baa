"""Pruning plans: which experts each MoE layer keeps, chosen from a score (``shared/methods.md``).

A plan is a small JSON file (``moeprune-plan/1``) that names the model (by fingerprint), the
decoder index of every MoE layer, the experts kept there (sorted ids) and the complement
(``replaced``: removed, or turned into constant novices in MoNE's mode).

Budgets:

- ``scope='layer'``: the top K experts of every layer (exact ties: the lower expert id wins; the
  scores of PreMoe break their ties first, :data:`moeprune.score.TIE_BREAK`).
- ``scope='global'``: one ranking of per-layer-normalised scores across layers, K x L experts in
  all, at least max(top-k, 1) per layer.

Group-limited routers (DeepSeek-V3 style, ``n_group > 1``): the model reshapes its experts into
``n_group`` equal groups, so by default (``per_group='equal'``) every group keeps the same number
of experts: K is a multiple of ``n_group`` and each group keeps its own best K / n_group. A router
whose group score is the sum of the group's top two needs at least two experts per group, and the
``topk_group`` chosen groups must hold at least top-k experts. ``per_group='free'`` ignores groups
(the pruned model then needs masked routing or regrouping).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import UserError
from .fileio import read_json

if TYPE_CHECKING:  # torch inside the functions that compute on tensors: a plan is read and checked
    import torch  # without it (the torch-free `moeprune prune`, docs/benchmarks.md)

PLAN_FORMAT = "moeprune-plan/1"
# More routed experts per layer than any model has (the largest have a few hundred): a count read
# from a file is bounded by this before anything sized by it is built.
MAX_EXPERTS = 1 << 16

Scope = Literal["layer", "global"]
PerGroup = Literal["equal", "free"]
# "routed": the pruned model routes among the kept experts (remove mode), so the kept sets must
# suit its routing (top-k, groups). "unchanged": the router stays whole (MoNE's novice mode), a
# token still picks among all experts and the replaced ones answer with their constant, so any
# count from 1 expert up works, in any group.
Router = Literal["routed", "unchanged"]


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Kept experts per MoE layer. ``kept`` maps a decoder-layer index to sorted expert ids."""

    model_fingerprint: str
    model_type: str
    layers: list[int]
    num_experts: int
    top_k: int  # experts active per token after pruning (possibly lowered)
    method: str
    kept: dict[int, list[int]]
    original_top_k: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    router_sha256: str = ""  # the model's router digest (moeprune.identity); "" in older plans

    def __post_init__(self) -> None:
        if self.original_top_k is None:
            self.original_top_k = self.top_k

    @property
    def replaced(self) -> dict[int, list[int]]:
        """The experts each layer does not keep (removed, or novices in MoNE's mode)."""
        return {layer: sorted(set(range(self.num_experts)) - set(self.kept[layer])) for layer in self.layers}

    def kept_mask(self) -> torch.Tensor:
        """bool [L, E]: True where the expert is kept (rows in ``layers`` order)."""
        import torch

        mask = torch.zeros(len(self.layers), self.num_experts, dtype=torch.bool)
        for row, layer in enumerate(self.layers):
            mask[row, self.kept[layer]] = True
        return mask

    def kept_counts(self) -> list[int]:
        return [len(self.kept[layer]) for layer in self.layers]

    # --- (de)serialisation -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        replaced = self.replaced
        return {
            "format": PLAN_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            **({"router_sha256": self.router_sha256} if self.router_sha256 else {}),
            "model_type": self.model_type,
            "method": self.method,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "original_top_k": self.original_top_k,
            "settings": self.settings,
            "layers": list(self.layers),
            "kept": {str(layer): list(self.kept[layer]) for layer in self.layers},
            "replaced": {str(layer): replaced[layer] for layer in self.layers},
        }

    def dumps(self) -> str:
        """Indented JSON with every expert-id list on one line."""
        data = self.to_json()
        lists: list[list[int]] = []

        def mark(ids: list[int]) -> str:
            lists.append(ids)
            return f"@@moeprune-list-{len(lists) - 1}@@"

        data["layers"] = mark(data["layers"])
        for key in ("kept", "replaced"):
            data[key] = {layer: mark(ids) for layer, ids in data[key].items()}
        text = json.dumps(data, indent=2)
        for i, ids in enumerate(lists):
            text = text.replace(f'"@@moeprune-list-{i}@@"', json.dumps(ids), 1)
        return text + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (a temporary file in the same folder, then ``os.replace``)."""
        from .outputs import atomic_write

        path = Path(path)
        text = self.dumps()
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read and validate a plan file; any problem is a one-line :class:`UserError`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"plan file '{path}' does not exist", "make one with `moeprune plan`")
        data = read_json(path, "plan file", "make it again with `moeprune plan`")
        return cls.from_json(data, source=str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "plan") -> Plan:
        def bad(problem: str) -> UserError:
            return UserError(f"{source}: {problem}", "make the plan again with `moeprune plan`")

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise bad(f"format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        required = ("model_fingerprint", "model_type", "method", "num_experts", "top_k", "layers", "kept")
        missing = [k for k in required if k not in data]
        if missing:
            raise bad(f"missing field(s) {', '.join(missing)}")

        def as_int(value: Any, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(f"{what} must be an integer, got {value!r}")
            return value

        num_experts = as_int(data["num_experts"], "num_experts")
        top_k = as_int(data["top_k"], "top_k")
        original = as_int(data.get("original_top_k", top_k), "original_top_k")
        if num_experts > MAX_EXPERTS:  # before anything sized by it is built
            raise bad(f"num_experts={num_experts} is more than any MoE layer has (at most {MAX_EXPERTS})")
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise bad(f"num_experts={num_experts}, top_k={top_k} are out of range")
        for key in ("model_fingerprint", "model_type", "method"):
            if not isinstance(data[key], str):
                raise bad(f"{key} must be a string")
        router = data.get("router_sha256", "")
        if not isinstance(router, str) or len(router) > 64:
            raise bad("router_sha256 must be a sha256 hex string")
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise bad("settings must be an object")
        layers_raw = data["layers"]
        if not isinstance(layers_raw, list) or not layers_raw:
            raise bad("layers must be a non-empty list of decoder-layer indices")
        layers = [as_int(x, "a layer index") for x in layers_raw]
        if len(set(layers)) != len(layers):
            raise bad("layers lists a layer twice")
        kept_raw = data["kept"]
        if not isinstance(kept_raw, dict):
            raise bad("kept must map each layer to a list of expert ids")
        unknown = sorted(set(kept_raw) - {str(x) for x in layers})
        if unknown:
            raise bad(f"kept names layer(s) {', '.join(unknown)} that are not in layers")
        kept: dict[int, list[int]] = {}
        for layer in layers:
            ids = kept_raw.get(str(layer))
            if ids is None:
                raise bad(f"layer {layer} has no kept experts listed")
            if not isinstance(ids, list):
                raise bad(f"kept experts of layer {layer} must be a list")
            ids = [as_int(x, f"an expert id in layer {layer}") for x in ids]
            if len(set(ids)) != len(ids):
                raise bad(f"layer {layer} lists an expert twice")
            out = [x for x in ids if not 0 <= x < num_experts]
            if out:
                raise bad(f"layer {layer} keeps expert(s) {out} outside 0..{num_experts - 1}")
            if len(ids) < (1 if settings.get("router") == "unchanged" else top_k):
                raise bad(f"layer {layer} keeps {len(ids)} experts, fewer than top_k={top_k}")
            if not ids:
                raise bad(f"layer {layer} keeps no expert")
            kept[layer] = sorted(ids)
        replaced_raw = data.get("replaced")
        if replaced_raw is not None:
            if not isinstance(replaced_raw, dict):
                raise bad("replaced must map each layer to a list of expert ids")
            for layer in layers:
                rep = replaced_raw.get(str(layer))
                if rep is not None and not _is_complement(rep, kept[layer], num_experts):
                    raise bad(f"replaced experts of layer {layer} are not the complement of its kept ones")
        plan = cls(
            model_fingerprint=data["model_fingerprint"],
            model_type=data["model_type"],
            layers=layers,
            num_experts=num_experts,
            top_k=top_k,
            method=data["method"],
            kept=kept,
            original_top_k=original,
            settings=settings,
            router_sha256=router,
        )
        plan._check_groups(bad)
        return plan

    def _check_groups(self, bad) -> None:
        n_group = self.settings.get("n_group", 1)
        if not isinstance(n_group, int) or isinstance(n_group, bool) or n_group < 1:
            raise bad(f"settings.n_group must be a positive integer, got {n_group!r}")
        if n_group == 1 or self.settings.get("per_group", "equal") != "equal":
            return
        if self.num_experts % n_group:
            raise bad(f"{self.num_experts} experts do not split into {n_group} groups")
        size = self.num_experts // n_group
        for layer in self.layers:
            per = _group_counts(self.kept[layer], n_group, size)
            if len(set(per)) != 1:
                raise bad(f"layer {layer} keeps {per} experts per group; the plan requires equal groups")

    def check_model(self, fingerprint: str | None, router_sha256: str | None = None) -> None:
        """Error unless the plan was made for the model with this fingerprint and, when both are
        known, these router weights (``router_sha256``, :mod:`moeprune.identity`)."""
        from .identity import check_router

        if fingerprint != self.model_fingerprint:
            raise UserError(
                f"this plan was made for another model (fingerprint {str(self.model_fingerprint)[:12]}, "
                f"this model {str(fingerprint)[:12]})",
                "make a plan from a profile of this model",
            )
        check_router(
            self.router_sha256, router_sha256, "this plan", "make a plan from a profile of this model"
        )


def _data_hashes(data: Any) -> frozenset[str]:
    """The sha256 of every data file a profile's metadata lists."""
    if not isinstance(data, list):
        return frozenset()
    return frozenset(
        str(d["sha256"]) for d in data if isinstance(d, dict) and isinstance(d.get("sha256"), str)
    )


def check_profile_data(plan_settings: Any, meta: dict[str, Any], source: str) -> None:
    """Error unless the profile with metadata ``meta`` was calibrated on the data of one of the
    plan's profiles (``plan_settings["profiles"]``), or of all of them together: the sha256 of
    every data file. A plan or profile that records no data hashes is accepted."""
    mine = _data_hashes(meta.get("data"))
    entries = plan_settings.get("profiles") if isinstance(plan_settings, dict) else None
    sets = (
        [_data_hashes(p.get("data")) for p in entries if isinstance(p, dict)]
        if isinstance(entries, list)
        else []
    )
    sets = [x for x in sets if x]
    if not mine or not sets or mine in sets or mine == frozenset().union(*sets):
        return
    theirs = sorted({h[:12] for x in sets for h in x})
    raise UserError(
        f"{source} was calibrated on other data than the plan's profile(s) (data sha256 "
        f"{', '.join(sorted(h[:12] for h in mine))}; the plan's: {', '.join(theirs)})",
        "pass the profile the plan was made from, or --allow-other-profile to use this one anyway",
    )


def _is_complement(rep: Any, kept: list[int], num_experts: int) -> bool:
    """``rep`` lists exactly the experts 0..num_experts-1 not in ``kept`` (in O(len), no range)."""
    if not isinstance(rep, list) or len(rep) + len(kept) != num_experts:
        return False
    ids = set()
    for x in rep:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_experts:
            return False
        ids.add(x)
    return len(ids) == len(rep) and not ids & set(kept)


def _group_counts(ids: list[int], n_group: int, size: int) -> list[int]:
    per = [0] * n_group
    for i in ids:
        per[i // size] += 1
    return per


# --- making a plan -------------------------------------------------------------------------------


def parse_keep(text: str) -> int | float:
    """``'64'`` -> 64 experts per layer; ``'0.5'`` or ``'50%'`` -> a fraction of the experts."""
    s = text.strip()
    try:
        if s.endswith("%"):
            return float(s[:-1]) / 100.0
        if any(c in s for c in ".eE"):
            return float(s)
        return int(s)
    except ValueError:
        raise UserError(
            f"--keep '{text}' is not a number",
            "pass experts per layer (e.g. 64) or a fraction (e.g. 0.5 or 50%)",
        ) from None


def experts_to_keep(
    keep: int | float,
    num_experts: int,
    *,
    n_group: int = 1,
    per_group: PerGroup = "equal",
) -> int:
    """K, the experts kept per layer, from an int (experts) or a float fraction in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise UserError(f"keep must be a number, got {keep!r}", "pass experts per layer or a fraction")
    grouped = n_group > 1 and per_group == "equal"
    if isinstance(keep, float):
        if not (0.0 < keep <= 1.0) or math.isnan(keep):
            raise UserError(
                f"keep fraction {keep:g} is outside (0, 1]", "pass a fraction such as 0.5, or an expert count"
            )
        if grouped:
            k = n_group * max(1, round(keep * num_experts / n_group))
        else:
            k = max(1, round(keep * num_experts))
        return min(k, num_experts)
    k = int(keep)
    if not 1 <= k <= num_experts:
        raise UserError(
            f"cannot keep {k} experts per layer: the model has {num_experts}",
            f"pass a count from 1 to {num_experts} or a fraction in (0, 1]",
        )
    if grouped and k % n_group:
        raise _Refused(
            f"cannot keep {k} experts per layer: the router splits experts into {n_group} equal groups "
            f"(a multiple of {n_group} is needed)",
            f"keep a multiple of {n_group}",
        )
    return k


class _Refused(UserError):
    """A keep, top-k or grouping that the routing cannot honour. :func:`make_plan` replaces its fix
    by the values it has checked to work for these scores (so that no hint is refused in turn)."""


# what a caller lets the user change, and how each change is named in a hint
CHANGES = ("keep", "top_k", "per_group")


def check_keep(
    keep: int | float,
    num_experts: int,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    new_top_k: int | None = None,
    can_change: tuple[str, ...] = ("keep",),
) -> int:
    """K for ``keep`` under every rule of :func:`make_plan` with equal groups (none depends on the
    scores), or the UserError that `moeprune plan` would give: for inspect, one-shot and library
    build, before any scores exist."""
    import torch

    plan = make_plan(
        torch.zeros(1, num_experts, dtype=torch.float64),
        keep=keep,
        top_k=top_k,
        new_top_k=new_top_k,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        can_change=can_change,
    )
    return int(plan.settings["experts_per_layer"])


def make_plan(
    scores: torch.Tensor,
    *,
    keep: int | float,
    scope: Scope = "layer",
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "max",
    new_top_k: int | None = None,
    per_group: PerGroup = "equal",
    layers: list[int] | None = None,
    model_fingerprint: str = "",
    model_type: str = "",
    method: str = "",
    settings: dict[str, Any] | None = None,
    router_sha256: str = "",
    can_change: tuple[str, ...] = CHANGES,
    nonzero: list[int] | None = None,
    router: Router = "routed",
) -> Plan:
    """Choose the kept experts of every layer from ``scores`` [L, E] (higher = keep).

    A keep the routing cannot honour is a UserError whose fix names only changes that work for
    these scores, among ``can_change`` (``keep``: another count, ``top_k``: fewer active experts,
    ``per_group``: free groups): each suggested value is tried before it is named.

    ``nonzero``: how many experts of each layer the method scored above zero before its ties were
    broken (:func:`moeprune.score.nonzero_per_layer`); a layer that keeps more is recorded in
    ``settings["sparse_layers"]`` ({layer: non-zero count}; :func:`sparse_warning` says it)."""
    args = dict(
        keep=keep,
        scope=scope,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        new_top_k=new_top_k,
        per_group=per_group,
        layers=layers,
        model_fingerprint=model_fingerprint,
        model_type=model_type,
        method=method,
        settings=settings,
        router_sha256=router_sha256,
    )
    if router not in ("routed", "unchanged"):
        raise UserError(f"unknown router rule '{router}'", "use 'routed' or 'unchanged'")
    if router == "unchanged":
        # no routing constraint applies: one group, no floor from top-k (see Router)
        args.update(n_group=1, topk_group=1, group_score="max", per_group="free", new_top_k=None)
        args["settings"] = {**(settings or {}), "router": "unchanged"}
    try:
        plan = _make_plan(scores, **args, unchanged=router == "unchanged")
    except _Refused as exc:
        fixes = _working_changes(scores, args, can_change)
        raise UserError(exc.problem, f"pass {', or '.join(fixes)}" if fixes else exc.fix) from None
    if nonzero is not None:
        sparse = {
            str(layer): int(n)
            for layer, n in zip(plan.layers, nonzero, strict=True)
            if int(n) < len(plan.kept[layer])
        }
        if sparse:
            plan.settings["sparse_layers"] = sparse
    return plan


def sparse_warning(plan: Plan) -> str | None:
    """One line when some layer keeps more experts than its method scored above zero: the rest
    of its kept set was chosen by the tie-break score only (or by lowest id, without one)."""
    sparse = plan.settings.get("sparse_layers")
    if not isinstance(sparse, dict) or not sparse:
        return None
    from .score import TIE_BREAK

    worst = min(sparse.items(), key=lambda kv: kv[1])
    by = TIE_BREAK.get(plan.method)
    how = f"by the {by} score" if by else "by lowest expert id"
    return (
        f"moeprune: warning: '{plan.method}' scores fewer experts above zero than the plan keeps in "
        f"{len(sparse)} of {len(plan.layers)} layer(s) (layer {worst[0]}: {worst[1]} of "
        f"{len(plan.kept[int(worst[0])])}); the rest were chosen {how}"
    )


def _works(scores: torch.Tensor, args: dict[str, Any]) -> bool:
    try:
        _make_plan(scores, **args)
    except UserError:
        return False
    return True


def _working_changes(scores: torch.Tensor, args: dict[str, Any], can_change: tuple[str, ...]) -> list[str]:
    """Hints for a refused plan: the nearest keeps below and above, fewer active experts, or free
    groups, each only if a plan with it succeeds (scores matter only for free groups)."""
    import torch

    n_experts = int(scores.shape[1])
    fixes: list[str] = []
    if "keep" in can_change:
        keep = args["keep"]
        want = keep if isinstance(keep, int) else max(1, round(float(keep) * n_experts))
        # equal groups do not depend on the scores: one row of zeros sorts out the counts quickly
        probe = torch.zeros(1, n_experts, dtype=torch.float64)
        flat = {**args, "layers": None, "scope": "layer"}
        below = [k for k in range(min(want, n_experts), 0, -1) if _works(probe, {**flat, "keep": k})]
        above = [k for k in range(want, n_experts + 1) if _works(probe, {**flat, "keep": k})]
        picks = [ks[0] for ks in (below, above) if ks]
        picks = [k for k in dict.fromkeys(picks) if _works(scores, {**args, "keep": k})]
        if picks:
            fixes.append(" or ".join(f"--keep {k}" for k in sorted(picks)))
    if "per_group" in can_change and args["per_group"] == "free":
        if _works(scores, {**args, "per_group": "equal"}):
            fixes.append("--per-group equal")
        elif "keep" in can_change and not fixes:
            fixes += [
                f"--per-group equal {f}"
                for f in _working_changes(scores, {**args, "per_group": "equal"}, ("keep",))
            ]
    active = args["new_top_k"] or args["top_k"]
    if "top_k" in can_change:
        lower = next((t for t in range(active - 1, 0, -1) if _works(scores, {**args, "new_top_k": t})), None)
        if lower is not None:
            fixes.append(f"--top-k {lower} (fewer active experts per token)")
    free = {**args, "per_group": "free"}
    if (
        "per_group" in can_change
        and args["per_group"] == "equal"
        and args["n_group"] > 1
        and _works(scores, free)
    ):
        fixes.append("--per-group free (groups ignored: prune writes such a plan in novice mode only)")
    return fixes


def _make_plan(
    scores: torch.Tensor,
    *,
    keep: int | float,
    scope: Scope,
    top_k: int,
    n_group: int,
    topk_group: int,
    group_score: str,
    new_top_k: int | None,
    per_group: PerGroup,
    layers: list[int] | None,
    model_fingerprint: str,
    model_type: str,
    method: str,
    settings: dict[str, Any] | None,
    router_sha256: str,
    unchanged: bool = False,
) -> Plan:
    import torch

    if scores.dim() != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise UserError(f"scores must be [layers, experts], got {list(scores.shape)}", "check the profile")
    scores = scores.to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise UserError("the scores contain NaN or infinite values", "check the profile")
    n_layers, n_experts = (int(x) for x in scores.shape)
    if layers is None:
        layers = list(range(n_layers))
    if len(layers) != n_layers:
        raise UserError(f"{len(layers)} layer indices for {n_layers} score rows", "check the profile")
    if scope not in ("layer", "global"):
        raise UserError(f"unknown scope '{scope}'", "use 'layer' or 'global'")
    if per_group not in ("equal", "free"):
        raise UserError(f"unknown per-group rule '{per_group}'", "use 'equal' or 'free'")
    if not 1 <= top_k <= n_experts:
        raise UserError(f"top-k {top_k} is outside 1..{n_experts}", "check the profile")
    if n_group < 1 or n_experts % n_group:
        raise UserError(f"{n_experts} experts do not split into {n_group} groups", "check the routing")
    if not 1 <= topk_group <= n_group:
        raise UserError(f"topk_group {topk_group} is outside 1..{n_group}", "check the routing")

    k_kept = experts_to_keep(keep, n_experts, n_group=n_group, per_group=per_group)
    active = top_k
    if new_top_k is not None:
        if not 1 <= new_top_k <= top_k:
            fix = "pass --top-k 1 or more" if new_top_k < 1 else f"pass --top-k {top_k} or less"
            raise UserError(
                f"new top-k {new_top_k} must be from 1 to the model's top-k {top_k}",
                f"{fix}, or leave it out",
            )
        active = new_top_k
    if unchanged:
        active = 1  # the router is whole: a layer may keep fewer experts than a token uses
    if k_kept < active:
        if new_top_k is None:
            raise _Refused(
                f"keeping {k_kept} experts per layer is fewer than the {top_k} active per token",
                f"keep at least {top_k} experts per layer",
            )
        raise _Refused(
            f"keeping {k_kept} experts per layer is fewer than the {active} active per token (--top-k)",
            f"keep at least {active} experts per layer",
        )

    grouped = n_group > 1 and per_group == "equal"
    g = n_group if grouped else 1
    size = n_experts // g
    # minimum units (one unit = one expert per group) a layer must keep
    min_units = math.ceil(max(active, 1) / g)
    if grouped:
        if group_score == "top2_sum":
            min_units = max(min_units, 2)
        if topk_group < n_group:
            min_units = max(min_units, math.ceil(active / topk_group))
        if min_units > size:
            raise _Refused(
                f"group-limited routing ({n_group} groups, top {topk_group}) cannot keep {active} active "
                f"experts with {size} experts per group",
                "check the routing fields of the model's config",
            )
    units = k_kept // g
    if units < min_units:
        need = _group_need(group_score, topk_group, n_group, active)
        raise _Refused(
            f"keeping {k_kept} experts per layer leaves {units} per group in {n_group} groups, but {need}",
            f"keep at least {min_units * g} experts per layer",
        )
    if per_group == "free" and n_group > 1 and group_score == "top2_sum" and topk_group < n_group:
        raise _Refused(
            "--per-group free cannot be used with a router that scores groups by their top two experts",
            "use --per-group equal",
        )

    # order[l][grp] = expert ids of that group, best first (ties: lower id)
    order: list[list[list[int]]] = []
    for row in scores.tolist():
        order.append(
            [sorted(range(a * size, (a + 1) * size), key=lambda i, r=row: (-r[i], i)) for a in range(g)]
        )

    if scope == "layer":
        counts = [units] * n_layers
    else:
        counts = _global_units(scores, order, units * n_layers, min_units, size)

    kept: dict[int, list[int]] = {}
    for row, layer in enumerate(layers):
        ids = [i for grp in order[row] for i in grp[: counts[row]]]
        kept[layer] = sorted(ids)
        if per_group == "free" and n_group > 1 and topk_group < n_group:
            _check_free_groups(kept[layer], layer, n_group, n_experts // n_group, topk_group, active)

    info = dict(settings or {})
    info.update(
        {
            "scope": scope,
            "keep": keep,
            "experts_per_layer": k_kept,
            "n_group": n_group,
            "topk_group": topk_group,
            "group_score": group_score,
            "per_group": per_group,
        }
    )
    return Plan(
        model_fingerprint=model_fingerprint,
        model_type=model_type,
        layers=list(layers),
        num_experts=n_experts,
        top_k=top_k if unchanged else active,
        method=method,
        kept=kept,
        original_top_k=top_k,
        settings=info,
        router_sha256=router_sha256,
    )


def profile_routing(meta: dict[str, Any], source: str = "the profile") -> dict[str, Any]:
    """The routing facts a plan needs (top-k, routing groups) from a profile's metadata."""
    routing = meta.get("routing") or {}
    top_k = int(meta.get("top_k") or routing.get("top_k") or 0)
    if top_k < 1:
        raise UserError(f"{source} does not record the model's top-k", "re-run `moeprune profile`")
    return {
        "top_k": top_k,
        "n_group": int(routing.get("n_group", 1) or 1),
        "topk_group": int(routing.get("topk_group", 1) or 1),
        "group_score": str(routing.get("group_score", "max")),
    }


def plan_from_profile(
    scores: torch.Tensor,
    meta: dict[str, Any],
    *,
    keep: int | float,
    method: str,
    source: str = "the profile",
    **options: Any,
) -> Plan:
    """:func:`make_plan` of ``scores`` [L, E] with the routing groups, MoE layers and model identity
    a profile's metadata records; ``options``: scope, new_top_k, per_group, settings, nonzero."""
    return make_plan(
        scores,
        keep=keep,
        layers=[int(x) for x in meta.get("layers") or range(scores.shape[0])],
        model_fingerprint=str(meta.get("model_fingerprint", "")),
        router_sha256=str(meta.get("router_sha256") or ""),
        model_type=str(meta.get("model_type", "")),
        method=method,
        **profile_routing(meta, source),
        **options,
    )


def _group_need(group_score: str, topk_group: int, n_group: int, active: int) -> str:
    if group_score == "top2_sum":
        return "the router scores each group by its top two experts (at least 2 per group)"
    if topk_group < n_group:
        return f"the {topk_group} groups a token may use must hold its {active} active experts"
    return f"each token needs {active} active experts"


def _global_units(
    scores: torch.Tensor, order: list[list[list[int]]], budget: int, min_units: int, size: int
) -> list[int]:
    """Units per layer for the global budget: a floor of ``min_units``, then the best next units.

    A unit adds the next-best expert of each group; its value is the sum of their per-layer
    normalised scores. Those values do not increase within a layer, so taking the best units
    across layers greedily is optimal for the total normalised score kept.
    """
    from .score import normalize_per_layer

    norm = normalize_per_layer(scores).tolist()
    n_layers = len(order)
    counts = [min_units] * n_layers
    candidates: list[tuple[float, int, int]] = []
    for row in range(n_layers):
        for u in range(min_units, size):
            value = sum(norm[row][grp[u]] for grp in order[row])
            candidates.append((-value, row, u))
    candidates.sort()
    for _, row, _u in candidates[: budget - min_units * n_layers]:
        counts[row] += 1
    return counts


def _check_free_groups(
    ids: list[int], layer: int, n_group: int, size: int, topk_group: int, active: int
) -> None:
    """With unequal groups, the worst ``topk_group`` non-empty groups must hold ``active`` experts."""
    per = sorted(c for c in _group_counts(ids, n_group, size) if c)
    if sum(per[:topk_group]) < active:
        raise _Refused(
            f"layer {layer}: the kept experts per group {per} let a token reach fewer than {active} experts "
            f"in its {topk_group} groups",
            "keep more experts",
        )


# --- summary -------------------------------------------------------------------------------------


def plan_summary(
    plan: Plan,
    profile: Any | None = None,
    *,
    params_per_expert: int | None = None,
    other_params: int | None = None,
    bytes_per_param: float | None = None,
) -> dict[str, Any]:
    """Experts kept per layer, the share of calibration gate mass each layer keeps, and the
    parameter count before/after when ``params_per_expert`` and ``other_params`` (everything
    that is not a routed expert, as from :func:`moeprune.summary.summarize`) are given."""
    import torch

    rows: list[dict[str, Any]] = []
    gate = None
    if profile is not None and "gate" in profile.tensors:
        gate = profile.tensors["gate"].to(torch.float64)
        if tuple(gate.shape) != (len(plan.layers), plan.num_experts):
            gate = None
    mask = plan.kept_mask()
    for row, layer in enumerate(plan.layers):
        entry: dict[str, Any] = {"layer": layer, "kept": len(plan.kept[layer]), "of": plan.num_experts}
        if gate is not None:
            total = float(gate[row].sum())
            entry["gate_share"] = float(gate[row][mask[row]].sum()) / total if total > 0 else None
        rows.append(entry)
    out: dict[str, Any] = {
        "layers": rows,
        "kept_total": sum(r["kept"] for r in rows),
        "experts_total": plan.num_experts * len(plan.layers),
    }
    shares = [r["gate_share"] for r in rows if r.get("gate_share") is not None]
    if shares:
        out["gate_share_mean"] = sum(shares) / len(shares)
    if params_per_expert is not None and other_params is not None:
        before = other_params + params_per_expert * out["experts_total"]
        after = other_params + params_per_expert * out["kept_total"]
        out["params_before"] = before
        out["params_after"] = after
        if bytes_per_param is not None:
            out["bytes_before"] = int(before * bytes_per_param)
            out["bytes_after"] = int(after * bytes_per_param)
    return out

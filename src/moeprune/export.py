"""Uniform export: the stock checkpoint nearest to a ragged or novice prune (docs/deploying.md).

Ragged (``--scope global``) and novice checkpoints run only where moeprune's loader, its remote
code or its vLLM plugin runs; llama.cpp (GGUF) and every other stock consumer need one expert
count per model. :func:`uniform_plan` turns such a plan into the nearest uniform one:

- the same method, score options and profile(s): the scores are computed again from the
  profile(s) the plan records (or the ones given), and must reproduce the plan's own kept
  experts, so that the uniform plan ranks experts exactly as the ragged one did;
- one count K for every MoE layer: the ragged plan's mean kept count per layer, rounded (halves
  up), or, where the routing refuses that count (fewer than top-k, not a multiple of the routing
  groups), the nearest count it accepts;
- every layer keeps its own top K by those scores (equal routing groups on group-limited routers),
  for removal: the output is an ordinary ``--mode remove`` prune of the original model.

:func:`moeprune.api.export_uniform` writes it (``moeprune export --uniform``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .plan import Plan

FIX_PROFILE = "pass the profile the plan was made from with --profile"


@dataclass
class UniformPlan:
    """The uniform plan nearest to ``source`` and how it was chosen."""

    plan: Plan
    source: Plan
    mean_kept: float  # the source's mean kept experts per MoE layer
    profiles: list[Path]  # the profiles the scores were computed from


def read_source(source: str | Path) -> tuple[Plan, Path | None]:
    """The plan of ``source``: a plan file, or a checkpoint folder moeprune wrote (its
    ``plan.json``). Returns (plan, the folder or None)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "plan.json").is_file():
            raise UserError(
                f"'{source}' holds no plan.json (not a checkpoint moeprune pruned)",
                "pass the plan file or the pruned checkpoint folder",
            )
        return Plan.load(path / "plan.json"), path
    return Plan.load(path), None


def recorded_profiles(plan: Plan) -> list[Path]:
    """The profile paths the plan records (``settings.profiles``; empty for plans that record none,
    e.g. `moeprune search`'s)."""
    entries = plan.settings.get("profiles")
    if not isinstance(entries, list):
        return []
    return [Path(e["path"]) for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]


def _options(plan: Plan) -> dict[str, Any]:
    options = plan.settings.get("options") or {}
    if not isinstance(options, dict):
        raise UserError(f"the plan's score options {options!r} are not an object", "make the plan again")
    return {k: v for k, v in options.items() if v is not None}


def plan_scores(plan: Plan, profiles: list[Any]) -> torch.Tensor:
    """The plan's method scores [L, E] from ``profiles`` (loaded), as `moeprune plan` computed them:
    one profile, or several combined (EASY-EP mixed-domain)."""
    from .score import check_method, combined_score, score

    check_method(plan.method)
    options = _options(plan)
    if len(profiles) == 1:
        return score(profiles[0], plan.method, **options)
    return combined_score(profiles, plan.method, **options)


def _new_top_k(plan: Plan) -> int | None:
    """The lowered top-k of a routed plan (None: the model's)."""
    if plan.settings.get("router") == "unchanged" or plan.top_k == plan.original_top_k:
        return None
    return plan.top_k


def _replay(plan: Plan, scores: torch.Tensor, meta: dict[str, Any]) -> Plan:
    """The plan made again from ``scores`` with the plan's own budget (keep, scope, groups)."""
    from .plan import plan_from_profile

    s = plan.settings
    if "keep" not in s or "scope" not in s:
        raise UserError(
            "the plan records no keep and scope (hand-made?)", "make the plan with `moeprune plan`"
        )
    return plan_from_profile(
        scores,
        meta,
        keep=s["keep"],
        method=plan.method,
        scope=s["scope"],
        new_top_k=_new_top_k(plan),
        per_group=s.get("per_group", "equal"),
        router="unchanged" if s.get("router") == "unchanged" else "routed",
    )


def check_reproduces(plan: Plan, scores: torch.Tensor, meta: dict[str, Any], source: str) -> None:
    """Error unless ``scores`` give the plan's own kept experts: the uniform plan must rank the
    experts as the ragged one did, not by another profile's scores."""
    try:
        again = _replay(plan, scores, meta)
    except UserError as exc:
        raise UserError(f"{source} does not reproduce the plan ({exc.problem})", FIX_PROFILE) from None
    for layer in plan.layers:
        if again.kept.get(layer) != plan.kept[layer]:
            raise UserError(
                f"{source} does not reproduce the plan's kept experts (layer {layer} differs)", FIX_PROFILE
            )


def nearest_count(plan: Plan, meta: dict[str, Any]) -> tuple[int, float]:
    """K, the count per layer nearest to the plan's mean kept count that the routing accepts for
    removal (ties: the larger), and that mean."""
    from .plan import check_keep, profile_routing

    counts = plan.kept_counts()
    mean = sum(counts) / len(counts)
    routing = profile_routing(meta)
    new_top_k = _new_top_k(plan)

    def accepted(k: int) -> bool:
        try:
            check_keep(k, plan.num_experts, **routing, new_top_k=new_top_k)
        except UserError:
            return False
        return True

    target = math.floor(mean + 0.5)
    for k in sorted(range(1, plan.num_experts + 1), key=lambda k: (abs(k - target), -k)):
        if accepted(k):
            return k, mean
    raise UserError(  # pragma: no cover - keeping every expert is always accepted
        f"no expert count per layer suits this model's routing ({plan.num_experts} experts)",
        "check the model's routing fields",
    )


def uniform_plan(plan: Plan, profiles: list[Any], profile_paths: list[Path]) -> UniformPlan:
    """The uniform removal plan nearest to ``plan`` (module doc), from its profiles (loaded, in the
    plan's order). The profiles must give back the plan's own kept experts."""
    from .plan import plan_from_profile
    from .score import nonzero_per_layer

    meta = profiles[0].meta
    source = f"profile '{profile_paths[0]}'" if len(profile_paths) == 1 else "the profiles"
    for p in profiles:
        plan.check_model(p.meta.get("model_fingerprint"), p.meta.get("router_sha256"))
    scores = plan_scores(plan, profiles)
    check_reproduces(plan, scores, meta, source)
    k, mean = nearest_count(plan, meta)
    keep = {"profiles", "options", "mixed_domain", "task", "library"}
    settings = {key: value for key, value in plan.settings.items() if key in keep}
    settings["uniform_of"] = {
        "scope": plan.settings.get("scope"),
        "router": plan.settings.get("router", "routed"),
        "kept_counts": {str(layer): n for layer, n in zip(plan.layers, plan.kept_counts(), strict=True)},
        "mean_kept": mean,
    }
    options = _options(plan)
    uniform = plan_from_profile(
        scores,
        meta,
        keep=k,
        method=plan.method,
        scope="layer",
        new_top_k=_new_top_k(plan),
        per_group="equal",
        settings=settings,
        nonzero=nonzero_per_layer(profiles, plan.method, **options),
    )
    return UniformPlan(uniform, plan, mean, list(profile_paths))

"""`moeprune search`: split the demonstrations, profile once, search, write the results (and prune).

Output folder (``--out DIR``):

- ``train.jsonl`` / ``dev.jsonl``: the split of the demonstrations (the dev records are never
  profiled); ``profile.safetensors``: the one profile, made on ``train.jsonl``;
- ``frontier.md`` (the Pareto table, also printed), ``frontier.png``, ``search.json`` (every
  evaluated variant, per configuration its smallest K, the test results);
- ``plan.json`` (the chosen plan) and ``recipe.yaml``: `moeprune run recipe.yaml` profiles
  ``train.jsonl`` again and makes the same plan and checkpoint;
- with ``--prune``: ``model/``, the checkpoint of the recipe (made by running it), whose card
  says how the dev-set quality held on the ``--test`` tasks.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .search import DEFAULT_METHODS, MODES, SCOPES, SearchResult

METRICS = ("auto", "exact_match", "perplexity")


def split_records(records: list[Any], dev: float | int, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, dev): a seeded shuffle, ``dev`` records (an int) or that share (a float) held out."""
    n = len(records)
    n_dev = int(dev) if isinstance(dev, int) else round(float(dev) * n)
    if n < 2 or not 1 <= n_dev < n:
        raise UserError(
            f"cannot hold out {n_dev} of {n} demonstration(s) as a dev set",
            "give more demonstrations, another --dev, or the dev tasks with --eval",
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    dev_ids = set(order[:n_dev])
    return [r for i, r in enumerate(records) if i not in dev_ids], [
        r for i, r in enumerate(records) if i in dev_ids
    ]


def record_row(r: Any) -> dict[str, Any]:
    """A data record back as the JSON object it was read from."""
    if r.messages is not None:
        return {"messages": r.messages}
    if r.prompt is not None:
        return {"prompt": r.prompt, **({"answer": r.response} if r.response is not None else {})}
    return {"text": r.text}


def dev_tasks(
    records: list[Any], metric: str, lm: Any, tok: Any, self_generate: int, max_new_tokens: int
) -> list[Any]:
    """The dev set as tasks: prompt+answer records an exact-match task (with self-generation, or
    without an answer, the answer is the full model's own: agreement with it), text records a
    perplexity task; ``metric='perplexity'`` scores every record's whole text instead."""
    from .evaluate.runners import evaluate
    from .evaluate.tasks import EXACT_MATCH, PERPLEXITY, Task

    if any(r.messages is not None for r in records):
        raise UserError(
            "the dev records hold chat messages, which moeprune cannot score as a dev set",
            "pass the dev tasks with --eval TASK",
        )
    prompts = [r for r in records if r.prompt is not None]
    texts = [{"text": r.text} for r in records if r.prompt is None]
    if prompts and (self_generate > 0 or any(r.response is None for r in prompts) or metric == "perplexity"):
        # the full model's own answers: what it does is what the pruned model should keep
        probe = Task("dev-answers", EXACT_MATCH, [{"prompt": r.prompt, "answer": ""} for r in prompts])
        new = self_generate or max_new_tokens
        res = evaluate(lm, tok, [probe], max_new_tokens=new, progress=False, log_samples=True)
        answers = [s["prediction"] for s in res["tasks"]["dev-answers"]["samples"]]
    else:
        answers = [r.response for r in prompts]
    tasks = []
    if metric == "perplexity":
        texts += [{"text": r.prompt + a} for r, a in zip(prompts, answers, strict=True)]
    elif prompts:
        tasks.append(
            Task(
                "dev",
                EXACT_MATCH,
                [{"prompt": r.prompt, "answer": a} for r, a in zip(prompts, answers, strict=True)],
            )
        )
    if texts:
        tasks.append(Task("dev-text", PERPLEXITY, texts))
    return tasks


def variant_evaluator(
    lm: Any, tok: Any, profile: Any, tasks: list[Any], novice_fit: str = "mean", **kwargs: Any
) -> Any:
    """``evaluate_variant(plan, mode)`` -> {task: metrics}: the plan applied in memory (routing masks
    for remove, the profile's novices for novice mode: mean outputs, or with ``novice_fit="lsq"``
    the least-squares fits; :mod:`moeprune.compare`)."""
    from .arch import find_moe_blocks
    from .arch.patch import BlockControl, patch_moe
    from .evaluate.runners import evaluate

    blocks = find_moe_blocks(lm)
    by_layer = {b.layer: b for b in blocks}
    device = next(lm.parameters()).device
    means = profile.novices(novice_fit)

    def task_metrics(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
        # each task's record count beside its metrics: the confidence bound of its accuracy needs it
        return {name: {**res.get("metrics", {}), "n": res.get("n")} for name, res in result["tasks"].items()}

    def run(plan: Any | None, mode: str = "remove") -> dict[str, dict[str, Any]]:
        with torch.no_grad():
            if plan is None:
                return task_metrics(evaluate(lm, tok, tasks, progress=False, **kwargs))
            controls = {}
            mask = plan.kept_mask()
            for row, layer in enumerate(plan.layers):
                if mode == "novice":
                    vecs = {
                        i: means[row, i].to(device=device, dtype=torch.float32) for i in plan.replaced[layer]
                    }
                    controls[by_layer[layer].index] = BlockControl(novices=vecs)
                else:
                    controls[by_layer[layer].index] = BlockControl(allowed=mask[row].to(device))
            with patch_moe(lm, blocks, controls=controls):
                return task_metrics(evaluate(lm, tok, tasks, progress=False, **kwargs))

    return run


@dataclass(frozen=True)
class SearchOptions:
    """Every choice of a search with its default, declared once: `moeprune search`'s flags,
    :func:`moeprune.api.search`'s keywords and :func:`run_search`'s. ``methods`` / ``modes`` /
    ``scopes`` empty or None: all of them (:data:`moeprune.search.DEFAULT_METHODS`, ...)."""

    target: float = 0.99
    eval_tasks: Sequence[str] = ()
    test_tasks: Sequence[str] = ()
    dev: float | int = 0.3
    metric: str = "auto"
    methods: Sequence[str] | None = None
    modes: Sequence[str] | None = None
    scopes: Sequence[str] | None = None
    objective: str = "bytes"
    select: str = "auto"  # "bound": pass on the dev score's lower confidence bound; "mean": on the score;
    # "auto": the bound when the dev set can certify the target, else the mean
    self_generate: int = 0
    max_length: int = 2048
    seed: int = 0
    limit: int | None = None
    max_new_tokens: int = 24
    prune: bool = False
    force: bool = False
    quiet: bool = True
    dtype: str = "auto"
    device: str = "auto"


def search_options(options: SearchOptions | None = None, **changes: Any) -> SearchOptions:
    """``options`` (default: every default) with ``changes``; an unknown name is a TypeError, as
    for any unknown keyword."""
    from dataclasses import fields, replace

    names = {f.name for f in fields(SearchOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"unexpected search option(s): {', '.join(unknown)}")
    return replace(options or SearchOptions(), **changes)


def run_search(
    model: str,
    data: Sequence[Any],
    out: Any,
    options: SearchOptions | None = None,
    *,
    model_out: Path | None = None,
    loaded: tuple[Any, Any] | None = None,
    **changes: Any,
) -> SearchResult:
    """See the module doc; ``options`` with ``changes`` (:class:`SearchOptions`' fields as keywords);
    ``model_out`` (with ``prune``) puts the checkpoint elsewhere than ``out/model`` (`prune --data
    ... --target`); ``loaded`` (model, tokenizer) is used instead of loading ``model``."""
    import yaml

    from .data import check_max_length, read_file
    from .evaluate.tasks import resolve_tasks
    from .modelio import load_config, load_model, resolve_model_dir
    from .outputs import prepare_output
    from .profile import Profile
    from .profiling import resolve_device, run_profile
    from .search import check_search_args, frontier_table, search_plans, sizes_of, write_plot

    o = search_options(options, **changes)
    methods, modes, scopes = list(o.methods or DEFAULT_METHODS), list(o.modes or MODES), list(o.scopes or SCOPES)
    data, out = [os.fspath(d) for d in data], Path(out)

    def say(text: str) -> None:
        if not o.quiet:
            print(text, file=sys.stderr, flush=True)

    check_search_args(o.target, methods, modes, scopes, o.objective, o.select)
    if o.metric not in METRICS:
        raise UserError(f"unknown --metric '{o.metric}'", f"use {', '.join(METRICS)}")
    check_max_length(o.max_length)
    if o.self_generate < 0:
        raise UserError(f"--self-generate must be >= 0, got {o.self_generate}", "pass a number of new tokens")
    if not data:
        raise UserError("no demonstrations given", "pass --data FILE")
    if o.limit is not None and o.limit <= 0:
        raise UserError(f"--limit must be positive, got {o.limit}", "pass --limit 1 or more")
    for d in data:
        if not Path(d).expanduser().is_file():
            raise UserError(f"data file '{d}' does not exist", "pass an existing demonstrations file")
    src = resolve_model_dir(model)
    given_eval = resolve_tasks(list(o.eval_tasks)) if o.eval_tasks else []
    given_test = resolve_tasks(list(o.test_tasks)) if o.test_tasks else []
    records = [r for d in data for r in read_file(d).records_list]
    if given_eval:
        train, held = records, []
    else:
        if isinstance(o.dev, float) and not 0.0 < o.dev < 1.0:
            raise UserError(f"--dev {o.dev:g} is outside (0, 1)", "pass a share such as 0.3, or a record count")
        train, held = split_records(records, o.dev, o.seed)
    reads = [("input model", src), *(("data file", d) for d in data)]
    reads += [("task file", t.source) for t in [*given_eval, *given_test] if getattr(t, "source", None)]
    target_out = prepare_output(out, inputs=reads, force=o.force, kind="search")
    final = target_out.path

    if loaded is None:
        lm, tok = load_model(str(src), dtype=o.dtype, device=resolve_device(o.device))
    else:
        lm, tok = loaded
    config = load_config(str(src))
    with target_out as tmp:
        (tmp / "train.jsonl").write_text(
            "".join(json.dumps(record_row(r), ensure_ascii=False) + "\n" for r in train)
        )
        if held:
            (tmp / "dev.jsonl").write_text(
                "".join(json.dumps(record_row(r), ensure_ascii=False) + "\n" for r in held)
            )
        say(f"== profile {len(train)} demonstration(s); dev: {len(held) or 'the --eval tasks'}")
        run_profile(
            model=str(src),
            data=[str(tmp / "train.jsonl")],
            out=tmp / "profile.safetensors",
            max_length=o.max_length,
            seed=o.seed,
            self_generate=o.self_generate,
            quiet=True,
            loaded=(lm, tok),
            shown=str(final / "profile.safetensors"),
        )
        prof = Profile.load(tmp / "profile.safetensors")
        tasks = given_eval or dev_tasks(held, o.metric, lm, tok, o.self_generate, o.max_new_tokens)
        kinds = {t.name: t.kind for t in tasks}
        kwargs = {"limit": o.limit, "max_new_tokens": o.max_new_tokens, "max_length": o.max_length}
        run = variant_evaluator(lm, tok, prof, tasks, **kwargs)
        say("== evaluate the full model on the dev set")
        full = run(None)
        say(f"== search (target {o.target:g} x full, smallest by {o.objective})")
        result = search_plans(
            run, full, kinds, prof, sizes_of(config, prof), target=o.target, methods=methods, modes=modes,
            scopes=scopes, objective=o.objective, select=o.select, log=say,
        )  # fmt: skip
        if given_test and result.best is not None and not o.prune:
            test_run = variant_evaluator(lm, tok, prof, given_test, **kwargs)
            result.test = test_summary(test_run(None), test_run(result.plan, result.best.mode), given_test)
        table = frontier_table(result)
        (tmp / "frontier.md").write_text(f"# moeprune search: {src}\n\n{summary_line(result)}\n\n{table}")
        write_plot(tmp / "frontier.png", result)
        if result.plan is not None:
            result.plan.settings["profiles"] = [
                {"path": str(final / "profile.safetensors"), "data": prof.meta.get("data")}
            ]
            result.plan.save(tmp / "plan.json")
            recipe = recipe_of(
                result,
                src,
                final,
                model_out or final / "model",
                o.self_generate,
                o.max_length,
                o.seed,
                o.test_tasks,
                o.limit,
            )
            (tmp / "recipe.yaml").write_text(
                "# moeprune recipe of the chosen variant: `moeprune run recipe.yaml` makes its checkpoint\n"
                + yaml.safe_dump(recipe, sort_keys=False)
            )
        (tmp / "search.json").write_text(json.dumps(result.to_json(), indent=1, default=str) + "\n")
    print(table, end="")
    print(summary_line(result))
    if o.prune and result.plan is not None:
        say("== prune: run the recipe")
        result.test = prune_chosen(
            final / "recipe.yaml", result, quiet=o.quiet, loaded=lm, test=given_test, force=o.force
        )
        (final / "search.json").write_text(json.dumps(result.to_json(), indent=1, default=str) + "\n")
    return result


def summary_line(result: SearchResult) -> str:
    bound = result.select == "bound"
    if result.best is None:
        more = ", give more dev records (--dev) or select on the mean (--select mean)" if bound else ""
        return (
            f"no variant smaller than the full model keeps {result.target:g} x its dev quality"
            f"{' at its 95% lower bound' if bound else ''}: keep the full model, lower --target, give more "
            f"methods{more}"
        )
    b, f = result.best, result.full
    quality = f"dev quality {b.quality:.3f}" + (f", 95% lower bound {b.bound:.3f}," if b.bound is not None else "")
    return (
        f"chosen: {b.label()} ({b.kept_total} of {f.kept_total} routed experts, {b.bytes / f.bytes:.1%} of the "
        f"bytes, {b.active_params / f.active_params:.1%} of the active params), {quality} "
        f">= target {result.target:g}; {len(result.points)} variants evaluated"
    )


def test_summary(full: dict[str, Any], pruned: dict[str, Any], tasks: list[Any]) -> dict[str, Any]:
    from .search import relative_quality

    kinds = {t.name: t.kind for t in tasks}
    return {"full": full, "pruned": pruned, "quality": relative_quality(full, pruned, kinds)}


def recipe_of(
    result: SearchResult,
    src: Path,
    final: Path,
    model_out: Path,
    self_generate: int,
    max_length: int,
    seed: int,
    test_tasks: Sequence[str],
    limit: int | None,
) -> dict[str, Any]:
    """The one-shot recipe that makes the chosen checkpoint: the same data (``train.jsonl``), method,
    experts per layer, scope and mode (a novice plan keeps the router whole)."""
    from .oneshot import _abs_task

    b = result.best
    assert b is not None
    return {
        "model": str(src.resolve()),
        "data": [str(final / "train.jsonl")],
        "method": b.method,
        "keep": str(b.experts),
        "out": str(model_out),
        "self_generate": self_generate,
        "scope": b.scope,
        "mode": b.mode,
        "eval": [_abs_task(t) for t in test_tasks],
        "eval_limit": limit if test_tasks else None,
        "max_length": max_length,
        "seed": seed,
    }


def prune_chosen(
    recipe: Path, result: SearchResult, *, quiet: bool, loaded: Any, test: list[Any], force: bool = False
) -> dict[str, Any] | None:
    """Run the recipe (profile, plan, prune, evaluate the checkpoint on the test tasks) and add a
    section on the search to the card; returns the test summary (None without test tasks)."""
    from .oneshot import run_oneshot
    from .recipe import load_recipe

    s = load_recipe(recipe)
    s.force = force  # replace an earlier checkpoint only when the search itself was forced
    done = run_oneshot(s, quiet=quiet, loaded=loaded, inputs=[("recipe", recipe)])
    if done.plan.kept != result.plan.kept:  # the recipe re-profiles: say so if it ever differs
        print("moeprune: warning: the checkpoint's plan differs from the searched one", file=sys.stderr)
    summary = None
    if done.eval is not None:  # {task: {"kind", "metrics", ...}} of the checkpoint on disk
        full, pruned = ({t: r["metrics"] for t, r in done.eval[w].items()} for w in ("full", "pruned"))
        summary = test_summary(full, pruned, test)
    card = Path(s.out) / "README.md"
    card.write_text(card.read_text(encoding="utf-8") + "\n" + card_section(result, summary), encoding="utf-8")
    return summary


def card_section(result: SearchResult, test: dict[str, Any] | None) -> str:
    b = result.best
    assert b is not None
    lines = [
        "## How this model was chosen (`moeprune search`)",
        "",
        f"The smallest of {len(result.points)} evaluated variants whose quality on a held-out dev set is at "
        f"least {result.target:g} x the full model's"
        + (" at its 95% lower confidence bound" if b.bound is not None else "")
        + f": {b.label()} (dev quality {b.quality:.3f}"
        + (f", lower bound {b.bound:.3f}" if b.bound is not None else "")
        + ").",
        "",
    ]
    if test is None:
        lines.append(
            "No test task was given (`--test`), so how the dev result holds on unseen data is not measured."
        )
    else:
        q = float(test["quality"])
        held = "held" if q >= result.target else "did not hold"
        lines.append(
            f"On the test tasks (disjoint from the dev set) this checkpoint keeps {q:.3f} x the full model "
            f"(worst task): the dev-set target {held}."
        )
        lines += ["", "| task | full | pruned |", "|---|---|---|"]
        for task, metrics in test["full"].items():
            for name, value in metrics.items():
                if (
                    name.endswith("_stderr")
                    or name == "n"
                    or not isinstance(value, (int, float))
                    or math.isnan(float(value))
                ):
                    continue
                lines.append(
                    f"| {task} {name} | {value:.4g} | {test['pruned'][task].get(name, float('nan')):.4g} |"
                )
    return "\n".join(lines) + "\n"

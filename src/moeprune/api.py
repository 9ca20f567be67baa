"""The Python API: profile -> plan -> prune (-> evaluate), or all of it with :func:`oneshot`;
also :func:`inspect`, :func:`compare`, :func:`report`, :func:`build_library`, :func:`route` and
:func:`export_uniform` (the stock uniform checkpoint nearest to a ragged or novice prune).

::

    from moeprune import api

    prof = api.profile("path/to/model", ["math.jsonl"])       # or a loaded transformers model
    plan = prof.plan("easyep", keep=0.5)                       # = api.plan(prof, "easyep", 0.5)
    api.prune("path/to/model", plan, "pruned/")
    report = api.evaluate("pruned/", ["math=math.eval.jsonl"])

Every ``moeprune`` command is a thin shell around these functions (parse arguments, call, print).
A user mistake raises :class:`moeprune.errors.UserError`. The functions live here rather than at
the top level because ``moeprune.profile``, ``moeprune.plan`` and ``moeprune.evaluate`` are modules.
See docs/api.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .estimate import ProfileEstimate, PruneEstimate
    from .export import UniformPlan
    from .oneshot import OneShotResult
    from .plan import Plan
    from .profile import Profile
    from .search_run import SearchOptions
    from .surgery import RewriteResult

PathLike = str | os.PathLike
MODES = ("remove", "novice")


# --- models: a path or a loaded transformers model ------------------------------------------------


def _is_loaded(model: Any) -> bool:
    return not isinstance(model, (str, os.PathLike))


def model_source(model: Any) -> str:
    """The checkpoint of ``model``: the path itself, or a loaded model's ``name_or_path``."""
    if not _is_loaded(model):
        return os.fspath(model)
    name = getattr(model, "name_or_path", "") or ""
    if not name:
        raise UserError(
            "the loaded model has no name_or_path", "load it with from_pretrained, or pass its path"
        )
    return str(name)


def model_input(model: Any) -> tuple[str, Path] | None:
    """The checkpoint folder of ``model`` as an input of a command (an output may not be, contain or
    sit inside it); None when it is not on disk (an error for the command to report itself)."""
    from .modelio import resolve_model_dir

    try:
        return ("input model", resolve_model_dir(model_source(model)))
    except UserError:
        return None


def _file_inputs(label: str, paths: Sequence[Any]) -> list[tuple[str, str]]:
    return [(label, os.fspath(p)) for p in paths if p is not None]


def json_output(
    out: PathLike,
    *,
    inputs: Sequence[Any] = (),
    force: bool = False,
    what: str = "--output",
    owned: Callable[[Path], bool] | None = None,
) -> Any:
    """A JSON file output, checked now (docs/outputs.md); write it later with :func:`write_json`."""
    from .outputs import prepare_output

    return prepare_output(out, inputs=inputs, force=force, folder=False, kind="json", what=what, owned=owned)


def write_json(target: Any, data: Any) -> Path:
    """Write ``data`` (non-finite floats as null) to the checked output ``target`` atomically."""
    from .outputs import json_safe

    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    with target as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(target.path)


def _tokenizer_of(model: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from .modelio import load_tokenizer, resolve_model_dir

    try:
        return load_tokenizer(resolve_model_dir(model_source(model)))
    except (OSError, ValueError):
        raise UserError(
            f"cannot load the tokenizer of '{model_source(model)}'", "pass tokenizer=... as well"
        ) from None


def inspect(model: Any) -> Any:
    """The MoE structure of ``model`` (a path, cached hub id or loaded model) and its size after
    keeping a share of the routed experts, from its config alone, as `moeprune inspect`."""
    from .modelio import load_config, resolve_model_dir
    from .summary import summarize

    if _is_loaded(model):
        return summarize(model.config)
    name = model_source(model)
    # weights found beside the config must match it (headers only; a config alone is fine)
    return summarize(load_config(name), checkpoint_dir=resolve_model_dir(name))


# --- profile --------------------------------------------------------------------------------------


def profile(
    model: Any,
    data: Sequence[PathLike],
    *,
    out: PathLike | None = None,
    tokenizer: Any = None,
    text_field: str | None = None,
    max_length: int = 2048,
    batch_size: int = 8,
    max_samples: int | None = None,
    seed: int = 0,
    self_generate: int = 0,
    premoe_ka: int | None = None,
    per_sample: bool | None = None,
    dtype: str = "auto",
    device: str = "auto",
    offload: str = "none",
    force: bool = False,
    quiet: bool = True,
    premoe_exact: bool = False,
) -> Profile:
    """One calibration pass of ``model`` (a path, cached hub id or loaded model) over ``data``.

    Returns the :class:`~moeprune.profile.Profile`; with ``out`` it is also written there (and,
    with ``self_generate``, the model's answers beside it as ``<stem>.demos.jsonl``). A loaded model
    is used as it is (``dtype``/``device`` ignored); its tokenizer is loaded from its folder unless
    given. ``premoe_exact`` also keeps PreMoe's per-token entries (the profile then grows with the
    tokens; the default histograms give the same ranking in a size bounded by the model). An existing ``out`` is
    replaced only with ``force`` (docs/outputs.md)."""
    data = [os.fspath(d) for d in data]
    out_path = Path(out) if out is not None else None
    from .profiling import check_profile_args

    check_profile_args(
        data=data,
        out=out_path,
        max_length=max_length,
        batch_size=batch_size,
        max_samples=max_samples,
        self_generate=self_generate,
        premoe_ka=premoe_ka,
        offload=offload,
    )
    loaded = None
    if _is_loaded(model):
        if offload != "none":
            raise UserError("offload applies to a model path, not a loaded model", "pass the path")
        loaded = (model, _tokenizer_of(model, tokenizer))
    from .profiling import run_profile

    return run_profile(
        model=model_source(model),
        data=data,
        out=out_path,
        text_field=text_field,
        max_length=max_length,
        batch_size=batch_size,
        max_samples=max_samples,
        seed=seed,
        self_generate=self_generate,
        premoe_ka=premoe_ka,
        per_sample=per_sample,
        dtype=dtype,
        device=device,
        offload=offload,
        premoe_exact=premoe_exact,
        quiet=quiet,
        loaded=loaded,
        force=force,
        inputs=[model_input(model), *_file_inputs("data file", data)],
    )


def load_profile(path: PathLike) -> Profile:
    """A profile file; a missing or unreadable one is a UserError."""
    from .profile import Profile

    if not Path(path).is_file():
        raise UserError(f"profile '{path}' does not exist", "make one with `moeprune profile`")
    try:
        return Profile.load(path)
    except UserError:
        raise
    except Exception as exc:  # any other failure to read it: a corrupted file
        raise UserError(
            f"cannot read profile '{path}' ({exc.__class__.__name__})",
            "re-run `moeprune profile` to make it again",
        ) from None


# --- plan -----------------------------------------------------------------------------------------


def plan(
    profiles: Profile | PathLike | Sequence[Profile | PathLike],
    method: str,
    keep: int | float | str,
    *,
    scope: str = "layer",
    top_k: int | None = None,
    seed: int | None = None,
    per_group: str = "equal",
    premoe_r: float | None = None,
    premoe_ka: int | None = None,
    out: PathLike | None = None,
    force: bool = False,
    router: str = "routed",
) -> Plan:
    """Choose the experts every MoE layer keeps from one profile (or several of the same model:
    EASY-EP mixed-domain), as `moeprune plan`; ``out`` also writes the plan (JSON; an existing
    file is replaced only with ``force``, docs/outputs.md). ``router="unchanged"``: a plan for
    novice mode, which keeps the router whole, so any count (even below top-k) in any group."""
    from .plan import plan_from_profile, sparse_warning
    from .profile import Profile
    from .score import combined_score, nonzero_per_layer, score

    keep_value, options = check_plan_args(
        method, keep, scope=scope, per_group=per_group, seed=seed, premoe_r=premoe_r, premoe_ka=premoe_ka
    )
    given = [profiles] if isinstance(profiles, (Profile, str, os.PathLike)) else list(profiles)
    target = plan_output(out, given, force) if out is not None else None

    # --- load, score, plan -------------------------------------------------------------------------
    loaded = [p if isinstance(p, Profile) else load_profile(p) for p in given]
    meta = loaded[0].meta
    if len(loaded) == 1:
        scores = score(loaded[0], method, **options)
    else:
        scores = combined_score(loaded, method, **options)

    source = f"profile '{loaded[0].name}'"

    settings: dict[str, Any] = {
        "profiles": [
            {"path": pr.path, "tokens": pr.meta.get("tokens"), "data": pr.meta.get("data")} for pr in loaded
        ],
        "options": options,
        "mixed_domain": len(loaded) > 1,
    }
    result = plan_from_profile(
        scores,
        meta,
        keep=keep_value,
        method=method,
        source=source,
        scope=scope,
        new_top_k=top_k,
        per_group=per_group,
        settings=settings,
        nonzero=nonzero_per_layer(loaded, method, **options),
        router=router,
    )
    warning = sparse_warning(result)
    if warning:
        print(warning, file=sys.stderr)
    if target is not None:
        save_plan(result, target)
    return result


def plan_output(out: PathLike, profiles: Sequence[Any], force: bool = False) -> Any:
    """The plan file ``out``, checked now (docs/outputs.md): a file, never one of the ``profiles``
    (paths or loaded profiles) nor inside a model folder, replaced only with ``force``."""
    from .outputs import prepare_output
    from .profile import Profile

    check_file_out(Path(out), "--out", "plan.json")
    paths = [p.path if isinstance(p, Profile) else p for p in profiles]
    inputs = _file_inputs("input profile", paths) + _profile_models(paths)
    return prepare_output(out, inputs=inputs, force=force, folder=False, kind="plan")


def _profile_models(paths: Sequence[Any]) -> list[tuple[str, str]]:
    """The model folders the profiles were made on (an output never goes into one)."""
    models: list[tuple[str, str]] = []
    for p in paths:
        if p is None or not Path(p).is_file():
            continue
        try:
            name = _profile_meta(Path(p)).get("model")
        except UserError:
            continue
        if isinstance(name, str) and name and Path(name).expanduser().is_dir():
            models.append(("model", name))
    return models


def save_plan(the_plan: Plan, target: Any) -> Path:
    """Write ``the_plan`` to the output ``target`` (:func:`plan_output`)."""
    text = the_plan.dumps()
    with target as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(target.path)


def check_plan_args(
    method: str,
    keep: int | float | str,
    *,
    scope: str = "layer",
    per_group: str = "equal",
    seed: int | None = None,
    premoe_r: float | None = None,
    premoe_ka: int | None = None,
) -> tuple[int | float, dict[str, Any]]:
    """Every check of :func:`plan`'s arguments that reads nothing; returns (keep, score options)."""
    from .plan import parse_keep
    from .score import OPTIONS, check_method

    check_method(method)
    if scope not in ("layer", "global"):
        raise UserError(f"unknown scope '{scope}'", "use --scope layer or --scope global")
    if per_group not in ("equal", "free"):
        raise UserError(f"unknown --per-group '{per_group}'", "use --per-group equal or free")
    keep_value = parse_keep(str(keep))
    options: dict[str, Any] = {"seed": seed, "r": premoe_r, "ka": premoe_ka}
    for name, value in options.items():
        flag = {"seed": "--seed", "r": "--premoe-r", "ka": "--premoe-ka"}[name]
        if value is not None and name not in OPTIONS.get(method, ()):
            raise UserError(f"{flag} does not apply to method '{method}'", f"leave {flag} out")
    if method == "random" and seed is None:
        options["seed"] = 0
    return keep_value, {k: v for k, v in options.items() if v is not None}


def check_file_out(out: Path, flag: str, example: str) -> None:
    """An output file's path: not a folder, in a folder that exists."""
    if out.exists() and out.is_dir():
        raise UserError(f"{flag} '{out}' is a directory", f"pass a file name such as {example}")
    parent = out.expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"the folder of {flag} '{out}' does not exist", f"create {parent} first")


# --- prune ----------------------------------------------------------------------------------------


def prune(
    model: Any,
    plan: Plan | PathLike,
    out: PathLike,
    *,
    mode: str = "remove",
    profile: Profile | PathLike | None = None,
    pad_uniform: bool = False,
    force: bool = False,
    max_shard_size: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_other_profile: bool = False,
    novice: str = "mean",
) -> RewriteResult:
    """Write the pruned checkpoint of ``plan`` to the folder ``out`` (streams; never loads the model).

    ``model`` is a checkpoint folder or cached hub id; a loaded model is accepted for its
    ``name_or_path`` (the rewrite reads the checkpoint on disk, not the weights in memory).
    ``profile``: the plan's profile (kept as profile-meta.json; ``mode="novice"`` needs it); one
    calibrated on other data than the plan's is refused unless ``allow_other_profile``. ``out`` is
    never the model, the plan or the profile (or around them); an existing ``out`` is replaced
    only with ``force`` and only if moeprune wrote it (docs/outputs.md). ``novice``: what each
    novice is fitted to, ``mean`` (MoNE's mean output) or ``lsq`` (the gate-weighted least-squares
    fit, docs/methods.md)."""
    return _prune(
        model,
        plan,
        out,
        mode=mode,
        profile=profile,
        pad_uniform=pad_uniform,
        force=force,
        max_shard_size=max_shard_size,
        progress=progress,
        allow_other_profile=allow_other_profile,
        novice=novice,
    )


def _prune(
    model: Any,
    plan: Plan | PathLike,
    out: PathLike,
    *,
    mode: str = "remove",
    profile: Profile | PathLike | None = None,
    pad_uniform: bool = False,
    force: bool = False,
    max_shard_size: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_other_profile: bool = False,
    into: Path | None = None,
    novice: str = "mean",
    reads: Sequence[tuple[str, Any]] = (),
) -> RewriteResult:
    """:func:`prune`; ``into``: write into this existing folder instead (one-shot's output);
    ``reads``: more inputs (label, path) the output must not be."""
    from .checkpoint import parse_size
    from .modelio import load_config, resolve_model_dir
    from .outputs import check_output
    from .plan import Plan
    from .surgery import rewrite_checkpoint

    # --- check everything before writing anything --------------------------------------------------
    if mode not in MODES:
        raise UserError(f"unknown --mode '{mode}'", f"use --mode {' or '.join(MODES)}")
    if mode == "novice" and profile is None:
        raise UserError(
            "--mode novice needs the novices' mean outputs",
            "pass --profile with the profile the plan was made from",
        )
    if max_shard_size is not None:
        parse_size(max_shard_size)
    name = model_source(model)
    src = resolve_model_dir(name)
    the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    given_profile = _is_profile(profile)
    if given_profile:
        profile_meta = profile.meta  # type: ignore[union-attr]
    else:
        profile_meta = _profile_meta(Path(profile)) if profile is not None else None  # type: ignore[arg-type]
    out = Path(out)
    inputs = _file_inputs("plan", [None if isinstance(plan, Plan) else plan])
    inputs += _file_inputs("profile", [None if given_profile else profile])
    inputs += list(reads)
    if into is None:
        check_output(out, inputs=[("input model", src), *inputs], force=force)
    # a family the headers tell: no transformers (torch only for a novice profile that must be read
    # with it and for --pad-uniform's dead selection biases)
    header = _header_blocks(src)
    if header is not None:
        config, blocks = header
    else:
        config, blocks = load_config(str(src)), None
    check_plan_matches(the_plan, config, blocks)
    novices = None
    if mode == "novice" and profile is not None:
        novices = _novice_vectors(profile, the_plan, config, name, novice, blocks)

    top_k = the_plan.top_k if the_plan.top_k != _model_top_k(config) else None
    return rewrite_checkpoint(
        src,
        out,
        the_plan.kept,
        top_k=top_k,
        metadata=profile_meta,
        force=force,
        plan=the_plan.to_json(),
        max_shard_size=max_shard_size,
        progress=progress,
        mode=mode,
        pad_uniform=pad_uniform,
        novices=novices,
        allow_other_profile=allow_other_profile,
        inputs=inputs,
        into=into,
    )


@dataclass
class UniformExport:
    """What :func:`export_uniform` wrote: the uniform plan and its checkpoint."""

    uniform: UniformPlan
    result: RewriteResult


def export_uniform(
    source: PathLike,
    out: PathLike,
    *,
    model: Any = None,
    profile: Profile | PathLike | Sequence[Profile | PathLike] | None = None,
    force: bool = False,
    max_shard_size: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> UniformExport:
    """Write to ``out`` the stock uniform checkpoint nearest to a ragged or novice prune (as
    `moeprune export --uniform`; :mod:`moeprune.export`): the same method and scores, one expert
    count per MoE layer (the source's mean, rounded), every layer keeping its own best experts.

    ``source``: a plan file, or a checkpoint folder moeprune pruned (its ``plan.json``).
    ``profile``: the plan's profile(s), by default the ones the plan records; they must give back
    the plan's kept experts. ``model``: the original model, by default the one the profile was
    made on. Everything is checked before anything is written (:func:`prune`'s output rules)."""
    from .export import read_source, recorded_profiles, uniform_plan
    from .profile import Profile

    the_plan, folder = read_source(source)
    if profile is None:
        given: list[Any] = list(recorded_profiles(the_plan))
        if not given:
            raise UserError("the plan records no profile path", "pass the profile it was made from with --profile")
        for p in given:
            if not Path(p).is_file():
                raise UserError(
                    f"the plan's profile '{p}' does not exist", "pass the profile it was made from with --profile"
                )
    else:
        given = [profile] if isinstance(profile, (Profile, str, os.PathLike)) else list(profile)
    loaded = [p if isinstance(p, Profile) else load_profile(p) for p in given]
    paths = [Path(p.path) if isinstance(p, Profile) else Path(p) for p in given]
    uniform = uniform_plan(the_plan, loaded, paths)
    if model is None:
        model = loaded[0].meta.get("model")
        if not isinstance(model, str) or not model:
            raise UserError("the profile does not name its model", "pass the original model with --model")
    first = given[0]
    result = _prune(
        model,
        uniform.plan,
        out,
        mode="remove",
        profile=first,
        force=force,
        max_shard_size=max_shard_size,
        progress=progress,
        reads=[("pruned checkpoint" if folder else "plan", folder or Path(source))],
    )
    return UniformExport(uniform, result)


def estimate_prune(
    model: Any,
    plan: Plan | PathLike | None = None,
    *,
    keep: int | float | str | None = None,
    mode: str = "remove",
    profile: Profile | PathLike | None = None,
    pad_uniform: bool = False,
    max_shard_size: str | None = None,
    bandwidth: str | float | None = None,
) -> PruneEstimate:
    """The dry run of :func:`prune`: the output's shards and sizes (exactly those the rewrite would
    write), the bytes read and written, the peak memory and a time estimate, from the checkpoint's
    config and shard headers alone (:mod:`moeprune.estimate`). Nothing is written.

    The experts kept come from ``plan`` (a plan or its file), or, without one, from ``keep``: the
    same number of experts in every MoE layer (an int, or a fraction such as 0.5, rounded as
    `moeprune plan` rounds it). Which experts a plan keeps changes no size. ``bandwidth`` (bytes/s,
    or text such as ``"1.5GB/s"``) sets the time estimate; without it a quick read of the largest
    shard measures it. The plan's and profile's provenance (made on this very checkpoint) is checked
    by the real run, which reads the router weights for it; the dry run reads no tensor data."""
    import time

    from .estimate import prune_estimate, uniform_kept
    from .modelio import build_on_meta, load_config, resolve_model_dir
    from .plan import Plan

    started = time.perf_counter()
    if mode not in MODES:
        raise UserError(f"unknown --mode '{mode}'", f"use --mode {' or '.join(MODES)}")
    if (plan is None) == (keep is None):
        raise UserError(
            "a dry run of prune needs the experts to keep" if plan is None else "--plan and --keep are given together",
            "pass --plan plan.json, or --keep K (experts per layer, or a fraction such as 0.5)",
        )
    src = resolve_model_dir(model_source(model))
    # a family the headers tell: no transformers (as prune)
    header = _header_blocks(src)
    config, blocks = header if header is not None else (load_config(str(src)), None)
    top_k = None
    if plan is not None:
        the_plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        check_plan_matches(the_plan, config, blocks)
        kept = the_plan.kept
        top_k = the_plan.top_k if the_plan.top_k != _model_top_k(config) else None
    else:
        if blocks is None:
            from .arch import find_moe_blocks

            blocks = find_moe_blocks(build_on_meta(config))
        kept = uniform_kept(blocks, keep)  # type: ignore[arg-type]
    novices = None
    if mode == "novice":
        if profile is not None and plan is not None:
            novices = _novice_vectors(profile, the_plan, config, str(src), blocks=blocks)
        else:  # the sizes need only the vectors' count and width: zeros stand in for them
            import numpy as np

            if blocks is None:
                from .arch import find_moe_blocks

                blocks = find_moe_blocks(build_on_meta(config))
            hidden = int(config.get_text_config().hidden_size)
            novices = {
                b.layer: np.zeros((b.num_experts - len(kept[b.layer]), hidden), dtype=np.float32)
                for b in blocks
                if b.layer in kept
            }
    if max_shard_size is not None:
        from .checkpoint import parse_size

        parse_size(max_shard_size)
    return prune_estimate(
        src,
        kept,
        top_k=top_k,
        mode=mode,
        pad_uniform=pad_uniform,
        novices=novices,
        max_shard_size=max_shard_size,
        bandwidth=bandwidth,
        started=started,
    )


DRY_RUN_RECORDS = 128  # records a profile dry run assumes without --data or --max-samples


def estimate_profile(
    model: Any,
    data: Sequence[PathLike] = (),
    *,
    text_field: str | None = None,
    max_length: int = 2048,
    batch_size: int = 8,
    max_samples: int | None = None,
    seed: int = 0,
    premoe_ka: int | None = None,
    per_sample: bool | None = None,
    dtype: str = "auto",
    device: str = "auto",
    offload: str = "none",
    premoe_exact: bool = False,
    bandwidth: str | float | None = None,
) -> ProfileEstimate:
    """The dry run of :func:`profile`: the profile's size, the bytes read, the peak memory of the
    calibration pass (``offload="sequential"``: one decoder layer at a time, as
    :mod:`moeprune.offload` runs it) and the time to read the weights, from the checkpoint's config
    and shard headers alone. Nothing is written and no tensor data is read.

    With ``data`` the records are counted (and tokenized when the model folder has a tokenizer;
    else each counts ``max_length`` tokens, an upper bound); without it ``max_samples`` records
    (default 128) of ``max_length`` tokens are assumed. The estimate says which applies."""
    import time

    from .data import check_max_length, load_records, select_records, tokenize_records
    from .estimate import profile_estimate
    from .modelio import resolve_model_dir

    started = time.perf_counter()
    check_max_length(max_length)
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}", "pass a number >= 1")
    if max_samples is not None and max_samples < 1:
        raise UserError(f"--max-samples must be positive, got {max_samples}", "pass a number >= 1")
    src = resolve_model_dir(model_source(model))
    if data:
        records, _ = load_records([os.fspath(d) for d in data], text_field)
        records = select_records(records, max_samples, seed)
        tok = _dry_run_tokenizer(src)
        if tok is not None:
            seqs, _ = tokenize_records(tok, records, max_length)
            n_records, tokens = len(seqs), sum(len(s) for s in seqs)
            how = f"counted: {n_records} records tokenized"
        else:
            n_records, tokens = len(records), len(records) * max_length
            how = f"{n_records} records x --max-length {max_length} (an upper bound: the model folder has no tokenizer)"
    else:
        n_records = max_samples or DRY_RUN_RECORDS
        tokens = n_records * max_length
        how = f"assumed: {n_records} records x --max-length {max_length} (pass --data to count them)"
    return profile_estimate(
        src,
        records=n_records,
        tokens=tokens,
        tokens_source=how,
        max_length=max_length,
        batch_size=batch_size,
        offload=offload,
        dtype=dtype,
        device=device,
        per_sample=per_sample,
        premoe_exact=premoe_exact,
        premoe_ka=premoe_ka,
        bandwidth=bandwidth,
        started=started,
    )


def _dry_run_tokenizer(src: Path) -> Any:
    """The model folder's tokenizer, or None when it has none (a headers-only layout)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _novice_vectors(
    profile: Profile | PathLike,
    plan: Plan,
    config: Any,
    model: str,
    fit: str = "mean",
    blocks: Sequence[Any] | None = None,
) -> dict[int, Any]:
    """Each layer's novice vectors [R, H] (ascending replaced ids) from the profile: the mean
    expert outputs, or with ``fit="lsq"`` the gate-weighted least-squares fits. ``blocks``: the
    model's MoE blocks when known without building it (:func:`_header_blocks`); then a profile
    file is read without torch where it checks out (:func:`moeprune.profile_file.novice_rows`:
    numpy arrays), else with torch, which names any problem."""
    if blocks is not None and not _is_profile(profile):
        from .identity import fingerprint_fields, model_fingerprint
        from .profile_file import novice_rows

        fingerprint = model_fingerprint(fingerprint_fields(config, blocks))
        rows = novice_rows(profile, fit, fingerprint, plan.replaced)  # type: ignore[arg-type]
        if rows is not None:
            return rows
    from .profile import Profile

    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    prof.check_model(config, model, blocks)
    mean = prof.novices(fit)
    out: dict[int, Any] = {}
    for layer, ids in plan.replaced.items():
        if layer not in prof.layers:
            raise UserError(
                f"profile '{prof.name}' has no statistics for MoE layer {layer}",
                "pass the profile the plan was made from",
            )
        out[layer] = mean[prof.layers.index(layer), ids].float()
    return out


def _is_profile(profile: Any) -> bool:
    """``profile`` is a loaded :class:`moeprune.profile.Profile` (not a path). Without importing
    that module (torch): an object of the class exists only once it is imported."""
    module = sys.modules.get("moeprune.profile")
    return module is not None and isinstance(profile, module.Profile)


def _header_blocks(src: Path) -> tuple[Any, list[Any]] | None:
    """The config and MoE blocks of the checkpoint ``src`` for a plain removal, read from
    ``config.json`` and the shard headers alone where :mod:`moeprune.arch.header_config` and
    :mod:`moeprune.arch.header_keys` vouch for them (the blocks the model built on the meta device
    has: tests/test_header_keys.py), else None: the caller reads the config with transformers,
    which also names any problem of the files (the rewrite then reads them again)."""
    from .arch.header_config import header_config
    from .arch.header_keys import header_key_map
    from .checkpoint import Checkpoint
    from .modelio import read_raw_config
    from .surgery import mtp_keys

    try:
        raw = read_raw_config(src)
        config = header_config(raw)
        if config is None:
            return None
        ckpt = Checkpoint.open(src)
    except UserError:
        return None
    keymap = header_key_map(config, ckpt.shapes(), mtp_keys(ckpt.tensors, raw))
    return None if keymap is None else (config, list(keymap.blocks))


def check_plan_matches(plan: Plan, config: Any, blocks: Sequence[Any] | None = None) -> None:
    """Error unless the plan was made for this model (type, fingerprint, expert count, MoE layers).
    ``blocks``: the model's MoE blocks, when known without building it (:func:`_header_blocks`)."""
    from .identity import fingerprint_fields, model_fingerprint

    text = config.get_text_config()
    types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    if plan.model_type and plan.model_type not in types:
        raise UserError(
            f"this plan was made for a '{plan.model_type}' model, not '{config.model_type}'",
            "make a plan from a profile of this model",
        )
    if blocks is None:
        from .arch import find_moe_blocks
        from .modelio import build_on_meta

        blocks = find_moe_blocks(build_on_meta(config))
    if plan.model_fingerprint:
        plan.check_model(model_fingerprint(fingerprint_fields(config, blocks)))
    num_experts = blocks[0].num_experts
    if plan.num_experts != num_experts:
        raise UserError(
            f"this plan was made for a model with {plan.num_experts} experts per layer; this one has {num_experts}",
            "make a plan from a profile of this model",
        )
    layers = [b.layer for b in blocks]
    missing = [layer for layer in layers if layer not in plan.kept]
    if missing:
        raise UserError(
            f"the plan has no kept experts for MoE layer(s) {', '.join(map(str, missing[:8]))}",
            "make a plan from a profile of this model",
        )
    extra = [layer for layer in plan.layers if layer not in layers]
    if extra:
        raise UserError(
            f"the plan names layer(s) {', '.join(map(str, extra[:8]))}, which are not MoE layers of this "
            f"model (MoE layers: {layers})",
            "make a plan from a profile of this model",
        )


def _model_top_k(config: Any) -> int | None:
    from .arch.table import TOP_K_ATTRS

    text = config.get_text_config()
    return next((int(getattr(text, n)) for n in TOP_K_ATTRS if getattr(text, n, None) is not None), None)


def _profile_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` JSON object of a profile, read from its safetensors header only."""
    from .checkpoint import read_header

    if not path.is_file():
        raise UserError(f"profile '{path}' does not exist", "pass the profile the plan was made from")
    _, metadata = read_header(path)
    try:
        meta = json.loads(metadata.get("meta", ""))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(
            f"'{path}' is not a moeprune profile (no meta)", "pass a file from `moeprune profile`"
        )
    return meta


# --- evaluate -------------------------------------------------------------------------------------


def evaluate(
    model: Any,
    tasks: Sequence[str] | None = None,
    *,
    lm_eval: str | Sequence[str] | None = None,
    lm_eval_include: PathLike | None = None,
    tokenizer: Any = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 24,
    max_length: int = 1024,
    progress: bool = False,
    allow_download: bool | None = None,
    out: PathLike | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (a path, cached hub id or loaded model) on moeprune tasks (as
    ``moeprune eval --task``: PATH, NAME=PATH, kind:PATH, testbed[:NAME]) and lm-eval task names.

    Returns the report `moeprune eval --output` writes: model, settings, versions, seconds, tasks.
    lm-eval runs offline unless ``allow_download`` (or MOEPRUNE_ALLOW_DOWNLOAD=1); a task whose
    dataset is not cached raises :class:`LmEvalDataMissing` whose ``report`` holds what finished.
    ``out`` also writes the report (JSON, what finished included), checked before any work: never
    the model, a task file or inside them; an existing file replaced only with ``force``."""
    import time

    from .evaluate.options import check_device_and_dtype, check_run_options
    from .evaluate.tasks import resolve_tasks

    # --- check everything the user gave before loading anything heavy --------------------------
    check_run_options(
        limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length
    )
    check_device_and_dtype(device, dtype)
    if not isinstance(lm_eval, (str, type(None))):
        lm_eval = ",".join(lm_eval)
    if not tasks and not lm_eval:
        raise UserError("no task given", "pass --task PATH (repeatable) or --lm-eval TASKNAMES")
    if lm_eval_include and not lm_eval:
        raise UserError(
            "--lm-eval-include given without --lm-eval", "name the lm-eval tasks to run with --lm-eval"
        )
    from .evaluate.loading import load_model_and_tokenizer, resolve_device, resolve_model_path

    name = model_source(model)
    loaded = _is_loaded(model)
    model_path = Path(name) if loaded else resolve_model_path(name)
    resolved_device = str(next(model.parameters()).device) if loaded else resolve_device(device)
    task_list = resolve_tasks(list(tasks or []))
    include = os.fspath(lm_eval_include) if lm_eval_include else None
    target = None
    if out is not None:
        check_file_out(Path(out), "--output", "results.json")
        reads = [model_input(model), *_file_inputs("lm-eval include", [include])]
        reads += _file_inputs("task file", [getattr(t, "source", None) for t in task_list])
        target = json_output(out, inputs=reads, force=force)
    lm_eval_tasks: list[str] = []
    lm_eval_manager = None
    if lm_eval:
        from .evaluate.lm_eval_bridge import parse_task_names, prepare_lm_eval

        lm_eval_tasks = parse_task_names(lm_eval)
        lm_eval_manager = prepare_lm_eval(lm_eval_tasks, include)

    # --- load and run ----------------------------------------------------------------------------
    from .evaluate.runners import evaluate as run_tasks

    started = time.time()
    if loaded:
        lm, tok = model, _tokenizer_of(model, tokenizer)
    else:
        lm, tok = load_model_and_tokenizer(name, device=resolved_device, dtype=dtype)
    results = run_tasks(
        lm,
        tok,
        task_list,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        progress=progress,
    )
    missing = None
    if lm_eval_tasks:
        from .evaluate.lm_eval_bridge import LmEvalDataMissing, run_lm_eval

        try:
            results["tasks"].update(
                run_lm_eval(
                    lm,
                    tok,
                    lm_eval_tasks,
                    include_path=include,
                    limit=limit,
                    batch_size=batch_size,
                    task_manager=lm_eval_manager,
                    allow_download=allow_download,
                )
            )
        except LmEvalDataMissing as exc:  # keep what ran: the error carries the finished report
            results["tasks"].update(exc.results)
            missing = exc
    report: dict[str, Any] = {
        "model": name,
        "model_path": str(model_path.resolve()),
        "settings": {
            **results["settings"],
            "device": resolved_device,
            "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
            "lm_eval": lm_eval_tasks or None,
            "lm_eval_include": str(Path(include).resolve()) if include else None,
        },
        "versions": _versions(),
        "seconds": round(time.time() - started, 3),
        "tasks": results["tasks"],
    }
    if target is not None:
        write_json(target, report)
    if missing is not None:
        missing.report = report
        raise missing
    return report


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"moeprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


# --- one-shot -------------------------------------------------------------------------------------


def oneshot(
    model: Any,
    data: Sequence[PathLike],
    method: str,
    keep: int | float | str,
    out: PathLike,
    *,
    quiet: bool = True,
    **settings: Any,
) -> OneShotResult:
    """Profile, plan and prune (and evaluate) in one go into the folder ``out``, as
    `moeprune prune MODEL --data ...`; ``settings``: the other keys of a recipe (self_generate,
    scope, mode, eval, eval_limit, max_length, seed, top_k, force, pad_uniform).

    ``out`` holds the pruned checkpoint, its ``plan.json`` and a ``moeprune/`` folder with the
    profile, the recipe and (with ``eval``) ``eval.json``; nothing is left behind on failure."""
    from .oneshot import OneShot, run_oneshot

    s = OneShot(
        model=model_source(model),
        data=[os.fspath(d) for d in data],
        method=method,
        keep=str(keep),
        out=os.fspath(out),
        **settings,
    )
    return run_oneshot(s, quiet=quiet, loaded=model if _is_loaded(model) else None)




# --- search ---------------------------------------------------------------------------------------


def search(
    model: Any, data: Sequence[PathLike], out: PathLike, options: SearchOptions | None = None, **changes: Any
) -> Any:
    """The smallest pruned model whose quality on a dev set is >= ``target`` x the full model's, as
    `moeprune search`: ``dev`` of the demonstrations held out (a share or a count; or
    ``eval_tasks`` as the dev set), one profile of the rest, a bisection on the experts kept for
    every method x mode (remove, novice) x scope (layer, global). Writes the frontier, plot, plan
    and recipe into the folder ``out`` (and with ``prune`` the checkpoint into ``out/model``,
    evaluated on ``test_tasks``). Returns the :class:`~moeprune.search.SearchResult` (``best``,
    ``plan``, ``frontier()``, ``test``). A loaded model is used as it is.

    The options (``target=0.99``, ``dev=0.3``, ``methods``, ``modes``, ``scopes``, ``prune``, ...)
    are the fields of :class:`moeprune.search_run.SearchOptions`, where their defaults are: pass
    them as keywords (``changes``), or as one ``options`` object with keywords changing it."""
    from .search_run import run_search, search_options

    chosen = search_options(options, **changes)  # an unknown keyword: TypeError, before any work
    loaded = (model, _tokenizer_of(model, None)) if _is_loaded(model) else None
    return run_search(model_source(model), data, out, chosen, loaded=loaded)


# --- compare --------------------------------------------------------------------------------------


def compare(
    model: Any,
    profiles: Sequence[Profile | PathLike],
    tasks: Sequence[str],
    *,
    methods: Sequence[str] | None = None,
    keeps: Sequence[int | float | str] | None = None,
    novice: bool = True,
    tokenizer: Any = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    max_length: int = 1024,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    out: PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_resume: Callable[[str, set[str]], None] | None = None,
    novice_fit: str = "mean",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every method x keep ratio (x novice) on ``model``, loaded once, with routing masks (nothing
    pruned on disk), as `moeprune compare`: one plan per profile, plus the mixed-domain plan.

    Returns (rows, report) (:func:`moeprune.compare.compare`'s rows and the run's settings); ``out``
    also writes results.md/.csv/.json and the plots into that folder. ``on_row`` is called with each
    row as soon as it is done. With ``out`` (and profiles read from files), finished rows are kept
    in ``OUT.partial.jsonl`` until ``out`` is written, and a rerun with the same model, profiles,
    tasks and settings reuses them (``on_resume(note, keys of the reused rows)`` says so); Ctrl-C
    then ends in one line saying where they are. ``novice_fit``: the novice rows' vectors, ``mean``
    (MoNE) or ``lsq`` (gate-weighted least squares, docs/methods.md)."""

    from .compare import DEFAULT_KEEPS, check_keeps, default_methods
    from .evaluate.options import check_device_and_dtype, check_run_options
    from .plan import parse_keep
    from .profile import Profile
    from .score import check_method

    # --- check everything before loading anything heavy ---------------------------------------------
    check_run_options(
        limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length
    )
    check_device_and_dtype(device, dtype)
    from .profile import NOVICE_FITS

    if novice_fit not in NOVICE_FITS:
        raise UserError(f"unknown --novice-fit '{novice_fit}'", f"use {' or '.join(NOVICE_FITS)}")
    methods = list(methods) if methods else default_methods()
    for m in methods:
        check_method(m)
    if len(set(methods)) != len(methods):
        raise UserError("a --method is given twice", "pass each method once")
    keep_values: list[int | float] = [parse_keep(str(k)) for k in keeps] if keeps else list(DEFAULT_KEEPS)
    check_keeps(keep_values, None)  # fractions' range and duplicates now; counts again once E is known
    from .evaluate.tasks import resolve_tasks

    task_list = resolve_tasks(list(tasks))
    paths = [p.path if isinstance(p, Profile) else os.fspath(p) for p in profiles]
    target = None
    if out is not None:  # checked now, locked for the whole run (docs/outputs.md)
        from .outputs import prepare_output

        reads = [model_input(model), *_file_inputs("profile", paths)]
        reads += _file_inputs("task file", [getattr(t, "source", None) for t in task_list])
        target = prepare_output(out, inputs=reads, force=force, kind="compare")
    with target if target is not None else contextlib.nullcontext() as tmp:
        rows, report, partial = _compare(
            model, profiles, paths, task_list, methods, keep_values, novice, tokenizer=tokenizer,
            limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
            seed=seed, device=device, dtype=dtype, progress=progress, on_row=on_row,
            out=Path(out) if out is not None else None, on_resume=on_resume, novice_fit=novice_fit,
        )  # fmt: skip
        if tmp is not None:
            from .compare import write_results

            write_results(tmp, rows, report)
    if partial is not None:  # --out is written: the finished rows kept for a resume are done with
        partial.remove()
    return rows, report


def _compare(
    model: Any,
    profiles: Sequence[Profile | PathLike],
    paths: list[Any],
    task_list: list[Any],
    methods: list[str],
    keep_values: list[int | float],
    novice: bool,
    *,
    tokenizer: Any,
    limit: int | None,
    batch_size: int,
    max_new_tokens: int,
    max_length: int,
    seed: int,
    device: str,
    dtype: str,
    progress: bool,
    on_row: Callable[[dict[str, Any]], None] | None,
    out: Path | None = None,
    on_resume: Callable[[str, set[str]], None] | None = None,
    novice_fit: str = "mean",
) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """:func:`compare` on checked arguments: (rows, report, the partial-rows file or None)."""
    import time

    from .compare import check_keeps
    from .evaluate.loading import resolve_device
    from .profile import Profile

    loaded = _is_loaded(model)
    name = model_source(model)
    resolved_device = str(next(model.parameters()).device) if loaded else resolve_device(device)
    profs = [p if isinstance(p, Profile) else load_profile(p) for p in profiles]
    names = _profile_names([Path(p or f"profile{i}") for i, p in enumerate(paths)])
    blocks = _check_profiles_model(name, profs)
    check_keeps(keep_values, int(blocks[0].num_experts))
    if novice:  # an old profile without the lsq novices: one line before the model is loaded
        for p in profs:
            p.novices(novice_fit)

    # --- load once, evaluate every variant -----------------------------------------------------------
    from .compare import compare as run_compare
    from .evaluate.loading import load_model_and_tokenizer

    started = time.time()
    partial = None
    if out is not None and all(p is not None for p in paths):
        from .compare import PartialRows, partial_path, run_identity

        settings = {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                    "max_length": max_length, "seed": seed, "device": resolved_device, "dtype": dtype,
                    "novice_fit": novice_fit}  # fmt: skip
        identity = run_identity(name, dict(zip(names, paths, strict=True)), task_list, settings)
        partial = PartialRows(partial_path(out), identity)
        if partial.note and on_resume is not None:
            on_resume(partial.note, set(partial.done))
    resumed = dict(partial.done) if partial is not None else {}

    def row_done(row: dict[str, Any]) -> None:
        if partial is not None:
            partial.add(row)
        if on_row is not None:
            on_row(row)

    if loaded:
        lm, tok = model, _tokenizer_of(model, tokenizer)
    else:
        lm, tok = load_model_and_tokenizer(name, device=resolved_device, dtype=dtype)
    try:
        rows = run_compare(
            lm,
            tok,
            profs,
            task_list,
            methods,
            keep_values,
            novice,
            profile_names=names,
            limit=limit,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            seed=seed,
            progress=progress,
            on_row=row_done,
            done=resumed,
            novice_fit=novice_fit,
        )
    except KeyboardInterrupt:
        if partial is None:
            raise
        raise partial.interrupted() from None
    report = {
        "model": name,
        "profiles": [{"name": n, "path": str(p)} for n, p in zip(names, paths, strict=True)],
        "tasks": {t.name: t.kind for t in task_list},
        "num_experts": int(blocks[0].num_experts),
        "top_k": int(blocks[0].top_k),
        "settings": {
            "methods": methods,
            "keeps": keep_values,
            "novice": novice,
            "novice_fit": novice_fit,
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_length": max_length,
            "seed": seed,
            "device": resolved_device,
            "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        },
        "seconds": round(time.time() - started, 3),
    }
    return rows, report, partial


def _profile_names(paths: list[Path]) -> list[str]:
    """Each profile's name: its file stem, or its path where stems repeat (or say "mixed")."""
    stems = [p.name.removesuffix(".safetensors").removesuffix(".profile") for p in paths]
    distinct = len(set(stems)) == len(stems) and "mixed" not in stems
    names = stems if distinct else [str(p) for p in paths]
    if len(set(names)) != len(names):
        raise UserError("the same profile is given twice", "pass each --profile once")
    return names


def _check_profiles_model(model: str, profiles: list[Profile]) -> list[Any]:
    """Every profile must come from this model (checked on the meta device, before loading weights);
    returns its MoE blocks."""
    from .arch import find_moe_blocks
    from .modelio import build_on_meta, load_config

    config = load_config(model)
    blocks = find_moe_blocks(build_on_meta(config))
    for prof in profiles:
        prof.check_model(config, model, blocks)
    return blocks


# --- report ---------------------------------------------------------------------------------------


def report(
    profiles: Sequence[Profile | PathLike],
    out: PathLike | None = None,
    *,
    method: str = "easyep",
    top: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Every number of the HTML report on how the domains of ``profiles`` (one per domain, same model)
    use the experts, as `moeprune report`; ``out`` also writes index.html and its plots there."""
    from .profile import Profile
    from .report import compute_report, write_report
    from .score import check_method

    check_method(method)
    if top is not None and top < 1:
        raise UserError(f"--top must be a positive number of experts, got {top}", "pass --top 1 or more")
    paths = [Path(p.path or f"profile{i}") if isinstance(p, Profile) else Path(p) for i, p in enumerate(profiles)]
    resolved = [p.expanduser().resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UserError("the same profile is given twice", "pass each profile once")
    target = None
    if out is not None:  # checked now, locked until written (docs/outputs.md)
        from .outputs import prepare_output

        given = [p.path if isinstance(p, Profile) else p for p in profiles]
        reads = _file_inputs("profile", given) + _profile_models(given)
        target = prepare_output(out, inputs=reads, force=force, kind="report")
    loaded = [p if isinstance(p, Profile) else load_profile(p) for p in profiles]
    stems = [p.name.removesuffix(".safetensors").removesuffix(".profile") for p in paths]
    names = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    if target is None:
        return compute_report(loaded, names, method, top)
    with target as tmp:
        rep = compute_report(loaded, names, method, top)
        write_report(tmp, rep)
    return rep


# --- pattern libraries (PreMoe TAER) --------------------------------------------------------------


def build_library(
    model: Any,
    tasks: dict[str, PathLike],
    keep: int | float | str,
    out: PathLike,
    *,
    method: str = "mone",
    self_generate: int = 0,
    max_length: int = 2048,
    max_samples: int | None = None,
    seed: int = 0,
    premoe_ka: int | None = None,
    profiles_dir: PathLike | None = None,
    dtype: str = "auto",
    device: str = "auto",
    force: bool = False,
    quiet: bool = True,
) -> Any:
    """Write a pattern library to the folder ``out``, as `moeprune library build`: each task's data
    is profiled (or its ``*.profile.safetensors`` taken), its kept experts planned and its retrieval
    keys stored; ``profiles_dir`` keeps the profiles made from data. Returns the
    :class:`~moeprune.library.Library`. A loaded model is profiled as it is. ``out`` is never the
    model, a task's file or around them; an existing one is replaced only with ``force`` and only
    if moeprune wrote it (docs/outputs.md)."""

    from .arch import find_moe_blocks
    from .data import check_max_length
    from .library import build_library as make_library
    from .modelio import build_on_meta, load_config, load_model, resolve_model_dir
    from .outputs import prepare_output
    from .plan import check_keep, parse_keep
    from .profile import Profile
    from .profiling import resolve_device, run_profile
    from .score import check_method

    # --- everything the user gave, checked before any work ----------------------------------------
    specs = {name: Path(src) for name, src in tasks.items()}
    check_method(method)
    keep_value = parse_keep(str(keep))
    check_max_length(max_length)
    if premoe_ka is not None and premoe_ka <= 0:
        raise UserError(f"--premoe-ka must be positive, got {premoe_ka}", "pass a number of experts >= 1")
    name = model_source(model)
    path = resolve_model_dir(name)
    reads = [("input model", path), *_file_inputs("task file", list(specs.values()))]
    # the library: checked now, locked for the whole run (docs/outputs.md); the profiles kept in
    # --profiles-dir are outputs too, checked now as well (the folder is made when first used)
    target = prepare_output(out, inputs=reads, force=force, kind="library")
    out = target.path
    keep_dir = None
    if profiles_dir is not None:
        keep_dir = _check_profiles_dir(Path(profiles_dir), specs, out, path, self_generate > 0, force)
    config = load_config(str(path))
    blocks = find_moe_blocks(build_on_meta(config))
    spec = blocks[0].spec
    check_keep(
        keep_value,
        blocks[0].num_experts,
        top_k=blocks[0].top_k,
        n_group=max(1, spec.n_group),
        topk_group=max(1, spec.topk_group),
        group_score=spec.group_score,
    )

    profiles: dict[str, Profile] = {}
    infos: dict[str, dict[str, Any]] = {}
    loaded = (model, _tokenizer_of(model, None)) if _is_loaded(model) else None
    from .identity import checkpoint_router_digest

    with target as tmp:
        work = tmp / ".profiles"  # profiles made from data and not kept: removed before the commit
        for task, src in specs.items():
            if src.name.endswith(".safetensors"):  # the task's profile
                prof = Profile.load(src)
                prof.check_model(config, name, router_sha256=checkpoint_router_digest(path, config))
                infos[task] = {"source": "profile", "profile": str(src.resolve())}
            else:
                if loaded is None:
                    if quiet:
                        from transformers.utils import logging as hf_logging

                        hf_logging.disable_progress_bar()
                    dev = resolve_device(device)
                    loaded = load_model(str(path), dtype=dtype, device=dev)
                if keep_dir is not None:
                    keep_dir.mkdir(parents=True, exist_ok=True)  # checked above; made when first used
                work.mkdir(exist_ok=True)
                prof_path = (keep_dir or work) / f"{task}.profile.safetensors"
                if not quiet:
                    print(f"== task {task}: profiling {src}", file=sys.stderr)
                run_profile(
                    model=name,
                    data=[str(src)],
                    out=prof_path,
                    force=force,
                    inputs=reads,
                    shown=None if keep_dir is not None else f"the profile of task {task}",
                    max_length=max_length,
                    max_samples=max_samples,
                    seed=seed,
                    self_generate=self_generate,
                    premoe_ka=premoe_ka,
                    quiet=quiet,
                    loaded=loaded,
                )
                prof = Profile.load(prof_path)
                infos[task] = {"source": "data", "data_path": str(src.resolve())}
                if keep_dir is not None:
                    infos[task]["profile"] = str(prof_path.resolve())
            profiles[task] = prof
        lib = make_library(
            profiles, model=str(path.resolve()), method=method, keep=keep_value, ka=premoe_ka, infos=infos
        )
        shutil.rmtree(work, ignore_errors=True)
        lib.write_into(tmp)
    lib.path = out
    return lib


def _check_profiles_dir(
    folder: Path, tasks: dict[str, Path], library: Path, model_dir: Path, demos: bool, force: bool
) -> Path:
    """``--profiles-dir``, checked as every output before any work: it may exist (other files stay)
    or is created; it is not the model's folder (a server would load the profiles as weights) nor
    the library's, nor inside them; a profile (or demos file) it already holds is replaced only with
    ``force`` and only if moeprune wrote it."""
    from .outputs import check_output
    from .profiling import demos_path

    inputs = [("input model", model_dir), ("library folder", library)]
    what = "--profiles-dir"
    # the folder itself: an existing one is fine whatever it holds (force/owned let it through)
    check_output(folder, inputs=inputs, folder=True, force=True, owned=lambda _: True, what=what, parents=True)
    for task, src in tasks.items():
        if src.name.endswith(".safetensors"):  # a given profile: nothing is written for it
            continue
        target = folder / f"{task}.profile.safetensors"
        for file in [target, demos_path(target)] if demos else [target]:
            check_output(file, inputs=inputs, force=force, folder=False, what=what, parents=True)
    return folder.expanduser()


def route(
    library: Any,
    queries: Sequence[str | tuple[str, str | None]],
    *,
    model: Any = None,
    key: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    inputs: Sequence[Any] = (),
    out: PathLike | None = None,
    force: bool = False,
) -> tuple[Any, list[Any]]:
    """Route each query to the nearest task of a pattern library (a folder or a loaded
    :class:`~moeprune.library.Library`), as `moeprune library route`. A query is a text or
    (text, expected task). ``model`` defaults to the library's own; ``key``: records, first or all
    (the library's default when None). Returns (library, one :class:`~moeprune.retrieval.Routed` per
    query). ``out`` also writes them as JSON, checked before any work: never the library, the model
    or a file read (``inputs``); an existing file replaced only with ``force``."""
    from .library import Library, check_key_kind
    from .profiling import resolve_device
    from .retrieval import route_query

    if key is not None:
        check_key_kind(key)
    lib = library if isinstance(library, Library) else Library.load(library)
    pairs = [(q, None) if isinstance(q, str) else (q[0], q[1]) for q in queries]
    key = key or lib.default_key
    name = model_source(model) if model is not None else lib.model
    target = None
    if out is not None:
        check_file_out(Path(out), "--output", "routes.json")
        reads = [("library", lib.path), model_input(name), *inputs]
        target = json_output(out, inputs=reads, force=force, owned=_is_routes_json)
    probe = _make_probe(lib, name, key, dtype, resolve_device(device))
    results = [route_query(lib, probe, text, key, label) for text, label in pairs]
    if target is not None:
        write_json(target, routes_json(lib, key, results))
    return lib, results


def routes_json(lib: Any, key: str, results: Sequence[Any]) -> dict[str, Any]:
    """What `library route --output` writes: the library, the key, each query's result and, with
    expected tasks, the routing accuracy."""
    data: dict[str, Any] = {"library": str(lib.path), "key": key, "results": [r.to_json() for r in results]}
    labelled = [r for r in results if r.label is not None]
    if labelled:
        data["accuracy"] = sum(bool(r.correct) for r in labelled) / len(labelled)
    return data


def _is_routes_json(path: Path) -> bool:
    """A JSON file of routing results (library route / generate write them): moeprune's own."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and set(data) >= {"library", "results"}


def _make_probe(lib: Any, model: str, key: str, dtype: str, device: str) -> Any:
    from .retrieval import FirstLayerProbe, FullModelProbe

    if key != "all":
        from .adaptive import AdaptiveMoE

        return FirstLayerProbe(AdaptiveMoE.from_library(model, lib, dtype=dtype, device=device))
    from .modelio import load_config, load_model

    lib.check_model(load_config(model), model)  # before loading any weight
    lm, tok = load_model(model, dtype=dtype, device=device)
    if tok is None:
        raise UserError(f"model '{model}' has no tokenizer", "save a tokenizer in the model directory")
    return FullModelProbe(lm, tok, lib.ka)

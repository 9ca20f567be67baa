"""The Python API: profile -> plan -> prune (-> evaluate), or all of it with :func:`oneshot`.

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

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .plan import Plan
    from .profile import Profile
    from .surgery import RewriteResult

PathLike = str | os.PathLike
MODES = ("remove", "novice")
# One-shot provenance (profile, recipe, demonstrations, evaluation) goes into this subfolder of the
# output: vLLM loads every *.safetensors of the top folder (a profile there breaks it); loaders never
# look into subfolders (docs/api.md).
PROVENANCE = "moeprune"


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


def _tokenizer_of(model: Any, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    from .modelio import resolve_model_dir

    try:
        return AutoTokenizer.from_pretrained(resolve_model_dir(model_source(model)), local_files_only=True)
    except (OSError, ValueError):
        raise UserError(
            f"cannot load the tokenizer of '{model_source(model)}'", "pass tokenizer=... as well"
        ) from None


def resolve_device(device: str) -> str:
    """cpu, cuda, cuda:N or auto -> a device (``cuda`` under torchrun -> this rank's GPU)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"device '{device}' requested but CUDA is not available", "use --device cpu or auto"
            )
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    elif device != "cpu":
        raise UserError(f"unknown device '{device}'", "use cpu, cuda, cuda:N or auto")
    return device


# --- profile --------------------------------------------------------------------------------------


def demos_path(out: Path) -> Path:
    """``<out stem>.demos.jsonl`` beside the profile (``x.profile.safetensors`` -> ``x.demos.jsonl``)."""
    name = out.name
    for suffix in (".safetensors", ".profile"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return out.with_name(name + ".demos.jsonl")


def check_profile_args(
    *,
    data: Sequence[PathLike],
    out: Path | None,
    max_length: int,
    batch_size: int,
    max_samples: int | None,
    self_generate: int,
    premoe_ka: int | None,
    offload: str,
) -> None:
    """Every check of :func:`profile`'s arguments that needs no model."""
    from .data import check_max_length

    if offload not in ("none", "sequential"):
        raise UserError(f"unknown --offload '{offload}'", "use none or sequential")
    if offload == "sequential" and self_generate > 0:
        raise UserError("--self-generate needs the whole model in memory", "drop --offload sequential")
    check_max_length(max_length)
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}", "pass a number >= 1")
    if self_generate < 0:
        raise UserError(f"--self-generate must be >= 0, got {self_generate}", "pass a number of new tokens")
    if premoe_ka is not None and premoe_ka <= 0:
        raise UserError(f"--premoe-ka must be positive, got {premoe_ka}", "pass a number of experts >= 1")
    if max_samples is not None and max_samples <= 0:
        raise UserError(f"--max-samples must be positive, got {max_samples}", "pass a number >= 1")
    if out is None:
        return
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory", "pass a file name, e.g. run.profile.safetensors")
    for d in data:
        if Path(d).expanduser().resolve() == out.expanduser().resolve():
            raise UserError(f"--out '{out}' is one of the data files", "pass another output path")


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
    per_sample: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    offload: str = "none",
    quiet: bool = True,
) -> Profile:
    """One calibration pass of ``model`` (a path, cached hub id or loaded model) over ``data``.

    Returns the :class:`~moeprune.profile.Profile`; with ``out`` it is also written there (and,
    with ``self_generate``, the model's answers beside it as ``<stem>.demos.jsonl``). A loaded model
    is used as it is (``dtype``/``device`` ignored); its tokenizer is loaded from its folder unless
    given."""
    data = [os.fspath(d) for d in data]
    out_path = Path(out) if out is not None else None
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
        quiet=quiet,
        loaded=loaded,
    )


def run_profile(
    *,
    model: str,
    data: list[str],
    out: Path | None,
    text_field: str | None = None,
    max_length: int = 2048,
    batch_size: int = 8,
    max_samples: int | None = None,
    seed: int = 0,
    self_generate: int = 0,
    premoe_ka: int | None = None,
    per_sample: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    offload: str = "none",
    quiet: bool = False,
    loaded: tuple[Any, Any] | None = None,
) -> Profile:
    """:func:`profile` on checked arguments; ``loaded`` = (model, tokenizer) already in memory
    (several profiles of one model without reloading it; ``model`` names it)."""
    import torch

    from .arch import find_moe_blocks
    from .calibrate import calibrate, dist_info, init_distributed, wants_distributed
    from .data import encode_prompt, load_records, pad_token_id, select_records, tokenize_records
    from .modelio import load_config, load_model, resolve_model_dir
    from .profile import Profile, atomic_write

    records, files = load_records(data, text_field)
    records = select_records(records, max_samples, seed)
    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.startswith("cuda") else "float32"
    started_dist = False
    if wants_distributed():
        started_dist = not torch.distributed.is_initialized()
        init_distributed(dev)
    info = dist_info()
    try:
        if quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        config = loaded[0].config if loaded is not None else load_config(model)
        if offload == "sequential":
            # Only the tokenizer and a meta-device skeleton now; layers are read one at a time later.
            from transformers import AutoTokenizer

            from .modelio import build_on_meta

            lm = None
            try:
                tok = AutoTokenizer.from_pretrained(resolve_model_dir(model), local_files_only=True)
            except (OSError, ValueError):
                tok = None
            blocks = find_moe_blocks(build_on_meta(config))
        else:
            if loaded is not None:
                lm, tok = loaded
            else:
                lm, tok = load_model(str(resolve_model_dir(model)), dtype=dtype, device=dev)
            blocks = find_moe_blocks(lm)
        if tok is None:
            raise UserError(f"model '{model}' has no tokenizer", "save a tokenizer in the model directory")
        n_experts = blocks[0].num_experts
        if premoe_ka is not None and premoe_ka > n_experts:
            raise UserError(
                f"--premoe-ka {premoe_ka} exceeds the {n_experts} experts per layer",
                f"pass at most {n_experts}",
            )
        pad = pad_token_id(tok)
        progress = not quiet
        demos: list[dict[str, Any]] | None = None
        if self_generate > 0:
            from .calibrate import self_generate as generate

            prompts = [encode_prompt(tok, r) for r in records]
            for r, p in zip(records, prompts, strict=True):
                if not p:
                    raise UserError(f"{r.where}: the prompt is empty", "drop the record or give it a prompt")
            answers = generate(
                lm, tok, prompts, self_generate, batch_size=batch_size, pad_id=pad, progress=progress
            )
            seqs = [(p + a)[:max_length] for p, a in zip(prompts, answers, strict=True)]
            demos = []
            for r, a in zip(records, answers, strict=True):
                text = tok.decode(a, skip_special_tokens=True)
                if r.messages is not None:
                    msgs = list(r.messages)
                    while msgs and msgs[-1].get("role") == "assistant":
                        msgs.pop()
                    demos.append({"messages": [*msgs, {"role": "assistant", "content": text}]})
                else:
                    demos.append({"prompt": r.prompt, "response": text})
        else:
            seqs, _kept = tokenize_records(tok, records, max_length)
        if lm is None:
            from .modelio import parse_dtype
            from .offload import calibrate_sequential

            tensors = calibrate_sequential(
                resolve_model_dir(model),
                seqs,
                batch_size=batch_size,
                pad_id=pad,
                premoe_ka=premoe_ka,
                per_sample=per_sample,
                progress=progress,
                dtype=parse_dtype(dtype),
                device=dev,
            )
        else:
            tensors = calibrate(
                lm,
                seqs,
                blocks=blocks,
                batch_size=batch_size,
                pad_id=pad,
                premoe_ka=premoe_ka,
                per_sample=per_sample,
                progress=progress,
            )
        settings = {
            "max_length": max_length,
            "max_samples": max_samples,
            "seed": seed,
            "self_generate": self_generate,
            "premoe_ka": int(tensors["premoe_idx"].shape[-1]),
            "text_field": text_field,
            "per_sample": per_sample,
            "batch_size": batch_size,
            "dtype": dtype,
            "world_size": info.world,
            "offload": offload,
        }
        prof = Profile.build(
            tensors,
            model=model,
            config=config,
            blocks=blocks,
            samples=len(seqs),
            data=[f.to_meta() for f in files],
            settings=settings,
        )
        if out is None or info.rank != 0:  # under torchrun, rank 0 writes
            return prof
        if demos is not None:
            lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in demos)
            atomic_write(demos_path(out), lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        try:
            prof.save(out)
        except BaseException:
            if demos is not None:
                demos_path(out).unlink(missing_ok=True)
            raise
        if not quiet:
            extra = f"; demonstrations in {demos_path(out)}" if demos is not None else ""
            print(f"wrote {out}: {prof.summary()}{extra}", file=sys.stderr)
        return prof
    finally:
        if started_dist and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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
) -> Plan:
    """Choose the experts every MoE layer keeps from one profile (or several of the same model:
    EASY-EP mixed-domain), as `moeprune plan`; ``out`` also writes the plan (JSON)."""
    from .plan import experts_to_keep, plan_from_profile, profile_routing
    from .profile import Profile
    from .score import combined_score, score

    keep_value, options = check_plan_args(
        method, keep, scope=scope, per_group=per_group, seed=seed, premoe_r=premoe_r, premoe_ka=premoe_ka
    )
    if out is not None:
        check_file_out(Path(out), "--out", "plan.json")

    # --- load, score, plan -------------------------------------------------------------------------
    given = [profiles] if isinstance(profiles, (Profile, str, os.PathLike)) else list(profiles)
    loaded = [p if isinstance(p, Profile) else load_profile(p) for p in given]
    meta = loaded[0].meta
    if len(loaded) == 1:
        scores = score(loaded[0], method, **options)
    else:
        scores = combined_score(loaded, method, **options)

    source = f"profile '{loaded[0].name}'"
    n_group = profile_routing(meta, source)["n_group"]
    experts_to_keep(keep_value, int(scores.shape[1]), n_group=n_group, per_group=per_group)  # clear error

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
    )
    if out is not None:
        result.save(out)
    return result


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
) -> RewriteResult:
    """Write the pruned checkpoint of ``plan`` to the folder ``out`` (streams; never loads the model).

    ``model`` is a checkpoint folder or cached hub id; a loaded model is accepted for its
    ``name_or_path`` (the rewrite reads the checkpoint on disk, not the weights in memory).
    ``profile``: the plan's profile (kept as profile-meta.json; ``mode="novice"`` needs it)."""
    from .checkpoint import parse_size
    from .modelio import load_config, resolve_model_dir
    from .plan import Plan
    from .profile import Profile
    from .surgery import check_output_dir, rewrite_checkpoint

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
    if isinstance(profile, Profile):
        profile_meta = profile.meta
    else:
        profile_meta = _profile_meta(Path(profile)) if profile is not None else None
    out = Path(out)
    check_output_dir(src, out, force)
    config = load_config(str(src))
    check_plan_matches(the_plan, config)
    novices = None
    if mode == "novice" and profile is not None:
        novices = _novice_vectors(profile, the_plan, config, name)

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
    )


def _novice_vectors(profile: Profile | PathLike, plan: Plan, config: Any, model: str) -> dict[int, Any]:
    """Each layer's novice vectors [R, H] (mean expert outputs, ascending replaced ids) from the profile."""
    from .profile import Profile

    prof = profile if isinstance(profile, Profile) else Profile.load(profile)
    prof.check_model(config, model)
    mean = prof["mone_mean"]
    out: dict[int, Any] = {}
    for layer, ids in plan.replaced.items():
        if layer not in prof.layers:
            raise UserError(
                f"profile '{prof.name}' has no statistics for MoE layer {layer}",
                "pass the profile the plan was made from",
            )
        out[layer] = mean[prof.layers.index(layer), ids].float()
    return out


def check_plan_matches(plan: Plan, config: Any) -> None:
    """Error unless the plan was made for this model (type, fingerprint, expert count, MoE layers)."""
    from .arch import find_moe_blocks
    from .modelio import build_on_meta
    from .profile import fingerprint_fields, model_fingerprint

    text = config.get_text_config()
    types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    if plan.model_type and plan.model_type not in types:
        raise UserError(
            f"this plan was made for a '{plan.model_type}' model, not '{config.model_type}'",
            "make a plan from a profile of this model",
        )
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
    dtype: str = "float32",
    max_new_tokens: int = 24,
    max_length: int = 1024,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (a path, cached hub id or loaded model) on moeprune tasks (as
    ``moeprune eval --task``: PATH, NAME=PATH, kind:PATH, testbed[:NAME]) and lm-eval task names.

    Returns the report `moeprune eval --output` writes: model, settings, versions, seconds, tasks."""
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
    if lm_eval_tasks:
        from .evaluate.lm_eval_bridge import run_lm_eval

        results["tasks"].update(
            run_lm_eval(
                lm,
                tok,
                lm_eval_tasks,
                include_path=include,
                limit=limit,
                batch_size=batch_size,
                task_manager=lm_eval_manager,
            )
        )
    return {
        "model": name,
        "model_path": str(model_path.resolve()),
        "settings": {
            **results["settings"],
            "device": resolved_device,
            "dtype": dtype if not loaded else str(next(lm.parameters()).dtype).removeprefix("torch."),
            "lm_eval": lm_eval_tasks or None,
            "lm_eval_include": str(Path(include).resolve()) if include else None,
        },
        "versions": _versions(),
        "seconds": round(time.time() - started, 3),
        "tasks": results["tasks"],
    }


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {"moeprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def evaluate_pair(model: Any, pruned: Path, tasks: list[Any], limit: int | None) -> dict[str, Any]:
    """Evaluate the full model, then the pruned one, on the same tasks (one model in memory at a time;
    a loaded full model is used as it is)."""
    import gc

    from .evaluate.loading import load_model_and_tokenizer, resolve_device
    from .evaluate.runners import evaluate as run_tasks

    device = str(next(model.parameters()).device) if _is_loaded(model) else resolve_device("auto")
    results: dict[str, Any] = {}
    for which, path in (("full", model), ("pruned", str(pruned))):
        if _is_loaded(path):
            lm, tok = path, _tokenizer_of(path, None)
        else:
            lm, tok = load_model_and_tokenizer(path, device=device, dtype="float32")
        results[which] = run_tasks(lm, tok, tasks, limit=limit, progress=False)["tasks"]
        del lm, tok
        gc.collect()
    return {
        "model": model_source(model),
        "limit": limit,
        "device": device,
        "full": results["full"],
        "pruned": results["pruned"],
    }


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
    from .oneshot import OneShot

    s = OneShot(
        model=model_source(model),
        data=[os.fspath(d) for d in data],
        method=method,
        keep=str(keep),
        out=os.fspath(out),
        **settings,
    )
    return run_oneshot(s, quiet=quiet, loaded=model if _is_loaded(model) else None)


@dataclass
class OneShotResult:
    """What :func:`oneshot` made: the output folder, the profile, the plan, the rewrite's summary and,
    with ``eval``, the full-vs-pruned report (``eval.json``)."""

    out: Path
    profile: Profile
    plan: Plan
    rewrite: RewriteResult
    eval: dict[str, Any] | None = None
    seconds: float = 0.0


def run_oneshot(s: Any, *, quiet: bool = False, loaded: Any = None) -> OneShotResult:
    """:func:`oneshot` from a :class:`~moeprune.oneshot.OneShot` (a recipe); ``loaded``: the model
    ``s.model`` names, already in memory."""
    import time

    import yaml

    from .evaluate.tasks import resolve_tasks
    from .modelio import resolve_model_dir
    from .oneshot import check_settings, eval_section, recipe_dict
    from .outputs import json_safe
    from .score import OPTIONS
    from .surgery import _replace_dir, check_output_dir

    start = time.perf_counter()
    check_settings(s)
    src = resolve_model_dir(s.model)
    out = Path(s.out).expanduser()
    check_output_dir(src, out, s.force)
    tasks = resolve_tasks(list(s.eval)) if s.eval else []

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.moeprune-", dir=out.resolve().parent))
    try:
        work = tmp / "work"
        work.mkdir()
        profile_path = work / "profile.safetensors"
        plan_path = work / "plan.json"
        model_dir = tmp / "model"
        _say(quiet, "== profile")
        prof = run_profile(
            model=s.model,
            data=list(s.data),
            out=profile_path,
            max_length=s.max_length,
            seed=s.seed,
            self_generate=s.self_generate,
            quiet=quiet,
            loaded=None if loaded is None else (loaded, _tokenizer_of(loaded, None)),
        )
        _say(quiet, "== plan")
        the_plan = plan(
            profile_path,
            s.method,
            s.keep,
            scope=s.scope,
            top_k=s.top_k,
            seed=s.seed if "seed" in OPTIONS.get(s.method, ()) else None,
        )
        # name the profile by where it ends up, not the temporary folder
        for entry in (the_plan.settings or {}).get("profiles") or []:
            entry["path"] = str(out.resolve() / PROVENANCE / "profile.safetensors")
        the_plan.save(plan_path)
        _say(quiet, "== prune")
        rewrite = prune(
            s.model, plan_path, model_dir, mode=s.mode, pad_uniform=s.pad_uniform, profile=profile_path
        )
        keep_dir = model_dir / PROVENANCE
        keep_dir.mkdir()
        shutil.copy2(profile_path, keep_dir / "profile.safetensors")
        shutil.copy2(plan_path, model_dir / "plan.json")
        report = None
        demos = demos_path(profile_path)
        if demos.is_file():
            shutil.copy2(demos, keep_dir / "demos.jsonl")
        if tasks:
            _say(quiet, "== evaluate full and pruned")
            report = evaluate_pair(loaded if loaded is not None else s.model, model_dir, tasks, s.eval_limit)
            (keep_dir / "eval.json").write_text(json.dumps(json_safe(report), indent=2) + "\n", encoding="utf-8")
            card = model_dir / "README.md"
            card.write_text(card.read_text(encoding="utf-8") + "\n" + eval_section(report), encoding="utf-8")
        (keep_dir / "recipe.yaml").write_text(
            "# moeprune recipe of this run: `moeprune run recipe.yaml` makes it again\n"
            + yaml.safe_dump(recipe_dict(s), sort_keys=False),
            encoding="utf-8",
        )
        _replace_dir(model_dir, out.resolve())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OneShotResult(out, prof, the_plan, rewrite, report, time.perf_counter() - start)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr)

"""One calibration pass of a model over data files -> a :class:`~moeprune.profile.Profile`
(:func:`moeprune.api.profile` and `moeprune profile`): reading the records, loading the model (or
reading it layer by layer), optional self-generation, and writing the profile with its demos."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .device import check_dtype, resolve_device, resolve_dtype
from .errors import UserError

if TYPE_CHECKING:
    from .profile import Profile


def demos_path(out: Path) -> Path:
    """``<out stem>.demos.jsonl`` beside the profile (``x.profile.safetensors`` -> ``x.demos.jsonl``)."""
    name = out.name
    for suffix in (".safetensors", ".profile"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return out.with_name(name + ".demos.jsonl")


def check_profile_args(
    *,
    data: Sequence[str | os.PathLike],
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
    per_sample: bool | None = None,
    dtype: str = "auto",
    device: str = "auto",
    offload: str = "none",
    quiet: bool = False,
    loaded: tuple[Any, Any] | None = None,
    premoe_exact: bool = False,
    force: bool = False,
    inputs: Sequence[Any] = (),
    shown: str | None = None,
) -> Profile:
    """:func:`profile` on checked arguments; ``loaded`` = (model, tokenizer) already in memory
    (several profiles of one model without reloading it; ``model`` names it).

    ``out`` (and its demos file) is checked before any work and locked for the whole run
    (:mod:`moeprune.outputs`: never one of ``inputs``, replaced only with ``force``); ``shown`` is
    what the summary line names instead of ``out`` (when ``out`` is temporary; the caller then
    names the demos file itself)."""
    with contextlib.ExitStack() as stack:
        writing = out is not None and int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun rank 0 writes
        targets = _profile_outputs(out, self_generate, force, inputs) if writing else []
        tmps = [stack.enter_context(t) for t in targets]  # lock now: a second run fails at once
        prof, demos = _run_profile(
            model=model,
            data=data,
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
            premoe_exact=premoe_exact,
        )
        if not tmps or out is None:
            return prof
        prof.save(tmps[0])
        if demos is not None:
            lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in demos)
            Path(tmps[1]).write_text(lines, encoding="utf-8")
    prof.path = str(out)
    if not quiet:
        extra = f"; demonstrations in {demos_path(out)}" if demos is not None and shown is None else ""
        print(f"wrote {shown or out}: {prof.summary()}{extra}", file=sys.stderr)
    return prof


def _profile_outputs(out: Path, self_generate: int, force: bool, inputs: Sequence[Any]) -> list[Any]:
    """The profile file and, with self-generation, its demos file: checked now, written at the end."""
    from .outputs import is_moeprune_file, prepare_output

    # the profile's folder is created as before (runs/x.profile.safetensors); a file in its way is an error
    targets = [
        prepare_output(out, inputs=inputs, force=force, folder=False, kind="profile", what="--out", parents=True)
    ]
    if self_generate > 0:  # the demos of a profile moeprune wrote are moeprune's too
        demos = demos_path(out)
        for item in inputs:
            path = item[1] if isinstance(item, tuple) else item
            if path is not None and Path(path).expanduser().resolve() == demos.expanduser().resolve():
                # the user named only --out: say that the answers go beside it, into their data file
                raise UserError(
                    f"with --self-generate the model's answers are written to '{demos}' (beside --out "
                    f"'{out}'), which is the data file being read",
                    f"pass another --out, e.g. '{out.with_name('run2.profile.safetensors')}', or copy the data file",
                )

        def owned(_: Path) -> bool:
            return not out.exists() or is_moeprune_file(out)

        targets.append(
            prepare_output(
                demos_path(out), inputs=inputs, force=force, folder=False, owned=owned, what="--out", parents=True
            )
        )
    return targets


def _run_profile(
    *,
    model: str,
    data: list[str],
    text_field: str | None,
    max_length: int,
    batch_size: int,
    max_samples: int | None,
    seed: int,
    self_generate: int,
    premoe_ka: int | None,
    per_sample: bool | None,
    dtype: str,
    device: str,
    offload: str,
    quiet: bool,
    loaded: tuple[Any, Any] | None,
    premoe_exact: bool = False,
) -> tuple[Profile, list[dict[str, Any]] | None]:
    """The calibration pass: the profile and (with self-generation) the demonstrations."""
    from .modelio import gc_paused, load_config, load_model, resolve_model_dir

    with gc_paused():  # torch and transformers: ~200k long-lived objects, no full collections among them
        import torch

        from .arch import find_moe_blocks
        from .calibrate import calibrate, dist_info, init_distributed, wants_distributed
        from .data import (
            MAX_CHARS_PER_TOKEN,
            encode_prompt,
            load_records,
            pad_token_id,
            select_records,
            tokenize_records,
        )
        from .profile import Profile

    records, files = load_records(data, text_field)
    records = select_records(records, max_samples, seed)
    dev = resolve_device(device)
    check_dtype(dtype)  # a bad name fails before anything loads; `auto` is resolved with the config
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
        dtype = resolve_dtype(dtype, dev, config)
        if offload == "sequential":
            # Only the tokenizer and a meta-device skeleton now; layers are read one at a time later.
            from .modelio import build_on_meta, load_tokenizer

            lm = None
            try:
                tok = load_tokenizer(resolve_model_dir(model))
            except (OSError, ValueError):
                tok = None
            blocks = find_moe_blocks(build_on_meta(config))
        else:
            if loaded is not None:
                lm, tok = loaded
            else:
                lm, tok = load_model(str(resolve_model_dir(model)), dtype=dtype, device=dev)
            blocks = find_moe_blocks(lm)
            # the dtype the statistics were computed in (a model passed in loaded keeps its own)
            dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
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

            # cut by characters, then tokens, as calibration records are: a huge prompt line costs
            # memory in proportion to max_length (tokens past it would be cut from the sequence)
            cap = max_length * MAX_CHARS_PER_TOKEN
            prompts = [encode_prompt(tok, r, max_chars=cap)[:max_length] for r in records]
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
        from .calibrate import wants_per_sample

        # None: per-sample statistics (few-shot stability in `report`) unless they would be large
        per_sample, note = wants_per_sample(per_sample, len(seqs), len(blocks), blocks[0].num_experts)
        if note and not quiet and info.rank == 0:
            print(f"moeprune: {note}", file=sys.stderr)
        quantized = _quantization_note(config, lm, offload)
        if quantized and not quiet and info.rank == 0:
            print(f"moeprune: {quantized}", file=sys.stderr)
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
                premoe_exact=premoe_exact,
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
                premoe_exact=premoe_exact,
            )
        settings = {
            "max_length": max_length,
            "max_samples": max_samples,
            "seed": seed,
            "self_generate": self_generate,
            "premoe_ka": int(tensors["premoe_ka"].item()),
            "premoe_exact": premoe_exact,
            "text_field": text_field,
            "per_sample": per_sample,
            "batch_size": batch_size,
            "dtype": dtype,
            "world_size": info.world,
            "offload": offload,
        }
        from .identity import checkpoint_router_digest, model_router_digest

        if lm is not None:
            router = model_router_digest(lm, blocks)
        else:
            router = checkpoint_router_digest(resolve_model_dir(model), config)
        prof = Profile.build(
            tensors,
            router_sha256=router,
            model=model,
            config=config,
            blocks=blocks,
            samples=len(seqs),
            data=[f.to_meta() for f in files],
            settings=settings,
        )
        return prof, demos
    finally:
        if started_dist and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _quantization_note(config: Any, lm: Any, offload: str) -> str | None:
    """How a quantized checkpoint is computed with (kept quantized or dequantized, and where)."""
    from .quant import quant_format

    fmt = quant_format(config)
    if fmt is None:
        return None
    if offload == "sequential":
        return (
            f"{fmt.label}: routed experts kept as stored and dequantized one expert at a time, "
            "other weights dequantized layer by layer"
        )
    return getattr(lm, "moeprune_quantization", None) or fmt.label

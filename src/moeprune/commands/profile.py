"""`moeprune profile MODEL --data FILE... --out P.profile.safetensors` and
`moeprune profile merge A B ... --out C`: one calibration pass -> a reusable expert profile.

``profile`` is a group whose default command is ``create``: a first argument that is not a
sub-command name is the MODEL of ``create`` (``moeprune profile create MODEL`` works too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from ..cli import app
from ..errors import UserError


class _DefaultCreateGroup(TyperGroup):
    """A group that runs ``create`` when the first argument is not one of its commands."""

    default_command = "create"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


profile_app = typer.Typer(
    cls=_DefaultCreateGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help=(
        "Measure expert usage on calibration data and write a profile.\n\n"
        "Calibrate: moeprune profile MODEL --data FILE... --out P.profile.safetensors\n\n"
        "Merge: moeprune profile merge A B ... --out C.profile.safetensors\n\n"
        "`moeprune profile MODEL --help` lists the calibration options."
    ),
)
app.add_typer(profile_app, name="profile")


def demos_path(out: Path) -> Path:
    """``<out stem>.demos.jsonl`` beside the profile (``x.profile.safetensors`` -> ``x.demos.jsonl``)."""
    name = out.name
    for suffix in (".safetensors", ".profile"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return out.with_name(name + ".demos.jsonl")


def _check_out(out: Path, data: list[str]) -> None:
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory", "pass a file name, e.g. run.profile.safetensors")
    for d in data:
        if Path(d).expanduser().resolve() == out.expanduser().resolve():
            raise UserError(f"--out '{out}' is one of the data files", "pass another output path")


def _resolve_device(device: str) -> str:
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


@profile_app.command("create")
def create(
    model: str = typer.Argument(..., help="Local model directory or a hub id present in the local cache."),
    data: list[str] = typer.Option(
        ..., "--data", help="Calibration data: .jsonl, .txt, .parquet, .arrow, .json, .csv (repeatable)."
    ),
    out: Path = typer.Option(..., "--out", help="Output profile, e.g. math.profile.safetensors."),
    text_field: str | None = typer.Option(
        None,
        "--text-field",
        help="Field holding the text (default: text, else prompt/response, else messages).",
    ),
    max_length: int = typer.Option(2048, "--max-length", help="Truncate each record to this many tokens."),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Records per forward (results do not depend on it)."
    ),
    max_samples: int | None = typer.Option(
        None, "--max-samples", help="Use a seeded random subset of this many records."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the --max-samples subset."),
    self_generate: int = typer.Option(
        0,
        "--self-generate",
        help="Let the model answer each prompt greedily (up to N new tokens) and calibrate on prompt + its own answer.",
    ),
    premoe_ka: int | None = typer.Option(
        None, "--premoe-ka", help="PreMoe candidate experts kept per token (default: the model's top-k)."
    ),
    per_sample: bool = typer.Option(
        False, "--per-sample", help="Also store each sample's gate sums (sample_gate)."
    ),
    premoe_exact: bool = typer.Option(
        False,
        "--premoe-exact",
        help="Also keep PreMoe's per-token entries (the file grows with the tokens; lets plan lower --premoe-ka).",
    ),
    dtype: str = typer.Option(
        "auto", "--dtype", help="float32, bfloat16, float16 or auto (bfloat16 on CUDA, float32 on CPU)."
    ),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    offload: str = typer.Option(
        "none",
        "--offload",
        help="none: load the whole model; sequential: read one decoder layer at a time from the "
        "safetensors files (models larger than memory).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Run one calibration pass of MODEL over the data and write the expert profile."""
    if offload not in ("none", "sequential"):
        raise UserError(f"unknown --offload '{offload}'", "use none or sequential")
    if offload == "sequential" and self_generate > 0:
        raise UserError("--self-generate needs the whole model in memory", "drop --offload sequential")
    from ..data import check_max_length

    check_max_length(max_length)
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}", "pass a number >= 1")
    if self_generate < 0:
        raise UserError(f"--self-generate must be >= 0, got {self_generate}", "pass a number of new tokens")
    if premoe_ka is not None and premoe_ka <= 0:
        raise UserError(f"--premoe-ka must be positive, got {premoe_ka}", "pass a number of experts >= 1")
    if max_samples is not None and max_samples <= 0:
        raise UserError(f"--max-samples must be positive, got {max_samples}", "pass a number >= 1")
    _check_out(out, data)
    run_profile(
        model=model,
        data=data,
        out=out,
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
        premoe_exact=premoe_exact,
    )


def run_profile(
    *,
    model: str,
    data: list[str],
    out: Path,
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
    premoe_exact: bool = False,
) -> None:
    """What `moeprune profile MODEL ...` does (usable from Python). ``loaded`` = (model, tokenizer)
    already in memory (several profiles of one model without reloading it)."""
    import torch

    from ..arch import find_moe_blocks
    from ..calibrate import calibrate, dist_info, init_distributed, wants_distributed
    from ..data import encode_prompt, load_records, pad_token_id, select_records, tokenize_records
    from ..modelio import load_config, load_model, resolve_model_dir
    from ..profile import Profile, atomic_write

    records, files = load_records(data, text_field)
    records = select_records(records, max_samples, seed)
    dev = _resolve_device(device)
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
        config = load_config(model)
        if offload == "sequential":
            # Only the tokenizer and a meta-device skeleton now; layers are read one at a time later.
            from transformers import AutoTokenizer

            from ..modelio import build_on_meta

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
            from ..calibrate import self_generate as generate

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
            from ..modelio import parse_dtype
            from ..offload import calibrate_sequential

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
        if info.rank != 0:
            return
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
        prof = Profile.build(
            tensors,
            model=model,
            config=config,
            blocks=blocks,
            samples=len(seqs),
            data=[f.to_meta() for f in files],
            settings=settings,
        )
        if demos is not None:
            lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in demos)
            dpath = demos_path(out)
            atomic_write(dpath, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        try:
            prof.save(out)
        except BaseException:
            if demos is not None:
                demos_path(out).unlink(missing_ok=True)
            raise
        if not quiet:
            import sys

            extra = f"; demonstrations in {demos_path(out)}" if demos is not None else ""
            print(f"wrote {out}: {prof.summary()}{extra}", file=sys.stderr)
    finally:
        if started_dist and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@profile_app.command("merge")
def merge(
    profiles: list[Path] = typer.Argument(..., help="Profiles of the same model (two or more)."),
    out: Path = typer.Option(..., "--out", help="Output profile."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary."),
) -> None:
    """Merge profiles of the same model: the result is the profile of the union of their data."""
    from ..profile import Profile

    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory", "pass a file name, e.g. all.profile.safetensors")
    loaded = [Profile.load(p) for p in profiles]
    merged = Profile.merge(loaded)
    merged.save(out)
    if not quiet:
        import sys

        print(f"wrote {out}: {merged.summary()}", file=sys.stderr)

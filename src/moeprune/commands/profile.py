"""`moeprune profile MODEL --data FILE... --out P.profile.safetensors` and
`moeprune profile merge A B ... --out C`: one calibration pass -> a reusable expert profile.

``profile`` is a group whose default command is ``create``: a first argument that is not a
sub-command name is the MODEL of ``create`` (``moeprune profile create MODEL`` works too).
"""

from __future__ import annotations

from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from ..cli import app
from ..errors import UserError
from .options import bandwidth_option, device_option, dry_run_json_option, dtype_option


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


@profile_app.command("create")
def create(
    model: str = typer.Argument(..., help="Local model directory or a hub id present in the local cache."),
    data: list[str] | None = typer.Option(
        None, "--data", help="Calibration data: .jsonl, .txt, .parquet, .arrow, .json, .csv (repeatable)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output profile, e.g. math.profile.safetensors (not needed with --dry-run)."
    ),
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
    per_sample: bool | None = typer.Option(
        None,
        "--per-sample/--no-per-sample",
        help="Store each sample's gate sums (sample_gate, for few-shot stability in `moeprune report`); "
        "default: while they take at most 64 MiB.",
        show_default=False,
    ),
    premoe_exact: bool = typer.Option(
        False,
        "--premoe-exact",
        help="Also keep PreMoe's per-token entries (the file grows with the tokens; lets plan lower --premoe-ka).",
    ),
    dtype: str = dtype_option(),
    device: str = device_option(),
    offload: str = typer.Option(
        "none",
        "--offload",
        help="none: load the whole model; sequential: read one decoder layer at a time from the "
        "safetensors files (models larger than memory).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing profile that moeprune wrote."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Run nothing: print the profile's size, the bytes read, the peak memory and the time to read "
        "the weights, from the config and shard headers alone (--data optional: without it, --max-samples "
        "records, default 128, of --max-length tokens are assumed).",
    ),
    as_json: bool = dry_run_json_option(),
    bandwidth: str | None = bandwidth_option(),
) -> None:
    """Run one calibration pass of MODEL over the data and write the expert profile."""
    from ..api import profile

    if dry_run:
        from ..api import estimate_profile
        from .dryrun import print_profile_estimate

        est = estimate_profile(
            model,
            data or [],
            text_field=text_field,
            max_length=max_length,
            batch_size=batch_size,
            max_samples=max_samples,
            seed=seed,
            premoe_ka=premoe_ka,
            per_sample=per_sample,
            dtype=dtype,
            device=device,
            offload=offload,
            premoe_exact=premoe_exact,
            bandwidth=bandwidth,
        )
        print_profile_estimate(est, as_json)
        return
    if as_json or bandwidth is not None:
        raise UserError(
            "--json and --bandwidth only apply with --dry-run", "add --dry-run, or leave them out"
        )
    if not data:
        raise UserError(
            "no calibration data given", "pass --data FILE (or --dry-run to see the plan without running)"
        )
    if out is None:
        raise UserError(
            "no output profile given",
            "pass --out P.profile.safetensors (or --dry-run to see the plan without running)",
        )

    from .. import cli, modelio

    if cli.OWNS_PROCESS and offload == "none":  # one model, kept until the process exits
        modelio.FREEZE_AFTER_PAUSE = True
    profile(
        model,
        data,
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
        force=force,
        quiet=quiet,
        premoe_exact=premoe_exact,
    )


@profile_app.command("merge")
def merge(
    profiles: list[Path] = typer.Argument(..., help="Profiles of the same model (two or more)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output profile."),
    force: bool = typer.Option(False, "--force", help="Replace an existing profile that moeprune wrote."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary."),
) -> None:
    """Merge profiles of the same model: the result is the profile of the union of their data."""
    from ..outputs import prepare_output
    from ..profile import Profile

    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory", "pass a file name, e.g. all.profile.safetensors")
    inputs = [("input profile", p) for p in profiles]
    target = prepare_output(out, inputs=inputs, force=force, folder=False, kind="profile")
    loaded = [Profile.load(p) for p in profiles]
    merged = Profile.merge(loaded)
    with target as tmp:
        merged.save(tmp)
    merged.path = str(out)
    if not quiet:
        import sys

        print(f"wrote {out}: {merged.summary()}", file=sys.stderr)

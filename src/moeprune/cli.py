"""The `moeprune` command line.

Each sub-command lives in its own module under :mod:`moeprune.commands` and registers itself on
:data:`app`. Heavy imports (torch, transformers) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import importlib
import os
import sys

try:
    import typer

    from .errors import UserError
    from .outputs import received_signal
except KeyboardInterrupt:  # Ctrl-C while Python imports the CLI: one line, no traceback
    print("moeprune: error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

app = typer.Typer(
    name="moeprune",
    help="Measure which experts a domain uses and write a smaller Mixture-of-Experts model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Measure which experts a domain uses and write a smaller Mixture-of-Experts model."""


# Modules that register commands on `app`, in the order they appear in --help.
COMMAND_MODULES = [
    "inspect",
    "eval",
    "profile",
    "plan",
    "prune",
    "run",
    "compare",
    "report",
    "library",
    "generate",
    "testbed",
]


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"moeprune.commands.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != f"moeprune.commands.{name}":
                raise


def error_line(message: str) -> None:
    """Print one error line to stderr (never a traceback)."""
    print(f"moeprune: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _register_commands()  # imports: a Ctrl-C here is an interrupt like any other
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int) and result == 130:  # typer turns Ctrl-C into a return value
            return _interrupted(None)
    except UserError as exc:
        error_line(exc.line())
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        error_line("aborted")
        return 130
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP while an output is written
        return _interrupted(exc)
    except typer.TyperException as exc:  # usage errors: click's own message, exit code 2
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(exc, "exit_code", 2))
    return 0


def _interrupted(exc: BaseException | None) -> int:
    signum = getattr(exc, "signum", None) or received_signal()
    error_line(f"{'terminated' if signum else 'interrupted'}; nothing was written")
    return 128 + signum if signum else 130


def run() -> None:
    try:
        code = main()
    except KeyboardInterrupt as exc:  # between the imports and main's own handler
        code = _interrupted(exc)
    sys.exit(code)


if __name__ == "__main__":
    run()

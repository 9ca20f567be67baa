"""The `moeprune` command line.

Each sub-command lives in its own module under :mod:`moeprune.commands` and registers itself on
:data:`app`. Heavy imports (torch, transformers) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

try:
    import typer

    from .errors import UserError
    from .outputs import received_signal
except KeyboardInterrupt:  # Ctrl-C while Python imports the CLI: one line, no traceback
    exec("pass", {})  # noqa: S102 - see _forget_interrupt (cannot be imported yet)
    print("moeprune: error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

app = typer.Typer(
    name="moeprune",
    help="Measure which experts a domain uses and write a smaller Mixture-of-Experts model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_lines() -> list[str]:
    """moeprune's version, then torch's and transformers' (read from the installed metadata: no
    import, so `moeprune --version` is instant)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    python = ".".join(str(n) for n in sys.version_info[:3])
    return [f"moeprune {__version__}", f"{installed('torch')}, {installed('transformers')}, python {python}"]


def _print_version(value: bool) -> None:
    if value:
        print("\n".join(version_lines()))
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        "-V",
        is_eager=True,
        expose_value=False,
        callback=_print_version,
        help="Print the versions of moeprune, torch and transformers and exit.",
    ),
) -> None:
    """Measure which experts a domain uses and write a smaller Mixture-of-Experts model."""


def _flags_show_no_type() -> None:
    """typer's rich --help prints a type after every flag (`--force <bool>`, `--help <bool>`), as if
    the flag took a value; a flag takes none, so show nothing there (as click's plain help does)."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "_moeprune", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        if self.is_flag or self.count:
            return None
        return shown(self, ctx)  # type: ignore[arg-type]

    display_type_rich._moeprune = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()


# Modules that register commands on `app`, in the order they appear in --help.
COMMAND_MODULES = [
    "inspect",
    "eval",
    "profile",
    "plan",
    "prune",
    "export",
    "run",
    "compare",
    "search",
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
    old_handler = _note_sigints()
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
    except Exception:
        if _SIGINTS:  # a library turned the Ctrl-C into its own error (transformers' lazy imports)
            return _interrupted(None)
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    return 0


_SIGINTS: list[int] = []


def _count_sigint(signum: int, frame: object) -> None:
    _SIGINTS.append(signum)
    raise KeyboardInterrupt


def _note_sigints() -> object | None:
    """Ctrl-C raises KeyboardInterrupt as usual, and is noted: an import that catches it and
    raises another error must still end as an interrupt. Returns the handler to restore (None
    when SIGINT is not Python's default, e.g. ignored, or off the main thread)."""
    _SIGINTS.clear()
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    return signal.signal(signal.SIGINT, _count_sigint)


def _forget_interrupt() -> None:
    """Make the handled Ctrl-C stay handled. CPython notes a KeyboardInterrupt that escapes an
    ``exec``/``eval`` of a string (dataclasses, namedtuples and many imports run one) and, under
    ``python -m``, kills the process with SIGINT at exit whatever the exit code (status -2, not
    130). Each string exec clears that note first, so a harmless one forgets it."""
    exec("pass", {})  # noqa: S102 - a constant string


def _interrupted(exc: BaseException | None) -> int:
    _forget_interrupt()
    signum = getattr(exc, "signum", None) or received_signal()
    error_line(f"{'terminated' if signum else 'interrupted'}; nothing was written")
    return 128 + signum if signum else 130


# True under the console entry point (:func:`run`): the process ends with the command, so a command
# may keep what it allocates until exit (`profile` freezes its imports and model: modelio.gc_paused).
OWNS_PROCESS = False


def run() -> None:
    global OWNS_PROCESS
    OWNS_PROCESS = True
    try:
        code = main()
    except KeyboardInterrupt as exc:  # between the imports and main's own handler
        code = _interrupted(exc)
    # The process ends here: every object lives until exit, and the interpreter's last collections
    # would walk them all (~0.6 s with torch and transformers imported). Frozen, they are skipped;
    # outputs are written and closed by now, and atexit handlers still run.
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()

"""Every output moeprune writes (a folder or a file) goes through here, so that none can lose data.

The policy (docs/outputs.md):

- An output never is, contains or sits inside one of the command's inputs (symlinks resolved).
- A new output, or an empty folder, is written freely. An existing one is replaced only with
  ``--force``, and only if moeprune wrote it: a folder carries a :data:`MARKER` file, a file is
  one of moeprune's own formats (a JSON or safetensors file whose ``format`` starts with
  ``moeprune``, or a caller's ``owned`` test).
- Everything is checked before any work starts, writability included (a probe is created and
  removed in the output's folder).
- Writing happens in a temporary sibling named ``.<name>.moeprune-tmp-<host>-<pid>-<random>``;
  only a complete output is put in place, in one step (Linux ``renameat2(RENAME_EXCHANGE)``
  swaps a replaced folder atomically; elsewhere the two renames run with SIGINT/SIGTERM held).
  On any error, Ctrl-C, SIGTERM or SIGHUP the temporary is removed and an old output is left
  as it was. A run killed with SIGKILL leaves its temporary; the next run into the same folder
  removes it (the owner pid is dead) or puts a half-replaced old output back.
- One run at a time per output: a lock file ``.<name>.moeprune-lock`` beside it (``flock``); a
  second run fails at once with one line instead of waiting (a wait could hang a script behind
  a run that takes hours).
- Disk full, read-only or permission errors while writing become one :class:`UserError` line.
- Outputs get the permissions ``cp`` would give (the umask applies; no 0600/0700 temporaries).

Usage: ``with prepare_output(out, inputs=[model_dir], force=force, kind="model") as tmp: ...``
writes into ``tmp`` (a folder, or a file path for ``folder=False``) and commits on success.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import UserError

MARKER = ".moeprune-output"
"""The file in every output folder that says moeprune wrote it (``--force`` replaces only these)."""

# Errors of the output's file system, not of the program: each becomes one UserError line.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}

_TEMP = re.compile(r"^\.(?P<name>.+)\.moeprune-(?P<tag>tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+$")
_LOCK = re.compile(r"^\.(?P<name>.+)\.moeprune-lock$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")

class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP while an output is being written: unwinds like Ctrl-C so it is cleaned up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- names, liveness, stale temporaries ------------------------------------------------------------


def _host() -> str:
    # os.uname().nodename is what socket.gethostname() returns on POSIX; importing socket (and
    # secrets, for what os.urandom gives below) was ~15 ms of a rewrite's fixed cost
    if hasattr(os, "uname"):
        name = os.uname().nodename
    else:
        import socket

        name = socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_.]", "_", name) or "host"


def temp_name(name: str, tag: str = "tmp") -> str:
    """A hidden sibling name for ``name`` that carries this host and pid (so a later run can tell
    whether its owner still lives)."""
    return f".{name}.moeprune-{tag}-{_host()}-{os.getpid()}-{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` left by moeprune runs of this host that died (SIGKILL,
    power loss); put back an old output whose replacement was cut between its two renames; drop
    lock files nobody holds. Returns what was removed or restored."""
    done: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return done
    host = _host()
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and m["host"] == host and not _alive(int(m["pid"])):
            final = folder / m["name"]
            if m["tag"] == "old" and not os.path.lexists(final):
                with contextlib.suppress(OSError):
                    os.rename(entry, final)
                    done.append(final)
                    continue
            _remove(entry)
            done.append(entry)
        elif _LOCK.match(entry.name) and _drop_unheld_lock(entry):
            done.append(entry)
    return done


# --- the lock ----------------------------------------------------------------------------------------


def _lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.moeprune-lock"


def _drop_unheld_lock(path: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    os.close(fd)
    return True


class _Lock:
    """An exclusive ``flock`` on ``.<name>.moeprune-lock`` beside the output, removed on release.

    The file is unlinked while held; whoever opened it before the unlink finds, once it holds the
    lock, that the path names another file (or none) and tries again."""

    def __init__(self, final: Path, what: str, display: str) -> None:
        self.path = _lock_path(final)
        self.what, self.display = what, display
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                raise UserError(
                    f"another moeprune run{f' (pid {owner})' if owner else ''} is writing "
                    f"{self.what} '{self.display}'",
                    "wait for it to finish, or choose another output",
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise UserError(f"could not lock {self.what} '{self.display}'", "try again")  # pragma: no cover

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None


# --- signals -------------------------------------------------------------------------------------------


_received: list[int] = []


def received_signal() -> int | None:
    """The last SIGTERM/SIGHUP turned into :class:`Interrupted` (click re-raises it as an Abort)."""
    return _received[-1] if _received else None


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Interrupted` (instead of killing the process outright) so
    the output's cleanup runs; only where their handler is the default, and only in the main thread."""
    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                installed[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for the few renames that commit an output: they are
    delivered (and raise) right after, when the output is whole again."""
    held = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    can = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if can else None
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- committing ------------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder ``tmp`` at ``final`` (replacing an old ``final``): at every instant
    ``final`` is the old output or the new one, whatever signal arrives."""
    leftover: Path | None = None
    try:
        with _signals_held():
            if not os.path.lexists(final):
                os.rename(tmp, final)
            elif _exchange(tmp, final):
                leftover = tmp  # now holds the old output
            else:
                leftover = final.parent / temp_name(final.name, "old")
                os.rename(final, leftover)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(leftover, final)
                    leftover = None
                    raise
    finally:  # a held signal is raised as the block ends: the old output still goes
        if leftover is not None:  # (cut short, it is a stale temporary for the next run)
            _remove(leftover)


def write_marker(folder: Path, kind: str) -> None:
    from . import __version__

    text = json.dumps({"tool": "moeprune", "version": __version__, "kind": kind}) + "\n"
    (folder / MARKER).write_text(text, encoding="utf-8")


def is_moeprune_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def is_moeprune_file(path: Path) -> bool:
    """Whether ``path`` is one of moeprune's own files: a JSON or safetensors file whose ``format``
    starts with ``moeprune`` (plans, profiles, libraries), or a JSON report naming moeprune's version."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) == 8 and path.suffix == ".safetensors":
                n = int.from_bytes(head, "little")
                if n > 100_000_000:
                    return False
                meta = json.loads(fh.read(n)).get("__metadata__") or {}
                if isinstance(meta, dict) and isinstance(meta.get("meta"), str):
                    meta = json.loads(meta["meta"])  # a profile keeps its format inside "meta"
            else:
                if os.fstat(fh.fileno()).st_size > 200_000_000:
                    return False
                meta = json.loads(head + fh.read())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(meta, dict):
        return False
    versions = meta.get("versions")
    return str(meta.get("format", "")).startswith("moeprune") or (
        isinstance(versions, dict) and "moeprune" in versions
    )


# --- errors ------------------------------------------------------------------------------------------------


def os_error(exc: BaseException, what: str, display: str, where: Path) -> UserError | None:
    """One line for a file-system error writing an output (disk full, read-only, no permission);
    None for anything else (a bug, or an error reading an input)."""
    code = getattr(exc, "errno", None)
    if not isinstance(exc, OSError):
        m = _OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
        code = int(m.group(1)) if m else None
    if code not in WRITE_ERRNOS:
        return None
    if code in (errno.EACCES, errno.EPERM) and isinstance(exc, OSError) and exc.filename:
        name = os.path.abspath(os.fsdecode(exc.filename))
        if not name.startswith(str(where)):
            return None  # a file elsewhere (an input) could not be read
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UserError(
            f"no space left on the device writing {what} '{display}' (nothing was written)",
            "free some space or choose another output",
        )
    if code == errno.EROFS:
        return UserError(f"{what} '{display}' is on a read-only file system", "choose another output")
    return UserError(f"no permission to write {what} '{display}' in {where}", "choose another output")


# --- checks --------------------------------------------------------------------------------------------------


def _inputs(inputs: Iterable[Any]) -> list[tuple[str, str, Path]]:
    out = []
    for item in inputs:
        label, path = item if isinstance(item, tuple) else ("input", item)
        if path is None:
            continue
        out.append((label, str(path), Path(path).expanduser().resolve()))
    return out


def _check_inputs(final: Path, inputs: Iterable[Any], what: str, display: str) -> None:
    for label, shown, resolved in _inputs(inputs):
        if final == resolved:
            how = "is"
        elif resolved in final.parents:
            how = "is inside"
        elif final in resolved.parents:
            how = "contains"
        else:
            continue
        raise UserError(f"{what} '{display}' {how} the {label} '{shown}'", "write the output elsewhere")


def _check_existing(
    final: Path, folder: bool, force: bool, owned: Callable[[Path], bool] | None, what: str, display: str
) -> None:
    if not os.path.lexists(final):
        return
    if folder:
        if not final.is_dir():
            raise UserError(f"{what} '{display}' exists and is not a folder", "pass a new folder name")
        if not any(final.iterdir()):
            return
        if not force:
            raise UserError(f"{what} '{display}' is not empty", "pass --force to replace it, or a new folder")
        if not (owned or is_moeprune_dir)(final):
            raise UserError(
                f"{what} '{display}' is not empty and was not written by moeprune",
                "--force replaces only moeprune's own outputs; remove it yourself or pass a new folder",
            )
        return
    if final.is_dir():
        raise UserError(f"{what} '{display}' is a folder", "pass a file name")
    if not force:
        raise UserError(f"{what} '{display}' already exists", "pass --force to replace it, or another name")
    if not (owned or is_moeprune_file)(final):
        raise UserError(
            f"{what} '{display}' exists and is not a moeprune file",
            "--force replaces only moeprune's own files; remove it yourself or pass another name",
        )


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, what: str = "--out", display: str | None = None) -> None:
    """Create, write and remove a probe file in ``folder``: a read-only, unwritable or full file
    system is found now, before any work, not after an hour of calibration."""
    display = display or str(folder)
    probe = folder / temp_name("probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as exc:
        line = os_error(exc, what, display, folder)
        if line is None:
            raise
        raise line from None


def check_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[Any] = (),
    force: bool = False,
    folder: bool = True,
    what: str = "--out",
    owned: Callable[[Path], bool] | None = None,
    parents: bool = False,
) -> Path:
    """Every check of an output, before any work: not an input, not inside or around one; its
    folder exists (or ``parents``) and is writable; an existing output only with ``force`` and only
    if moeprune wrote it. ``inputs`` are paths or ``(label, path)`` pairs (label: "input model").
    Returns the resolved output path; raises a one-line :class:`UserError`."""
    display = str(out)
    final = Path(out).expanduser().resolve()
    _check_inputs(final, inputs, what, display)
    parent = final.parent
    if not parent.is_dir():
        if os.path.lexists(parent) or not parents:
            raise UserError(
                f"the folder of {what} '{display}' does not exist"
                + (" (a file is in the way)" if os.path.lexists(parent) else ""),
                f"create {parent} first",
            )
        ancestor = _existing_ancestor(parent)
        if not ancestor.is_dir():
            raise UserError(f"'{ancestor}' in {what} '{display}' is a file", "pass another path")
        check_writable(ancestor, what, display)
        return final
    _check_existing(final, folder, force, owned, what, display)
    check_writable(parent, what, display)
    return final


# --- the output ------------------------------------------------------------------------------------------------


@dataclass
class Output:
    """One output of a command, from its checks to its commit: ``with output as tmp`` locks it,
    removes stale temporaries, makes ``tmp`` (a folder, or a file path to create) and, when the
    block ends without error, puts ``tmp`` in place (with the marker in a folder). On any error or
    signal ``tmp`` is removed and an old output stays as it was; file-system errors become one line."""

    path: Path
    display: str
    folder: bool = True
    force: bool = False
    kind: str = "output"
    what: str = "--out"
    inputs: tuple[Any, ...] = ()
    owned: Callable[[Path], bool] | None = None
    parents: bool = False
    tmp: Path | None = field(default=None, init=False)
    _lock: _Lock | None = field(default=None, init=False, repr=False)
    _stack: contextlib.ExitStack | None = field(default=None, init=False, repr=False)

    def need(self, nbytes: int) -> None:
        """Refuse now when the output's file system has less than ``nbytes`` free."""
        try:
            st = os.statvfs(_existing_ancestor(self.path.parent))
        except (OSError, AttributeError):
            return
        free = st.f_bavail * st.f_frsize
        if free < nbytes:
            raise UserError(
                f"{self.what} '{self.display}' needs {nbytes / 2**20:.1f} MiB but only "
                f"{free / 2**20:.1f} MiB are free there",
                "free some space or choose another output",
            )

    def __enter__(self) -> Path:
        stack = contextlib.ExitStack()
        stack.enter_context(_signals_raise())
        try:
            if self.parents:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = _Lock(self.path, self.what, self.display)
            lock.acquire()
            stack.callback(lock.release)
            # checked again under the lock: another run may have written it since
            _check_inputs(self.path, self.inputs, self.what, self.display)
            _check_existing(self.path, self.folder, self.force, self.owned, self.what, self.display)
            clean_stale(self.path.parent)
            tmp = self.path.parent / temp_name(self.path.name)
            if self.folder:
                os.mkdir(tmp)  # 0o777 less the umask, like cp and mkdir
            self.tmp = tmp
        except BaseException as exc:
            stack.close()
            self._as_line(exc)
            raise
        self._stack = stack
        return tmp

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self.tmp is not None and self._stack is not None
        tmp, stack = self.tmp, self._stack
        self.tmp = self._stack = None
        with stack:  # then unlock and restore the signal handlers
            if exc is None:
                try:
                    self._commit(tmp)
                except BaseException as err:
                    _remove(tmp)
                    self._as_line(err)
                    raise
                return None
            _remove(tmp)
            self._as_line(exc)
        return None  # the block's exception goes on

    def _as_line(self, exc: BaseException) -> None:
        line = os_error(exc, self.what, self.display, self.path.parent)
        if line is not None:
            raise line from exc

    def _commit(self, tmp: Path) -> None:
        if self.folder:
            write_marker(tmp, self.kind)
            replace_dir(tmp, self.path)
        else:
            if not tmp.exists():
                raise RuntimeError(f"nothing was written to {tmp}")
            os.replace(tmp, self.path)


def prepare_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[Any] = (),
    force: bool = False,
    folder: bool = True,
    kind: str = "output",
    what: str = "--out",
    owned: Callable[[Path], bool] | None = None,
    parents: bool = False,
) -> Output:
    """Check an output now (:func:`check_output`) and return it, to be written later with
    ``with output as tmp:`` (see :class:`Output`)."""
    inputs = tuple(inputs)
    final = check_output(
        out, inputs=inputs, force=force, folder=folder, what=what, owned=owned, parents=parents
    )
    return Output(final, str(out), folder, force, kind, what, inputs, owned, parents)


def write_dir_atomically(
    out: Path, write: Callable[[Path], None], *, inputs: Iterable[Any] = (), kind: str = "output"
) -> None:
    """Call ``write(tmp)`` on a fresh temp folder beside ``out``, then put it in place of ``out``.

    The caller has decided that an existing ``out`` may be replaced (``--force``); it still must
    have been written by moeprune. On any error or interrupt an existing ``out`` is left as it was.
    """
    with prepare_output(out, inputs=inputs, force=True, kind=kind) as tmp:
        write(tmp)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Write one file through a temporary beside it, then rename: a reader (or an interrupt) never
    sees a partial file. No overwrite policy here (the command checked it up front)."""
    final = Path(path).expanduser().resolve()
    with Output(final, str(path), folder=False, force=True, owned=lambda p: True, parents=True) as tmp:
        write(tmp)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

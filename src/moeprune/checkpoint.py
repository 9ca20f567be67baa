"""Lazy access to safetensors checkpoints, and a streaming safetensors writer.

Reading never loads a model: opening a :class:`Checkpoint` parses only the shard headers (8-byte
length + JSON), which give every tensor's dtype, shape and byte range. Tensors, or the rows of
some experts, are read with ``safetensors.safe_open`` / ``get_slice`` only when asked for.

Writing (:func:`write_safetensors`) needs no tensor in memory either: the header of an output
file is known in advance from the source headers, and the data is copied from source byte ranges
(:class:`Piece`) with ``pread`` / ``write`` through a 1 MiB buffer (what ``cp`` does; faster here
than ``copy_file_range``, see :func:`_copy_range`). Slicing a tensor along its expert axis is a
list of byte ranges (:meth:`TensorInfo.expert_pieces`), so a rewrite streams at the speed of ``cp``.
Entries that exist in no source file (padding experts, constant vectors) are :class:`DataPiece`
(a few literal bytes) or :class:`ZeroPiece` (zeros, written in bounded chunks);
:meth:`TensorInfo.slot_pieces` mixes all three along the expert axis.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .fileio import parse_json, read_text

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# bytes per element of each safetensors dtype
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
}
# packed sub-byte dtypes (bits per element): valid in a header, never sliced by moeprune
SUBBYTE_BITS: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

_MAX_HEADER = 256 * 1024 * 1024  # safetensors' own limit is 100 MB; be a little lenient
_COPY_CHUNK = 64 * 1024 * 1024  # bytes per write of generated data (zeros, literals)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a shard file (absolute byte offsets)."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    def whole(self) -> list[AnyPiece]:
        return [Piece(self.file, self.start, self.nbytes)] if self.nbytes else []

    def expert_pieces(self, axis: int, ids: Sequence[int]) -> list[AnyPiece]:
        """Byte ranges of the entries ``ids`` (ascending) along ``axis``, in output order."""
        if not 0 <= axis < len(self.shape):
            raise ValueError(f"{self.key}: axis {axis} out of range for shape {list(self.shape)}")
        n = self.shape[axis]
        outer = 1
        for d in self.shape[:axis]:
            outer *= d
        inner = self.itemsize
        for d in self.shape[axis + 1 :]:
            inner *= d
        pieces: list[AnyPiece] = []
        for o in range(outer):
            base = self.start + o * n * inner
            for first, last in contiguous_runs(ids):
                _append(pieces, Piece(self.file, base + first * inner, (last - first + 1) * inner))
        return pieces

    def entry_bytes(self, axis: int) -> int:
        """Bytes of one entry along ``axis`` (the size of one expert's slice, for one outer index)."""
        inner = self.itemsize
        for d in self.shape[axis + 1 :]:
            inner *= d
        return inner

    def slot_pieces(self, axis: int, slots: Sequence[int | bytes | None]) -> list[AnyPiece]:
        """Byte ranges of a tensor whose entries along ``axis`` are ``slots``, in output order: an int
        is that entry of this tensor, ``bytes`` a literal entry (``entry_bytes`` long, the same for
        every outer index), ``None`` an entry of zeros."""
        if not 0 <= axis < len(self.shape):
            raise ValueError(f"{self.key}: axis {axis} out of range for shape {list(self.shape)}")
        n = self.shape[axis]
        outer = 1
        for d in self.shape[:axis]:
            outer *= d
        inner = self.entry_bytes(axis)
        pieces: list[AnyPiece] = []
        for o in range(outer):
            base = self.start + o * n * inner
            for slot in slots:
                if slot is None:
                    _append(pieces, ZeroPiece(inner))
                elif isinstance(slot, bytes):
                    if len(slot) != inner:
                        raise ValueError(
                            f"{self.key}: a literal entry of {len(slot)} bytes, expected {inner}"
                        )
                    _append(pieces, DataPiece(slot))
                else:
                    if not 0 <= slot < n:
                        raise ValueError(f"{self.key}: entry {slot} out of range 0..{n - 1}")
                    _append(pieces, Piece(self.file, base + slot * inner, inner))
        return pieces


@dataclass(frozen=True)
class Piece:
    """A byte range of a source file."""

    file: Path
    offset: int
    length: int


@dataclass(frozen=True)
class DataPiece:
    """Literal bytes (small generated tensors: constant vectors, padding values)."""

    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ZeroPiece:
    """``length`` zero bytes (padding experts), written without holding them in memory."""

    length: int


AnyPiece = Piece | DataPiece | ZeroPiece


def _append(pieces: list[AnyPiece], piece: AnyPiece) -> None:
    """Append, merging with the previous piece when the ranges touch (or both are zeros/literals)."""
    if not piece.length:
        return
    last = pieces[-1] if pieces else None
    if (
        isinstance(piece, Piece)
        and isinstance(last, Piece)
        and last.file == piece.file
        and last.offset + last.length == piece.offset
    ):
        pieces[-1] = Piece(last.file, last.offset, last.length + piece.length)
    elif isinstance(piece, ZeroPiece) and isinstance(last, ZeroPiece):
        pieces[-1] = ZeroPiece(last.length + piece.length)
    elif isinstance(piece, DataPiece) and isinstance(last, DataPiece) and len(last.data) < _COPY_CHUNK:
        pieces[-1] = DataPiece(last.data + piece.data)
    else:
        pieces.append(piece)


def contiguous_runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """``[0, 1, 2, 5, 6]`` -> ``[(0, 2), (5, 6)]`` (inclusive runs of consecutive ids)."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


# --- reading ----------------------------------------------------------------------------------


def read_header(
    path: str | os.PathLike, digest: Any = None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and ``__metadata__`` of one safetensors file, from its header alone. ``digest`` (a
    hashlib object), when given, takes the file's size and the header bytes parsed here, as
    :func:`_files_identity` reads them."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(8)
            if len(raw) != 8:
                raise _corrupt(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise _corrupt(path, "header length is out of range")
            text = fh.read(n)
        if digest is not None:
            _digest_header(digest, size, n, text)
        header = json.loads(text)
    except OSError as exc:
        raise UserError(f"cannot read '{path}' ({exc.strerror or exc})", "check the file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        info = _tensor_info(path, key, entry, base, size)
        tensors[key] = info
    _check_no_overlap(path, tensors, base, size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, key: str, entry: Any, base: int, size: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape whose bytes are its byte range, inside the file."""
    try:
        dtype = entry["dtype"]
        shape = tuple(_whole(d) for d in entry["shape"])
        begin, end = (_whole(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, f"entry '{key}' is malformed") from None
    if not isinstance(dtype, str) or (dtype not in DTYPE_SIZES and dtype not in SUBBYTE_BITS):
        raise _corrupt(path, f"tensor '{key}' has an unknown dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise _corrupt(path, f"tensor '{key}' has a negative dimension {list(shape)}")
    if not 0 <= begin <= end or base + end > size:
        raise _corrupt(path, f"tensor '{key}' lies outside the file")
    info = TensorInfo(key, path, dtype, shape, base + begin, base + end)
    bits = SUBBYTE_BITS.get(dtype, 8 * DTYPE_SIZES.get(dtype, 0))
    if info.numel * bits != info.nbytes * 8:
        raise _corrupt(path, f"tensor '{key}' has {info.nbytes} bytes for shape {list(shape)} {dtype}")
    return info


def _whole(value: Any) -> int:
    """A JSON integer (not a bool, float or string that int() would accept)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """No two tensors share bytes (a header that aliases them would be copied as nonsense), and
    they fill the data section without a gap, as safetensors itself requires when it loads the
    file (a header with an entry removed left a gap: "invalid offset", a traceback)."""
    last: TensorInfo | None = None
    for info in sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.start):
        if last is not None and info.start < last.end:
            raise _corrupt(path, f"tensors '{last.key}' and '{info.key}' overlap")
        if info.start != (last.end if last is not None else base):
            after = f"after '{last.key}'" if last is not None else "at the start of the data"
            raise _corrupt(
                path, f"a gap in the tensor data {after}, before '{info.key}' (a tensor is missing)"
            )
        last = info
    if (last.end if last is not None else base) != size:
        raise _corrupt(path, "bytes after the last tensor (the header does not describe the whole file)")


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"'{path}' is not a valid safetensors file ({why})", "re-download or re-save the model")


_OTHER_WEIGHTS = re.compile(r"(pytorch_model.*\.bin|tf_model\.h5|flax_model\.msgpack|model.*\.ckpt)$")


@dataclass
class Checkpoint:
    """A safetensors checkpoint directory (``model.safetensors`` or a sharded index), read lazily."""

    directory: Path
    tensors: dict[str, TensorInfo]  # in file order
    shard_files: list[Path]
    index_metadata: dict[str, Any] = field(default_factory=dict)
    file_metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Checkpoint:
        """The checkpoint in ``directory``, from its index and shard headers (parsed again only when
        one of those files changed since the last time this process opened it: :data:`_OPENED`)."""
        directory = Path(directory)
        key = (str(directory), os.getcwd())  # the entries' file paths are the directory's as given
        cached = _OPENED.get(key)
        if cached is not None and cached[0] == _files_identity(directory, cached[1].shard_files):
            return cached[1].copy()
        _OPENED.pop(key, None)
        # the identity of the very bytes parsed: a file rewritten meanwhile differs from it, and
        # is parsed again at the next open
        digest = hashlib.blake2b(digest_size=16)
        opened = cls._read(directory, digest)
        while len(_OPENED) >= _OPENED_MAX:
            _OPENED.pop(next(iter(_OPENED)))
        _OPENED[key] = (digest.digest(), opened)
        return opened.copy()

    def copy(self) -> Checkpoint:
        """The same checkpoint with containers of its own (the tensor entries are immutable)."""
        return Checkpoint(
            self.directory, dict(self.tensors), list(self.shard_files), dict(self.index_metadata), dict(self.file_metadata)
        )

    @classmethod
    def _read(cls, directory: Path, digest: Any) -> Checkpoint:
        """Parse the index and the shard headers; ``digest`` takes what they were parsed from, as
        :func:`_files_identity` reads it."""
        index = directory / INDEX_NAME
        single = directory / SINGLE_NAME
        weight_map: dict[str, str] | None = None
        index_meta: dict[str, Any] = {}
        if index.is_file():
            fix = "re-download or re-save the model"
            text = read_text(index, "safetensors index", fix)
            _digest_index(digest, text.encode("utf-8"))  # the file's bytes: they decoded as UTF-8
            data = parse_json(text, f"safetensors index '{index}'", fix)
            try:
                weight_map = {str(k): str(v) for k, v in data["weight_map"].items()}
                index_meta = dict(data.get("metadata") or {})
            except (KeyError, TypeError, AttributeError, ValueError):
                raise UserError(
                    f"'{index}' is not a valid safetensors index", "re-download or re-save the model"
                ) from None
            names = list(dict.fromkeys(weight_map.values()))
            files = [directory / name for name in names]
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise UserError(
                    f"the checkpoint index names shard(s) that are missing: {', '.join(missing[:3])}",
                    "re-download the model",
                )
        elif single.is_file():
            _digest_index(digest, None)
            files = [single]
        else:
            others = sorted(p.name for p in directory.iterdir() if _OTHER_WEIGHTS.search(p.name))
            if others:
                raise UserError(
                    f"'{directory}' holds {others[0]} but no safetensors weights",
                    "convert it first (load it with transformers and save_pretrained)",
                )
            raise UserError(f"'{directory}' has no model.safetensors or {INDEX_NAME}", "check the model")
        _digest_single(digest, directory)
        tensors: dict[str, TensorInfo] = {}
        file_meta: dict[str, str] = {}
        for i, path in enumerate(files):
            found, meta = read_header(path, digest)
            if i == 0:
                file_meta = meta
            for key, info in sorted(found.items(), key=lambda kv: kv[1].start):
                if key in tensors:
                    raise UserError(
                        f"tensor '{key}' is stored twice ({tensors[key].file.name}, {path.name})",
                        "re-download the model",
                    )
                tensors[key] = info
        if weight_map is not None:
            wrong = [k for k, name in weight_map.items() if k not in tensors or tensors[k].file.name != name]
            if wrong:
                raise UserError(
                    f"the checkpoint index lists '{wrong[0]}' in a shard that does not hold it",
                    "re-download the model",
                )
        return cls(directory, tensors, files, index_meta, file_meta)

    # --- questions answered by the headers ---------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        return self.tensors[key]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def max_shard_bytes(self) -> int:
        return max(f.stat().st_size for f in self.shard_files)

    # --- reading tensors (only when asked) ---------------------------------------------------

    def tensor(self, key: str):
        """One whole tensor (read from disk now)."""
        from safetensors import safe_open

        info = self.tensors[key]
        with safe_open(str(info.file), framework="pt") as fh:
            return fh.get_tensor(key)

    def experts(self, key: str, ids: Sequence[int], axis: int = 0):
        """The entries ``ids`` of ``key`` along ``axis`` (only those bytes are read)."""
        import torch
        from safetensors import safe_open

        info = self.tensors[key]
        index: list[Any] = [slice(None)] * axis
        runs = contiguous_runs(sorted(ids)) or [(0, -1)]
        with safe_open(str(info.file), framework="pt") as fh:
            sl = fh.get_slice(key)
            parts = [sl[(*index, slice(first, last + 1))] for first, last in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


# --- writing ----------------------------------------------------------------------------------


@dataclass
class OutTensor:
    """One tensor of an output file: its name, dtype, shape and the source bytes it is made of."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[AnyPiece]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# The checkpoints this process opened last, with the identity of the files they were read from. One
# command opens the same checkpoint several times (the plan check, the router digest, the rewrite),
# and a large model's headers take long to parse and check (DeepSeek-V3: 163 shards, ~91k tensors).
_OPENED: dict[tuple[str, str], tuple[bytes, Checkpoint]] = {}
_OPENED_MAX = 4


def _files_identity(directory: Path, shard_files: Sequence[Path]) -> bytes | None:
    """What a :class:`Checkpoint` is read from: the index's bytes and each shard's size and header
    bytes, as a digest (None when a file cannot be read: then it is read again, and fails with its
    own message). Modification times would not do: they tick in jiffies, so a file written twice
    in a few milliseconds can keep one."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        index = directory / INDEX_NAME
        _digest_index(digest, index.read_bytes() if index.is_file() else None)
        _digest_single(digest, directory)
        for path in shard_files:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                raw = fh.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
                _digest_header(digest, size, n, fh.read(min(n, _MAX_HEADER)))
    except OSError:
        return None
    return digest.digest()


# What the identity hashes, in this order; Checkpoint._read feeds the bytes it parses through the
# same three, so that a parse and a later check of the same files give the same digest.
def _digest_index(digest: Any, index_bytes: bytes | None) -> None:
    digest.update(b"\0" + index_bytes if index_bytes is not None else b"\1")


def _digest_single(digest: Any, directory: Path) -> None:
    digest.update(b"\0" if (directory / SINGLE_NAME).is_file() else b"\1")


def _digest_header(digest: Any, size: int, n: int, header_bytes: bytes) -> None:
    digest.update(struct.pack("<QQ", size, n))
    digest.update(header_bytes)


def safetensors_header(tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The length-prefixed header of a safetensors file holding ``tensors`` in this order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        if t.dtype in DTYPE_SIZES and t.numel * DTYPE_SIZES[t.dtype] != t.nbytes:
            raise ValueError(f"{t.key}: {t.nbytes} bytes for shape {list(t.shape)} {t.dtype}")
        header[t.key] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


_PREFETCH = 256 * 1024 * 1024  # source bytes announced ahead of the copy (posix_fadvise WILLNEED)


class _Prefetcher:
    """Tell the kernel which source ranges come next (``POSIX_FADV_WILLNEED``), up to
    ``_PREFETCH`` bytes ahead of the copy: a pruned checkpoint's pieces are runs of kept experts
    with gaps between them, and each gap restarts the kernel's sequential readahead. Measured at
    DeepSeek-V3 width with a cold page cache it saves ~6% (docs/benchmarks.md, "Real width")."""

    def __init__(self, pieces: list[AnyPiece], fds: dict[Path, int]) -> None:
        self.pieces = [p for p in pieces if isinstance(p, Piece)]
        self.fds = fds
        self.next = 0  # first piece not yet announced
        self.ahead = 0  # bytes announced and not yet copied
        self.enabled = hasattr(os, "posix_fadvise")

    def before(self) -> None:
        """Announce the next pieces. The pieces already copied were announced, so ``ahead``
        counts the piece about to be copied onwards: when that one is not announced yet,
        ``ahead`` is 0 and it is announced first."""
        while self.enabled and self.next < len(self.pieces) and self.ahead < _PREFETCH:
            p = self.pieces[self.next]
            try:
                os.posix_fadvise(_fd(self.fds, p.file), p.offset, p.length, os.POSIX_FADV_WILLNEED)
            except OSError:  # a file system without readahead: copy without announcing
                self.enabled = False
            self.ahead += p.length
            self.next += 1

    def after(self, piece: Piece) -> None:
        self.ahead -= piece.length


def _fd(fds: dict[Path, int], file: Path) -> int:
    fd = fds.get(file)
    if fd is None:
        fd = fds[file] = os.open(file, os.O_RDONLY)
    return fd


def write_safetensors(
    path: str | os.PathLike,
    tensors: Sequence[OutTensor],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``tensors`` to ``path`` by copying their source byte ranges; returns the bytes of data."""
    header = safetensors_header(tensors, metadata)
    fds: dict[Path, int] = {}
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    try:
        prefetch = _Prefetcher([p for t in tensors for p in t.pieces], fds)
        _write_all(out, header)
        for t in tensors:
            for piece in t.pieces:
                if isinstance(piece, (DataPiece, ZeroPiece)):
                    _write_generated(out, piece, progress)
                    written += piece.length
                    continue
                prefetch.before()
                _copy_range(_fd(fds, piece.file), out, piece.offset, piece.length, progress)
                prefetch.after(piece)
                written += piece.length
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)
    return written


def _write_generated(fd: int, piece: DataPiece | ZeroPiece, progress: Callable[[int], None] | None) -> None:
    if isinstance(piece, DataPiece):
        _write_all(fd, piece.data)
        if progress is not None:
            progress(piece.length)
        return
    done = 0
    zeros = bytes(min(_COPY_CHUNK, piece.length))
    while done < piece.length:
        n = min(len(zeros), piece.length - done)
        _write_all(fd, memoryview(zeros)[:n])
        done += n
        if progress is not None:
            progress(n)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


_COPY_BUFFER = 1024 * 1024  # bytes per read / write of a copied range (see _copy_range)
_BUFFERS = threading.local()  # one copy buffer per thread, reused for every range


def _copy_range(src: int, dst: int, offset: int, length: int, progress: Callable[[int], None] | None) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``dst`` (at its current position).

    Plain ``pread`` + ``write`` through a 1 MiB buffer, as ``cp`` does (coreutils 9 copies with
    128 KiB ``read``/``write``): measured on the pieces of a pruned checkpoint (ext4, page cache,
    docs/benchmarks.md), ``copy_file_range`` and ``sendfile`` took 1.3-1.5 x the time and CPU of
    ``cp``, and read/write with a 1-2 MiB buffer 0.9-1.0 x (128 KiB and 4-8 MiB: 1.2-1.5 x). The
    expert pieces start at offsets that are not page-aligned, where the kernel's splice path
    copies page fragment by fragment."""
    view = getattr(_BUFFERS, "view", None)
    if view is None:
        view = _BUFFERS.view = memoryview(bytearray(_COPY_BUFFER))
    done = 0
    while done < length:
        want = min(len(view), length - done)
        n = _pread_into(src, view[:want], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"unexpected end of file while copying {length} bytes at {offset}")
        _write_all(dst, view[:n])
        done += n
        if progress is not None:
            progress(n)


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    data = os.pread(fd, len(view), offset)  # (platforms without preadv)
    view[: len(data)] = data
    return len(data)


def parse_size(text: str | int) -> int:
    """``'5GB'`` / ``'500MB'`` / ``'2GiB'`` / ``1000`` -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"size '{text}' is not understood", "write it like 5GB, 500MB or a number of bytes")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = "KMGT".index(unit) + 1 if unit else 0
    size = int(value * (1024 if binary else 1000) ** power)
    if size < 1:
        raise UserError(f"size '{text}' must be positive", "pass e.g. 5GB")
    return size

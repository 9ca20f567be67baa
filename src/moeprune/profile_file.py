"""The profile file as bytes: its format constants, and its novice vectors read without torch.

``moeprune prune --mode novice`` stores rows of the profile's [L, E, H] float32 ``mone_mean`` (or
``novice_lsq``) and otherwise only copies bytes, as a removal does; reading those rows here, as
numpy arrays with their checksum verified, spares the command torch (~1 s and ~230 MB of it).
Whatever does not check out gives None, and the caller reads the profile with torch
(:meth:`moeprune.profile.Profile.load`), which names the problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "moeprune-profile/2"  # 2: PreMoe histograms (bounded size), checksums
OLD_FORMATS = ("moeprune-profile/1",)  # per-token PreMoe entries, no checksum: read with a warning
CHECKSUM_KEY = "sha256"  # the header's checksum list: one per tensor, "__meta__" for the metadata
NOVICE_TENSORS = {"mean": "mone_mean", "lsq": "novice_lsq"}  # novice fit -> [L, E, H] float32 tensor


def tensor_digest(dtype: str, shape: list[int], data: bytes | memoryview) -> str:
    """A tensor's checksum as the profile stores it: sha256 of its torch dtype's name
    (``torch.float32``), its shape and its bytes in C order (little-endian, as safetensors
    stores them)."""
    h = hashlib.sha256(f"{dtype}:{[int(d) for d in shape]}:".encode())
    h.update(data)
    return h.hexdigest()


def novice_rows(
    path: str | Path, fit: str, fingerprint: str, replaced: dict[int, list[int]]
) -> dict[int, Any] | None:
    """Each layer's novice vectors [R, H] (numpy float32, rows ``replaced[layer]`` of the fit's
    tensor) from the profile file at ``path``, made on the model of ``fingerprint``
    (:func:`moeprune.identity.model_fingerprint`); None unless the file is a current-format
    profile of that model whose metadata and tensor match their checksums."""
    import numpy as np

    from .checkpoint import read_header
    from .errors import UserError

    name = NOVICE_TENSORS.get(fit)
    if name is None:
        return None
    try:
        infos, metadata = read_header(path)
        meta_text = metadata["meta"]
        meta = json.loads(meta_text)
        stored = json.loads(metadata[CHECKSUM_KEY])
        if not (isinstance(meta, dict) and isinstance(stored, dict)) or meta.get("format") != FORMAT:
            return None
        if stored.get("__meta__") != hashlib.sha256(meta_text.encode()).hexdigest():
            return None
        if meta.get("model_fingerprint") != fingerprint:
            return None
        layers = [int(x) for x in meta["layers"]]
        info = infos[name]
        shape = (len(layers), int(meta["num_experts"]), int(meta["hidden_size"]))
        if info.dtype != "F32" or tuple(info.shape) != shape:
            return None
        with open(info.file, "rb") as fh:
            fh.seek(info.start)
            data = fh.read(info.nbytes)
        if len(data) != info.nbytes or stored.get(name) != tensor_digest("torch.float32", list(shape), data):
            return None
        table = np.frombuffer(data, dtype="<f4").reshape(shape)
        out = {}
        for layer, ids in replaced.items():
            if layer not in layers or any(not 0 <= int(i) < shape[1] for i in ids):
                return None
            out[layer] = table[layers.index(layer), [int(i) for i in ids]].astype(np.float32)
        return out
    except (UserError, OSError, KeyError, ValueError, TypeError):
        return None

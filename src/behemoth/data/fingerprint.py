"""Fingerprints that say whether two things are the same: a model directory (a teacher), and a token store
(the data a teacher cache was made from). sha256, quick even for multi-TB checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np


def _sha256_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


_FULL_HASH_BYTES = 256 << 20  # weight files up to this size are hashed whole
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def teacher_fingerprint(directory: str | os.PathLike) -> str:
    """sha256 of a checkpoint directory's config.json (canonical JSON) and its safetensors files: each
    file's name, size and header, and its content (whole up to 256 MiB; beyond, 64 blocks of 64 KiB at
    evenly spaced offsets, so a multi-TB teacher is fingerprinted in seconds and still changes when its
    weights do)."""
    directory = Path(directory)
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{cfg_file}: missing (the teacher's checkpoint directory needs config.json)")
    h = hashlib.sha256()
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode())
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.safetensors.index.json"))
    if not files:
        raise ValueError(f"{directory}: no safetensors weights to fingerprint")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        if size <= _FULL_HASH_BYTES:
            _sha256_file(f, h)
            continue
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100 << 20)))
            for i in range(_SAMPLES):
                fh.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def data_fingerprint(store) -> str:
    """sha256 of a `TokenStore`'s tokens (as little-endian uint32, whatever the stored width) and its
    document starts: the teacher's context at every position depends on both."""
    h = hashlib.sha256(b"behemoth-token-store:")
    tokens = store.tokens
    step = 1 << 24
    for s in range(0, len(tokens), step):
        h.update(np.ascontiguousarray(tokens[s:s + step], dtype="<u4").tobytes())
    h.update(b":doc_starts:")
    h.update(np.ascontiguousarray(store.doc_starts, dtype="<i8").tobytes())
    return h.hexdigest()

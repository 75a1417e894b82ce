"""Durable file writes shared by checkpoints, token stores and teacher caches."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (best effort: some filesystems cannot fsync directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_format_json(file: Path, fmt: str, version: int, what: str) -> dict:
    """A JSON object that names its format and version (a store's meta.json, a cache's manifest).

    Missing file, invalid JSON, another format or another version: `ValueError` naming the file;
    `what` says what the directory should have been ("a token store").
    """
    if not file.is_file():
        raise ValueError(f"{file.parent}: not {what} (no {file.name}; missing or half-written)")
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"{file}: not {what} (format is not {fmt!r})")
    if d.get("version") != version:
        raise ValueError(f"{file}: format version {d.get('version')}, this code reads {version}")
    return d

"""Durable files and directories: the one home of write-to-temp, flush, rename.

Everything behemoth writes that a crash must not leave half-written (checkpoints, token stores, teacher
caches, pointers and manifests) goes through these helpers: the content is written under a temporary
hidden name beside its destination, flushed to disk (files and directories), and only then renamed into
place, so a reader either sees the complete thing under its final name or nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


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


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory`, and `directory` itself, so a rename never
    publishes unwritten data."""
    for root, dirs, files in os.walk(directory):
        for name in files + dirs:
            fsync_path(Path(root) / name)
    fsync_path(directory)


def temp_sibling(path: Path, tag: str = "tmp", unique: bool = True) -> Path:
    """A hidden name beside `path` for its content in the making. `unique=False` gives the same name to
    every process (the ranks of a distributed save write into one directory)."""
    suffix = f"-{os.getpid()}-{secrets.token_hex(4)}" if unique else ""
    return path.parent / f".{path.name}.{tag}{suffix}"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write a file atomically: `with atomic_file(path) as f:` write to `f` (binary); on success it is
    flushed and renamed over `path`, on any failure removed, and `path` is left as it was."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_file_atomically(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str: UTF-8), atomically (`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomically(path: Path, obj: dict) -> None:
    write_file_atomically(path, json.dumps(obj, indent=2) + "\n")


def remove_dir(path: Path) -> None:
    """Rename aside, then delete, so `path` never names a partly deleted directory."""
    doomed = temp_sibling(path, "old")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> Path:
    """Flush the finished directory `tmp` and rename it to `final`. An existing `final` is removed first,
    only now that its replacement is complete."""
    fsync_tree(tmp)
    if final.exists():
        remove_dir(final)
    os.rename(tmp, final)
    fsync_path(final.parent)
    return final


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write a directory atomically: `with atomic_dir(final) as tmp:` fill `tmp`; on success it is flushed
    and renamed to `final` (replacing what was there), on any failure it is removed and `final` is left
    untouched. Whether `final` may be replaced is the caller's decision, made before."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final, "partial")
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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

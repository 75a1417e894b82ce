"""Reading torch.distributed.checkpoint (DCP) files without running code from them.

DCP's `FileSystemReader` unpickles the `.metadata` file with `pickle.load`, so a crafted file could run
anything. `SafeFileSystemReader` unpickles it with `MetadataUnpickler`, which builds only the objects a DCP
metadata file is made of (the allow-list below); any other global is refused with a `CheckpointError`
naming the file and the global. The non-tensor entries of the data files (an optimizer's `param_groups`,
for one) are unpickled by DCP's planner with `torch.load(weights_only=False)`; the reader hands the planner
each only after `torch.load(weights_only=True)` accepted it, re-serialised from the accepted object.
Tensors are read by DCP itself with `torch.load(weights_only=True)`.

    dcp.load(state, storage_reader=safe_reader(path), no_dist=...)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import pathlib
import pickle
from typing import IO, Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from behemoth.checkpoint.convert import CheckpointError

__all__ = ["MetadataUnpickler", "SafeFileSystemReader", "allowed_globals", "load_metadata", "safe_reader"]

# What a DCP metadata pickle is made of, from torch 2.6 on: the `Metadata` dataclass, the storage metadata
# of each entry, `MetadataIndex` keys, and the file reader's `_StorageInfo` (file, offset, length) for each.
# Dataclasses pickle as class + state and enums as class + value, so no dataclass or enum helper is needed.
_METADATA_CLASSES = ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
_FILESYSTEM_CLASSES = ("_StorageInfo",)
_PATH_MODULES = ("pathlib", "pathlib._local")  # where Python 3.10 - 3.14 say their path classes live


@functools.cache
def allowed_globals() -> dict[tuple[str, str], Any]:
    """The (module, name) pairs a DCP metadata pickle may name, each with the object it stands for. Exact
    pairs only (no dotted names reaching further), resolved here rather than by importing what the file names.
    Derived from the globals of real `.metadata` files (model and optimizer states) and DCP's source."""
    table: dict[tuple[str, str], Any] = {}
    for module, names in ((dcp_metadata, _METADATA_CLASSES), (dcp_filesystem, _FILESYSTEM_CLASSES)):
        for name in names:
            if hasattr(module, name):  # a class a given torch version does not have is refused, not guessed
                table[(module.__name__, name)] = getattr(module, name)
    table[("torch", "Size")] = torch.Size  # chunk offsets and sizes, tensor sizes
    for name, value in vars(torch).items():  # a dtype pickles as its name in torch: torch.float32 -> "float32"
        if isinstance(value, (torch.dtype, torch.layout)):
            table[("torch", name)] = value
    # torch registers a reducer for layouts: torch.strided pickles as _get_layout("torch.strided"), here
    # a lookup by name in a table of torch's layouts (a bound method, which a pickle cannot alter)
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    table[("torch.serialization", "_get_layout")] = layouts.__getitem__
    table[("collections", "OrderedDict")] = collections.OrderedDict
    # StorageMeta.checkpoint_id: the writer's path object. One of the other system's flavour cannot be
    # made here (a WindowsPath on Linux), so it is read as the pure path of that flavour.
    native = type(pathlib.Path())
    paths = {"PurePosixPath": pathlib.PurePosixPath, "PureWindowsPath": pathlib.PureWindowsPath,
             "PosixPath": pathlib.PosixPath if native is pathlib.PosixPath else pathlib.PurePosixPath,
             "WindowsPath": pathlib.WindowsPath if native is pathlib.WindowsPath else pathlib.PureWindowsPath}
    for module in _PATH_MODULES:
        for name, cls in paths.items():
            table[(module, name)] = cls
    return table


def _shown(text: str, limit: int = 120) -> str:
    """`text` on one line, printable, and short enough for an error message."""
    text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return _shown(lines[0], 200) if lines else ""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only what `allowed_globals` lists; any other global raises `CheckpointError`
    naming `path` and the global, before anything of it is imported or called."""

    def __init__(self, file: IO[bytes], path: str | os.PathLike):
        super().__init__(file)
        self._path = path
        self._allowed = allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            pass
        raise CheckpointError(f"{self._path}: refused to unpickle global {_shown(f'{module}.{name}')} "
                              "(a DCP metadata file holds only checkpoint metadata classes)")


def _class_attributes(allowed: dict[tuple[str, str], Any]) -> dict[type, dict[str, Any]]:
    """The attributes of each allowed class (the other allowed objects have none a pickle could set)."""
    return {v: dict(vars(v)) for v in allowed.values() if isinstance(v, type)}


def _restore(before: dict[type, dict[str, Any]]) -> list[str]:
    """Undo attribute changes a pickle made to the allowed classes (its BUILD opcode can set attributes on a
    class object), returning the names of the classes changed."""
    changed = []
    for cls, attrs in before.items():
        now = vars(cls)
        if now.keys() == attrs.keys() and all(now[k] is v for k, v in attrs.items()):
            continue
        changed.append(cls.__qualname__)
        for k in [k for k in now if k not in attrs]:
            with contextlib.suppress(AttributeError, TypeError):
                delattr(cls, k)
        for k, v in attrs.items():
            if k not in now or now[k] is not v:
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(cls, k, v)
    return changed


def _escapes(relative_path: str) -> bool:
    """Whether a data file name from the metadata points outside the checkpoint directory."""
    parts = pathlib.PureWindowsPath(relative_path)  # splits on "/" and "\\", and sees drives and roots
    return not parts.parts or bool(parts.anchor) or ".." in parts.parts


def load_metadata(stream: IO[bytes], path: str | os.PathLike) -> Metadata:
    """The `Metadata` in a DCP `.metadata` file open as `stream`, unpickled by `MetadataUnpickler`; the file
    `path` is named in the one-line `CheckpointError` for a refused global, a damaged file, an object that is
    not DCP metadata, or a data file named outside the checkpoint directory."""
    allowed = allowed_globals()
    before = _class_attributes(allowed)
    try:
        metadata = MetadataUnpickler(stream, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle fails as any of several errors, none of which names the file
        raise CheckpointError(f"{path}: not a readable DCP metadata file ({type(e).__name__}: {_first_line(e)})"
                              ) from None
    finally:
        changed = _restore(before)
    if changed:
        raise CheckpointError(f"{path}: refused: the pickle sets attributes of class {', '.join(changed)}")
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    entries, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{path}: DCP Metadata without its entries or their storage")
    if not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise CheckpointError(f"{path}: DCP Metadata with a {type(metadata.storage_meta).__name__} storage_meta")
    for index, info in storage.items():
        name = getattr(index, "fqn", index)
        if not isinstance(info, dcp_filesystem._StorageInfo) or not isinstance(info.relative_path, str):
            raise CheckpointError(f"{path}: entry {_shown(str(name))} has no data file")
        if _escapes(info.relative_path):
            raise CheckpointError(f"{path}: entry {_shown(str(name))} names a data file outside the checkpoint "
                                  f"directory ({_shown(info.relative_path)})")
    return metadata


class _PlainBytes:
    """The planner DCP hands to `read_data`, except that a non-tensor entry reaches its `load_bytes` only
    after `torch.load(weights_only=True)` accepted it, and then as that object serialised again: the
    planner's own `torch.load(weights_only=False)` then reads bytes made here, never the file's."""

    def __init__(self, planner: Any, reader: SafeFileSystemReader):
        self._planner = planner
        self._reader = reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            info = self._reader.storage_data.get(read_item.storage_index)
            file = os.path.join(str(self._reader.path), info.relative_path) if info else str(self._reader.path)
            raise CheckpointError(f"{file}: entry {_shown(read_item.storage_index.fqn)} is not plain data, refused "
                                  f"({type(e).__name__}: {_weights_only_cause(e)})") from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


def _weights_only_cause(e: BaseException) -> str:
    """The line of a `weights_only` refusal that says what was refused (its first line only says that one was)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return _shown((named or lines or [""])[0], 200)


class SafeFileSystemReader(FileSystemReader):
    """DCP's local-file `FileSystemReader`, reading `.metadata` with `MetadataUnpickler` and handing its planner
    only non-tensor entries `torch.load(weights_only=True)` accepts; otherwise the parent's behaviour."""

    def __init__(self, path: str | os.PathLike, *args: Any, **kwargs: Any):
        super().__init__(path, *args, **kwargs)
        self._vetted: Metadata | None = None

    def _metadata_file(self, rank: int | None) -> Any:
        """The parent's metadata path: `.metadata`, or a rank's own `__<rank>.metadata` where torch has them."""
        get_path = getattr(self, "_get_metadata_path", None)
        if get_path is not None:
            return get_path(rank)
        if rank is not None:
            raise TypeError("this torch has no per-rank DCP metadata files")
        return self.fs.concat_path(self.path, ".metadata")

    def _read(self, rank: int | None) -> Metadata:
        path = self._metadata_file(rank)
        with self.fs.create_stream(path, "rb") as stream:
            return load_metadata(stream, path)

    def check(self) -> None:
        """Read and vet `.metadata` now (when there is one), keeping it for the first `read_metadata`: DCP
        catches an error from `read_metadata` and reports only that no metadata was found, so a refused
        file is better reported before `load` starts."""
        path = self._metadata_file(None)
        if os.path.isfile(path):
            self._vetted = self._read(None)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is None and self._vetted is not None:
            metadata, self._vetted = self._vetted, None
        else:
            metadata = self._read(rank)
        # as the parent: a checkpoint written before StorageMeta existed gets one, stamped with this load
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        self._vetted = None
        super().reset(checkpoint_id)

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, _PlainBytes(planner, self))


def safe_reader(path: str | os.PathLike) -> SafeFileSystemReader:
    """A DCP storage reader for the local directory `path` that runs no code from its files, for
    `dcp.load(..., storage_reader=safe_reader(path))`. Its `.metadata` is read and vetted here, so a refused
    or damaged one raises `CheckpointError` (naming the file) from this call."""
    reader = SafeFileSystemReader(os.fspath(path))
    reader.check()
    return reader

"""Raw text corpora on disk: which files, the documents in them, and a content fingerprint.

Formats, chosen by file extension:

* `.txt` (or `.txt.gz`): the whole file is one document, read as UTF-8 with line endings kept exactly.
  (Splitting on blank lines would silently cut documents that contain paragraphs.)
* `.jsonl` (or `.jsonl.gz`): one JSON object per line; the document is `obj[field]`, or, in a record
  without `field`, `obj["completion"]` (the prompt-completion format of TRL and of `behemoth
  synthesize`). Blank lines are skipped; a line that is not an object, lacks both, or holds a
  non-string there is an error naming the file, the line number and the field.
* `.parquet`: the string column `field`, read in record batches with pyarrow (an optional
  dependency, imported only when a parquet file is read).

A record may also carry a prompt (`prompt_field`, default "prompt": a JSONL key or a parquet column): the
document is then a `Prompted(prompt, text)`, the prompt before the text, and training masks the prompt out
of the loss (`data.packing` keeps each document's prompt length, `data.loader` the mask). A null or empty
prompt is no prompt; a text that already begins with its prompt is the whole document (the prompt is not
repeated, only masked).

Documents whose text is empty or whitespace-only, and null values (JSON `null`, parquet nulls), are
skipped: they would only add an end-of-text token. A corpus that yields no document at all is an
error. All bad input raises `ValueError` naming the file (and line or column where there is one).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet", ".txt.gz": "txt", ".jsonl.gz": "jsonl"}
PathSpec = str | os.PathLike | Iterable[str | os.PathLike]
COMPLETION = "completion"  # the text key of a prompt-completion record


class Prompted(NamedTuple):
    """A document whose `prompt` is context only: the model reads it but is not trained to write it."""

    prompt: str
    text: str


def as_text(doc: str | Prompted) -> str:
    """A document's whole text (prompt, then text): what a tokenizer is trained on."""
    return doc if isinstance(doc, str) else doc.prompt + doc.text


def file_format(path: Path) -> str | None:
    """'txt', 'jsonl' or 'parquet' from the file name (case-insensitive), None for anything else."""
    name = path.name.lower()
    for suffix, kind in FORMATS.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return kind
    return None


def resolve_paths(spec: PathSpec) -> list[Path]:
    """The corpus files named by `spec`: a path, a glob, a directory, or a list of these.

    A glob (`*`, `?`, `[`; `**` recurses) expands to its matching files, sorted; a directory to the
    supported files under it (recursively, sorted, hidden entries skipped). Order across the items
    of a list is kept and repeats are dropped. A spec that matches nothing, a missing path, or a file
    of an unsupported format raises `ValueError` naming it.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ValueError("no corpus paths given")
    out: list[Path] = []
    seen: set[Path] = set()
    for item in items:
        text = os.fspath(item)
        path = Path(text).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(f for f in path.rglob("*") if f.is_file() and file_format(f) is not None
                             and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not matches:
                raise ValueError(f"{text}: directory has no {', '.join(FORMATS)} files")
        elif any(c in text for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
            if not matches:
                raise ValueError(f"{text}: no files match")
        else:
            raise ValueError(f"{text}: no such file or directory")
        for f in matches:
            if file_format(f) is None:
                raise ValueError(f"{f}: unsupported file type (expected {', '.join(FORMATS)})")
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    return out


def iter_documents(paths: PathSpec, field: str = "text",
                   prompt_field: str | None = "prompt") -> Iterator[str | Prompted]:
    """The documents of the corpus `paths` (anything `resolve_paths` accepts), in file order: a string, or a
    `Prompted` for a record with a prompt (`prompt_field`; None reads no prompts).

    Paths are resolved and checked when this is called; the files are read lazily as the iterator
    advances, so a malformed line deep in a file raises only when it is reached.
    """
    files = resolve_paths(paths)
    return _iter_documents(files, field, prompt_field)


def _iter_documents(files: list[Path], field: str, prompt_field: str | None) -> Iterator[str | Prompted]:
    count = 0
    for f in files:
        kind = file_format(f)
        docs = (_read_txt(f) if kind == "txt" else _read_jsonl(f, field, prompt_field) if kind == "jsonl"
                else _read_parquet(f, field, prompt_field))
        for doc in docs:
            text = doc.text if isinstance(doc, Prompted) else doc
            if text is not None and text.strip():
                count += 1
                yield doc
    if count == 0:
        raise ValueError(f"no documents in {describe_files(files)} (files are empty or hold only blank text)")


def describe_files(files: list[Path]) -> str:
    """A short human-readable name for a list of files, for error messages."""
    if len(files) <= 3:
        return ", ".join(str(f) for f in files)
    return f"{files[0]}, {files[1]}, ... ({len(files)} files)"


def _open_text(f: Path) -> IO[str]:
    if f.name.lower().endswith(".gz"):
        return gzip.open(f, "rt", encoding="utf-8", newline="")
    return open(f, encoding="utf-8", newline="")


def _read_txt(f: Path) -> Iterator[str]:
    try:
        with _open_text(f) as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{f}: cannot read ({e})") from None
    yield text


def _read_jsonl(f: Path, field: str, prompt_field: str | None) -> Iterator[str | Prompted | None]:
    lineno = 0
    try:
        with _open_text(f) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{f}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                key = field if field in obj else COMPLETION if COMPLETION in obj else None
                if key is None:
                    keys = ", ".join(list(obj)[:8])
                    raise ValueError(f"{f}:{lineno}: no field {field!r} or {COMPLETION!r} (fields: {keys or 'none'})")
                value, prompt = obj[key], obj.get(prompt_field) if prompt_field else None
                for name, v in ((key, value), (prompt_field, prompt)):
                    if v is not None and not isinstance(v, str):
                        raise ValueError(f"{f}:{lineno}: field {name!r} is {type(v).__name__}, expected a string")
                yield _prompted(prompt, value)
    except UnicodeDecodeError as e:
        raise ValueError(f"{f}: not UTF-8 text near line {lineno + 1} ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{f}: cannot read ({e})") from None


def _prompted(prompt: str | None, text: str | None) -> str | Prompted | None:
    """A record's document: its text alone, or its prompt and the text after it (module docstring)."""
    if not prompt or text is None:
        return text
    return Prompted(prompt, text[len(prompt):] if text.startswith(prompt) else text)


def _read_parquet(f: Path, field: str, prompt_field: str | None) -> Iterator[str | Prompted | None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{f}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names and COMPLETION in schema.names:
        field = COMPLETION  # the prompt-completion format
    if field not in schema.names:
        raise ValueError(f"{f}: no column {field!r} (columns: {', '.join(schema.names[:8]) or 'none'})")
    columns = [field] + ([prompt_field] if prompt_field and prompt_field in schema.names else [])
    for name in columns:
        col_type = schema.field(name).type
        value_type = col_type.value_type if pa.types.is_dictionary(col_type) else col_type
        is_string = pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
        is_string = is_string or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(value_type))
        if not is_string:
            raise ValueError(f"{f}: column {name!r} has type {col_type}, expected strings")
    try:
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            texts = batch.column(0).to_pylist()
            prompts = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            yield from (_prompted(p, t) for t, p in zip(texts, prompts, strict=True))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{f}: corrupt parquet data ({e})") from None


def corpus_fingerprint(paths: PathSpec) -> str:
    """sha256 hex over (file name, size, sha256 of the content) of each corpus file, in order.

    File names, not full paths, go in, so moving a corpus directory keeps its fingerprint; any
    change to a file's bytes, or to which files are listed and in what order, changes it.
    """
    h = hashlib.sha256()
    for f in resolve_paths(paths):
        content = hashlib.sha256()
        size = 0
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    content.update(chunk)
                    size += len(chunk)
        except OSError as e:
            raise ValueError(f"{f}: cannot read ({e})") from None
        h.update(json.dumps([f.name, size, content.hexdigest()]).encode() + b"\n")
    return h.hexdigest()

"""Tokenized corpora: one flat token stream plus document start offsets, memory-mapped from disk.

A `TokenStore` directory holds

* `tokens.bin`: every document's tokens followed by EOS, concatenated (uint16 when the vocabulary
  fits in 65535 ids, else uint32), raw little-endian;
* `doc_starts.bin`: int64 offset of each document's first token (`doc_starts[0] == 0`; document i
  spans `[doc_starts[i], doc_starts[i + 1])`, the last one ends at `num_tokens`);
* `prompt_lens.bin` (only where some document has a prompt, `corpus.Prompted`): int32 per document, the
  number of its leading tokens that are prompt (0 for a plain document). The loader does not train on them;
* `meta.json`: format, dtype, counts, and the tokenizer's fingerprint and EOS id.

Stores are written into a temporary sibling directory and renamed into place, `meta.json` last, so
a crash never leaves something under the final name that reads as complete.

`tokenize_corpus` tokenizes a corpus once into `cache_dir/<key>/{train,val}`, where the key hashes
the corpus content, the tokenizer, the field and the split settings: the same inputs reuse the cache
(nothing is tokenized), any change gets a fresh directory. The validation split is a deterministic
set of whole documents: document i goes to validation when a hash of (seed, i) falls below
`val_fraction`; when that leaves validation empty (small corpora) the last training document moves
there, so a corpus of two or more documents always has at least one validation document (and at
least one training document).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from behemoth.data.corpus import PathSpec, Prompted, corpus_fingerprint, iter_documents, resolve_paths
from behemoth.data.tokenizer import Tokenizer
from behemoth.fsutil import fsync_tree, publish_dir, read_format_json, remove_dir, temp_sibling, write_json_atomically

FORMAT = "behemoth-tokens"
FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
DOC_STARTS_FILE = "doc_starts.bin"
PROMPT_LENS_FILE = "prompt_lens.bin"
META_FILE = "meta.json"
_ENCODE_CHUNK = 256  # documents per `encode_batch` call

Document = str | Sequence[int] | Prompted  # text, token ids already, or a prompt and its text (EOS is appended)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class TokenStore:
    """A tokenized corpus on disk, memory-mapped: tokens (uint16 when vocab <= 65535 else uint32) and
    document start offsets (int64), and each document's prompt length (int32; None when no document has one).

    `tokens`, `doc_starts` and `prompt_lens` are read-only numpy arrays (memory maps for a store opened from
    disk, plain arrays for `build_in_memory`). `directory` is None for an in-memory store.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, meta: dict | None = None,
                 directory: Path | None = None, prompt_lens: np.ndarray | None = None) -> None:
        where = str(directory) if directory is not None else "token store"
        if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"{where}: tokens must be a 1-D uint16/uint32 array, got {tokens.dtype} {tokens.shape}")
        if doc_starts.ndim != 1 or doc_starts.dtype != np.int64:
            raise ValueError(f"{where}: doc_starts must be a 1-D int64 array, got {doc_starts.dtype}")
        if (len(tokens) == 0) != (len(doc_starts) == 0):
            raise ValueError(f"{where}: {len(tokens)} tokens but {len(doc_starts)} documents")
        if len(doc_starts) and (doc_starts[0] != 0 or doc_starts[-1] >= len(tokens)
                                or (len(doc_starts) > 1 and not bool(np.all(np.diff(doc_starts) > 0)))):
            raise ValueError(f"{where}: doc_starts must start at 0 and increase strictly below num_tokens")
        if prompt_lens is not None:
            lengths = np.diff(np.append(np.asarray(doc_starts), len(tokens)))
            if prompt_lens.shape != doc_starts.shape or (len(prompt_lens) and (
                    prompt_lens.min() < 0 or bool(np.any(prompt_lens >= lengths)))):
                raise ValueError(f"{where}: prompt_lens must give each document a prompt length in [0, its length)")
        self.prompt_lens = prompt_lens
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.meta = dict(meta or {})
        self.directory = directory

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))

    @property
    def num_docs(self) -> int:
        return int(len(self.doc_starts))

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.meta.get("tokenizer")

    def document(self, i: int) -> np.ndarray:
        """The tokens of document `i`, its final EOS included."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range ({self.num_docs} documents)")
        i %= self.num_docs
        end = self.doc_starts[i + 1] if i + 1 < self.num_docs else self.num_tokens
        return np.asarray(self.tokens[self.doc_starts[i]:end])

    def prompt_len(self, i: int) -> int:
        """How many of document `i`'s leading tokens are prompt (not trained on)."""
        return 0 if self.prompt_lens is None else int(self.prompt_lens[i])

    def doc_index(self, offsets: np.ndarray) -> np.ndarray:
        """The document each token offset belongs to (int64, same shape as `offsets`)."""
        return np.searchsorted(self.doc_starts, offsets, side="right").astype(np.int64) - 1

    def __repr__(self) -> str:
        where = f"{self.directory}, " if self.directory is not None else ""
        return f"TokenStore({where}{self.num_tokens:,} tokens, {self.num_docs:,} documents, {self.tokens.dtype})"

    # ---- disk ----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, documents: Iterable[Document], tokenizer: Tokenizer, directory: str | os.PathLike) -> TokenStore:
        """Tokenize `documents` (each gets EOS appended) into a new store at `directory`.

        An existing store at `directory` is replaced only once the new one is complete.
        """
        directory = Path(directory)
        _check_replaceable(directory)  # before the work, not after
        tmp = temp_sibling(directory)
        writer = None
        try:
            writer = _Writer(tmp, tokenizer)
            for ids, prompt_len in encode_prompted(documents, tokenizer):
                writer.add(ids, prompt_len)
            writer.finish()
            _replace_dir(tmp, directory)
        finally:
            if writer is not None:
                writer.close()
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TokenStore:
        """Memory-map a store written by `build` or `tokenize_corpus`. Missing, half-written or
        mismatched files raise `ValueError` naming them."""
        directory = Path(directory)
        meta_file = directory / META_FILE
        meta = read_format_json(meta_file, FORMAT, FORMAT_VERSION, "a token store")
        try:
            dtype = np.dtype(meta["dtype"])
            num_tokens, num_docs = int(meta["num_tokens"]), int(meta["num_docs"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_file}: bad or missing field ({e})") from None
        if dtype not in (np.uint16, np.uint32):
            raise ValueError(f"{meta_file}: dtype {dtype} (expected uint16 or uint32)")
        tokens = _map(directory / TOKENS_FILE, dtype, num_tokens)
        doc_starts = _map(directory / DOC_STARTS_FILE, np.dtype(np.int64), num_docs)
        prompts = _map(directory / PROMPT_LENS_FILE, np.dtype(np.int32), num_docs) if meta.get("prompted") else None
        return cls(tokens, doc_starts, meta=meta, directory=directory, prompt_lens=prompts)


def build_in_memory(documents: Iterable[Document], tokenizer: Tokenizer) -> TokenStore:
    """A `TokenStore` with the same layout as `TokenStore.build`, held in memory (for generated data)."""
    dtype = token_dtype(tokenizer.vocab_size)
    encoded = list(encode_prompted(documents, tokenizer))
    parts = [ids for ids, _ in encoded]
    prompts = np.array([n for _, n in encoded], dtype=np.int32)
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if parts else np.zeros(0, np.int64)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    prompted = int((prompts > 0).sum())
    return TokenStore(tokens, doc_starts, meta=_meta(tokenizer, len(tokens), len(parts), prompted),
                      prompt_lens=prompts if prompted else None)


def encode_documents(documents: Iterable[Document], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Each document's token ids with EOS appended, in order, as arrays of the store's dtype.

    A document is text, a sequence of token ids (already tokenized; ids must be < vocab_size), or a
    `Prompted` (its prompt's tokens, then its text's: each encoded on its own, as a prompt is at generation).
    """
    return (ids for ids, _ in encode_prompted(documents, tokenizer))


def encode_prompted(documents: Iterable[Document], tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, int]]:
    """`encode_documents` with each document's prompt length (0 for a document without a prompt)."""
    dtype = token_dtype(tokenizer.vocab_size)
    chunk: list[Document] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            yield from _encode_chunk(chunk, tokenizer, dtype)
            chunk = []
    if chunk:
        yield from _encode_chunk(chunk, tokenizer, dtype)


def _encode_chunk(chunk: list[Document], tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[tuple[np.ndarray, int]]:
    texts: list[str] = []  # every piece of text in the chunk, encoded in one batch
    for d in chunk:
        texts += [d] if isinstance(d, str) else [d.prompt, d.text] if isinstance(d, Prompted) else []
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    eos = tokenizer.eos_id
    for doc in chunk:
        if isinstance(doc, str):
            yield np.array([*next(encoded), eos], dtype=dtype), 0
        elif isinstance(doc, Prompted):
            prompt, text = next(encoded), next(encoded)
            yield np.array([*prompt, *text, eos], dtype=dtype), len(prompt)
        else:
            arr = np.asarray(doc)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"a document must be a string or a 1-D sequence of token ids, got {arr.dtype} "
                                 f"{arr.shape}")
            if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
                raise ValueError(f"token ids must lie in [0, {tokenizer.vocab_size}), got {arr.min()}..{arr.max()}")
            yield np.append(arr, eos).astype(dtype), 0


# ---- the cached, split corpus --------------------------------------------------------------------

def _cache_key(corpus_fp: str, tokenizer: Tokenizer, field: str, val_fraction: float, seed: int,
               prompt_field: str | None) -> str:
    material = {"format": FORMAT, "version": FORMAT_VERSION, "corpus": corpus_fp, "tokenizer": tokenizer.fingerprint,
                "field": field, "prompt_field": prompt_field, "val_fraction": float(val_fraction), "seed": int(seed)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def in_validation(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` is hashed into the validation split (before the at-least-one rule)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def tokenize_corpus(paths: PathSpec, tokenizer: Tokenizer, cache_dir: str | os.PathLike, field: str = "text",
                    val_fraction: float = 0.01, seed: int = 0,
                    prompt_field: str | None = "prompt") -> tuple[TokenStore, TokenStore]:
    """Tokenize the corpus `paths` into (train, val) stores under `cache_dir`, or reuse the cached ones.

    The cache key covers the corpus content (`corpus_fingerprint`), `tokenizer.fingerprint`, `field`,
    `prompt_field`, `val_fraction` and `seed`. `val_fraction=0` gives an empty validation store.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    files = resolve_paths(paths)
    corpus_fp = corpus_fingerprint(files)
    key = _cache_key(corpus_fp, tokenizer, field, val_fraction, seed, prompt_field)
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if final.exists():
        try:
            return _open_split(final)
        except ValueError as e:  # only possible if something outside this code damaged the directory
            warnings.warn(f"{final}: unusable tokenized-corpus cache, rebuilding ({e})", stacklevel=2)
            remove_dir(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    try:
        counts = _split_into(tmp, encode_prompted(iter_documents(files, field, prompt_field), tokenizer), tokenizer,
                             seed, val_fraction)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "key": key, "corpus": corpus_fp,
                "files": [str(f) for f in files], "field": field, "val_fraction": val_fraction, "seed": seed,
                "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size, **counts,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        write_json_atomically(tmp / META_FILE, meta)  # its presence under the final name marks the cache complete
        fsync_tree(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).is_file():  # not a concurrent run finishing first: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _open_split(final)


def _split_into(directory: Path, docs: Iterator[tuple[np.ndarray, int]], tokenizer: Tokenizer, seed: int,
                val_fraction: float) -> dict[str, dict[str, int]]:
    """Write `docs` ((token array, prompt length), in corpus order) into `directory/train` and `directory/val` by
    `in_validation`; returns each split's counts. The last document of each split is held back until the
    end, so that one can move to the other split when a split would otherwise be empty; documents stay in
    corpus order within a split."""
    writers = {"train": _Writer(directory / "train", tokenizer), "val": _Writer(directory / "val", tokenizer)}
    try:
        held: dict[str, tuple[np.ndarray, int] | None] = {"train": None, "val": None}
        for i, ids in enumerate(docs):
            split = "val" if val_fraction > 0 and in_validation(i, seed, val_fraction) else "train"
            if held[split] is not None:
                writers[split].add(*held[split])
            held[split] = ids
        if held["train"] is None and held["val"] is not None and writers["train"].num_docs == 0:
            held["train"], held["val"] = held["val"], None
        if val_fraction > 0 and held["val"] is None and writers["val"].num_docs == 0 and writers["train"].num_docs:
            held["val"], held["train"] = held["train"], None
        for split, ids in held.items():
            if ids is not None:
                writers[split].add(*ids)
        for w in writers.values():
            w.finish()
    finally:
        for w in writers.values():
            w.close()
    return {split: {"num_tokens": w.num_tokens, "num_docs": w.num_docs} for split, w in writers.items()}


def _open_split(directory: Path) -> tuple[TokenStore, TokenStore]:
    if not (directory / META_FILE).is_file():
        raise ValueError(f"{directory}: incomplete tokenized corpus (no {META_FILE})")
    return TokenStore.open(directory / "train"), TokenStore.open(directory / "val")


# ---- writing -------------------------------------------------------------------------------------

class _Writer:
    """Appends documents to `tokens.bin` / `doc_starts.bin` in a fresh directory; `finish` writes meta.json."""

    def __init__(self, directory: Path, tokenizer: Tokenizer) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._tokens = open(directory / TOKENS_FILE, "wb")
        self._starts = open(directory / DOC_STARTS_FILE, "wb")
        self._prompts = open(directory / PROMPT_LENS_FILE, "wb")  # removed at `finish` if no document has a prompt
        self.num_tokens = 0
        self.num_docs = 0
        self.prompted = 0  # documents with a prompt

    def add(self, ids: np.ndarray, prompt_len: int = 0) -> None:
        self._starts.write(np.int64(self.num_tokens).tobytes())
        self._tokens.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._prompts.write(np.int32(prompt_len).tobytes())
        self.num_tokens += len(ids)
        self.num_docs += 1
        self.prompted += prompt_len > 0

    def finish(self) -> None:
        for f in (self._tokens, self._starts, self._prompts):
            f.flush()
            os.fsync(f.fileno())
        self.close()
        if not self.prompted:
            (self.directory / PROMPT_LENS_FILE).unlink()
        write_json_atomically(self.directory / META_FILE,
                              _meta(self.tokenizer, self.num_tokens, self.num_docs, self.prompted))

    def close(self) -> None:
        self._tokens.close()
        self._starts.close()
        self._prompts.close()


def _meta(tokenizer: Tokenizer, num_tokens: int, num_docs: int, prompted: int = 0) -> dict:
    """A store's meta.json; `prompted` (documents with a prompt) only where there are some, so that a store of plain
    text reads as it did before prompts existed."""
    extra = {"prompted": int(prompted)} if prompted else {}
    return {"format": FORMAT, "version": FORMAT_VERSION, "dtype": token_dtype(tokenizer.vocab_size).name,
            "num_tokens": int(num_tokens), "num_docs": int(num_docs), "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "tokenizer": tokenizer.fingerprint, **extra}


def _map(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if not file.is_file():
        raise ValueError(f"{file}: missing")
    size, want = file.stat().st_size, count * dtype.itemsize
    if size != want:
        raise ValueError(f"{file}: {size} bytes, but meta.json says {count} x {dtype} = {want} (truncated?)")
    if count == 0:
        return np.zeros(0, dtype)  # numpy cannot memory-map an empty file
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def _check_replaceable(final: Path) -> None:
    """`final` may be (re)written: absent, an empty directory, or a token store."""
    if final.exists() and not (final.is_dir() and ((final / META_FILE).is_file() or not any(final.iterdir()))):
        raise ValueError(f"{final}: exists and is not a token store; not overwriting it")


def _replace_dir(new: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        _check_replaceable(final)
    publish_dir(new, final)

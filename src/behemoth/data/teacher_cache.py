"""A teacher cache directory: a teacher's top-k log-probabilities over a token store, in shards of encoded
records (`teacher_codec`) with an index and a manifest; written resumably, read memory-mapped, checked
against the run that trains from it. The format is specified in docs/teacher_cache.md.

A shard is written to temporary files, flushed, renamed and only then listed in the manifest (itself
replaced atomically), so a reader never takes a torn shard; a resumed writer continues after the last
listed shard. Every read checks the files' sizes and checksums and raises `ValueError` naming the file.
"""

from __future__ import annotations

import datetime
import math
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from behemoth.data.fingerprint import data_fingerprint
from behemoth.data.teacher_codec import ID_CHUNK, VALUE_CODECS, VALUE_RANGE, decode_record, encode_record
from behemoth.fsutil import fsync_path, read_format_json, write_file_atomically, write_json_atomically
from behemoth.progress import format_duration

FORMAT = "behemoth-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


# ---------------------------------------------------------------------------------------------------
# Files


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def _write_manifest(directory: Path, manifest: dict) -> None:
    write_json_atomically(directory / MANIFEST, manifest)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a cache directory; `ValueError` naming the file if it is missing or not ours."""
    file = Path(directory) / MANIFEST
    m = read_format_json(file, FORMAT, FORMAT_VERSION, "a teacher cache")
    missing = [k for k in SETTINGS + ("shards", "complete") if k not in m]
    if missing:
        raise ValueError(f"{file}: missing field(s) {', '.join(missing)}")
    return m


# The manifest fields that define a cache: a resumed writer must be given the same ones.
SETTINGS = ("teacher", "tokenizer", "data", "num_tokens", "seq_len", "num_windows", "top_k", "temperature",
            "vocab_size", "values", "value_range", "id_chunk", "windows_per_shard")


def _index_bytes(offsets: list[int], crcs: list[int]) -> bytes:
    return np.asarray(offsets, dtype="<u8").tobytes() + np.asarray(crcs, dtype="<u4").tobytes()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------
# Writing

# targets_fn(batch) -> (ids [B*S, k], log-probs [B*S, k]) of the batch's windows, row-major
TargetsFn = Callable[[object], tuple[np.ndarray, np.ndarray]]


def write_cache(out_dir: str | os.PathLike, store, seq_len: int, targets_fn: TargetsFn, *, top_k: int,
                temperature: float, vocab_size: int, teacher_fingerprint: str, tokenizer, values: str = "u8",
                windows_per_shard: int = 1024, batch_size: int = 8, resume: bool = False,
                say: Callable[[str], None] = print, progress_every: float = 10.0, info: dict | None = None) -> dict:
    """Run `targets_fn` over every window of `store` in stream order and write the cache to `out_dir`.

    `tokenizer` is the teacher's (saved in the cache; its fingerprint must match the store's). Windows
    are batched `batch_size` at a time from each shard's start, so a resumed run computes exactly the
    batches an uninterrupted one would. `resume`: continue a cache with the same settings after its last
    finished shard (an absent or empty `out_dir` starts afresh); without it an existing cache is an
    error. Returns the final manifest. `info`: extra fields recorded in the manifest (teacher path...).
    """
    out = Path(out_dir)
    settings = _settings(store, seq_len, top_k, temperature, vocab_size, teacher_fingerprint, tokenizer, values,
                         windows_per_shard, batch_size)
    num_windows = settings["num_windows"]
    manifest = _start(out, settings, resume, say)
    if manifest is None:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, **settings, "positions": num_windows * seq_len,
                    "num_docs": store.num_docs, "batch_size": batch_size, **(info or {}), "shards": [],
                    "complete": False, "bytes": 0, "bytes_per_token": None, "mean_captured_mass": None,
                    "created": _now()}
        write_file_atomically(out / TOKENIZER, tokenizer.hf.to_str(pretty=True))
        _write_manifest(out, manifest)
    if manifest["complete"]:
        say(f"{out}: already complete")
        say(_summary(out, manifest))
        return manifest
    num_shards = -(-num_windows // windows_per_shard)
    progress = _Progress(sum(s["windows"] for s in manifest["shards"]), num_windows, seq_len, progress_every, say)
    for i in range(len(manifest["shards"]), num_shards):
        first, stop = i * windows_per_shard, min((i + 1) * windows_per_shard, num_windows)
        shard = _write_shard(out, shard_name(i), first, stop, store, settings, targets_fn, batch_size, progress)
        manifest["shards"].append(shard)
        manifest["bytes"] = sum(s["bytes"] + _index_size(s["windows"]) for s in manifest["shards"])
        manifest["updated"] = _now()
        _write_manifest(out, manifest)  # only now is the shard part of the cache
        say(f"shard {i + 1}/{num_shards} written ({shard['bin']}, {shard['bytes']:,} bytes); " + progress.line())
    positions = num_windows * seq_len
    manifest["complete"] = True
    manifest["bytes_per_token"] = manifest["bytes"] / positions
    manifest["mean_captured_mass"] = sum(s["mass_sum"] for s in manifest["shards"]) / positions
    manifest["updated"] = _now()
    _write_manifest(out, manifest)
    say(_summary(out, manifest))
    return manifest


def _settings(store, seq_len: int, top_k: int, temperature: float, vocab_size: int, teacher_fingerprint: str,
              tokenizer, values: str, windows_per_shard: int, batch_size: int) -> dict:
    """The manifest fields that define a cache (`SETTINGS`), after checking every option (`ValueError`)."""
    if values not in VALUE_CODECS:
        raise ValueError(f"values={values!r}: expected one of {', '.join(VALUE_CODECS)}")
    for name, v in (("seq_len", seq_len), ("top_k", top_k), ("windows_per_shard", windows_per_shard),
                    ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary ({vocab_size})")
    if store.tokenizer_fingerprint not in (None, tokenizer.fingerprint):
        raise ValueError("the token store was not made with the teacher's tokenizer")
    num_windows = max(store.num_tokens - 1, 0) // seq_len
    if num_windows < 1:
        raise ValueError(f"{store.num_tokens} tokens, too few for one window of seq_len + 1 = {seq_len + 1}")
    return {"teacher": teacher_fingerprint, "tokenizer": tokenizer.fingerprint, "data": data_fingerprint(store),
            "num_tokens": store.num_tokens, "seq_len": seq_len, "num_windows": num_windows, "top_k": top_k,
            "temperature": float(temperature), "vocab_size": int(vocab_size), "values": values,
            "value_range": VALUE_RANGE if values == "u8" else None, "id_chunk": ID_CHUNK,
            "windows_per_shard": windows_per_shard}


def _write_shard(out: Path, name: str, first: int, stop: int, store, settings: dict, targets_fn: TargetsFn,
                 batch_size: int, progress: _Progress) -> dict:
    """Windows first..stop-1 as one shard: records into `<name>.bin.tmp` (flushed), the index written
    atomically, then the shard renamed into place. Returns its manifest entry (not yet listed: until the
    manifest lists it, a reader ignores the shard)."""
    from behemoth.data.loader import window_batch

    S, k, V, values = settings["seq_len"], settings["top_k"], settings["vocab_size"], settings["values"]
    tmp_bin = out / f"{name}.bin.tmp"  # left behind by a killed run: removed when it resumes
    offsets, crcs, mass_sum = [0], [], 0.0
    with open(tmp_bin, "wb") as f:
        for b0 in range(first, stop, batch_size):
            windows = np.arange(b0, min(b0 + batch_size, stop), dtype=np.int64)
            ids, lps = targets_fn(window_batch(store, S, windows))
            ids = np.asarray(ids).reshape(len(windows), S, k)
            lps = np.asarray(lps, dtype=np.float32).reshape(len(windows), S, k)
            mass_sum += float(np.exp(lps.astype(np.float64)).sum())
            for w in range(len(windows)):
                rec = encode_record(ids[w], lps[w], V, values)
                f.write(rec)
                offsets.append(offsets[-1] + len(rec))
                crcs.append(zlib.crc32(rec))
            progress.advance(len(windows))
        f.flush()
        os.fsync(f.fileno())
    index = _index_bytes(offsets, crcs)
    write_file_atomically(out / f"{name}.idx", index)
    os.replace(tmp_bin, out / f"{name}.bin")
    fsync_path(out)
    return {"bin": f"{name}.bin", "idx": f"{name}.idx", "first_window": first, "windows": stop - first,
            "bytes": offsets[-1], "index_crc32": zlib.crc32(index), "mass_sum": mass_sum}


class _Progress:
    """Windows done of a cache (those of earlier runs included), the rate of this run, said every
    `every` seconds."""

    def __init__(self, done_before: int, total: int, seq_len: int, every: float, say: Callable[[str], None]):
        self.done_before, self.total, self.seq_len, self.every, self.say = done_before, total, seq_len, every, say
        self.done_now, self.t0 = 0, time.perf_counter()
        self.last_say = self.t0

    def advance(self, windows: int) -> None:
        self.done_now += windows
        if time.perf_counter() - self.last_say >= self.every:
            self.last_say = time.perf_counter()
            self.say(self.line())

    def line(self) -> str:
        done, elapsed = self.done_before + self.done_now, time.perf_counter() - self.t0
        rate = self.done_now * self.seq_len / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - done) * self.seq_len / rate if rate > 0 else float("nan")
        return (f"{done:,}/{self.total:,} windows ({100 * done / self.total:.1f}%), {rate:,.0f} tokens/s, "
                f"ETA {format_duration(eta)}")


def _summary(out: Path, m: dict) -> str:
    return (f"wrote {out}: {m['positions']:,} tokens in {len(m['shards'])} shard(s), {m['bytes_per_token']:.1f} "
            f"bytes/token, mean teacher mass captured {m['mean_captured_mass']:.4f} (k={m['top_k']}, temperature "
            f"{m['temperature']:g}, {m['values']} values)")


def _index_size(windows: int) -> int:
    return 8 * (windows + 1) + 4 * windows


def check_out_dir(out_dir: str | os.PathLike, resume: bool) -> None:
    """Whether a cache may be written to `out_dir` (before any work): absent or empty, or (with `resume`)
    a cache; `ValueError` otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if not (out / MANIFEST).is_file():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out}: exists, is not empty and holds no {MANIFEST}; not writing a cache into it")
    elif not resume:
        raise ValueError(f"{out}: already holds a teacher cache; pass --resume to continue it or choose another "
                         "--out")
    else:
        read_manifest(out)


def _start(out: Path, settings: dict, resume: bool, say) -> dict | None:
    """The manifest to continue (resume), or None to start afresh; removes unlisted shard files."""
    check_out_dir(out, resume)
    if not (out / MANIFEST).is_file():
        out.mkdir(parents=True, exist_ok=True)
        return None
    manifest = read_manifest(out)
    for key in SETTINGS:
        if manifest[key] != settings[key]:
            raise ValueError(f"{out / MANIFEST}: cannot resume: {key} differs (cache: {_short(manifest[key])}, "
                             f"now: {_short(settings[key])}); use the same teacher, data and options or another "
                             "--out")
    listed = {s[kind] for s in manifest["shards"] for kind in ("bin", "idx")}
    for f in out.iterdir():
        if f.name.lstrip(".").startswith("shard_") and f.name not in listed:
            f.unlink()  # half-written: a temporary file, or a shard renamed but never listed
    for s in manifest["shards"]:
        _check_shard(out, s)
    say(f"resuming {out}: {sum(s['windows'] for s in manifest['shards']):,}/{settings['num_windows']:,} windows "
        f"in {len(manifest['shards'])} finished shard(s)")
    return manifest


def _short(v) -> str:
    return repr(v[:12] + "...") if isinstance(v, str) and len(v) > 16 else repr(v)


def _check_shard(directory: Path, s: dict) -> tuple[np.ndarray, np.ndarray]:
    """A listed shard's (offsets [n + 1], crc32 [n]), after checking both files against the manifest."""
    bin_file, idx_file = directory / s["bin"], directory / s["idx"]
    n = int(s["windows"])
    for f, want in ((bin_file, int(s["bytes"])), (idx_file, _index_size(n))):
        if not f.is_file():
            raise ValueError(f"{f}: missing (listed in {MANIFEST})")
        if f.stat().st_size != want:
            raise ValueError(f"{f}: {f.stat().st_size} bytes, {MANIFEST} says {want} (truncated or corrupt)")
    raw = idx_file.read_bytes()
    if zlib.crc32(raw) != s["index_crc32"]:
        raise ValueError(f"{idx_file}: checksum mismatch (corrupt)")
    offsets = np.frombuffer(raw[:8 * (n + 1)], dtype="<u8").astype(np.int64)
    crcs = np.frombuffer(raw[8 * (n + 1):], dtype="<u4")
    if offsets[0] != 0 or offsets[-1] != int(s["bytes"]) or (np.diff(offsets) <= 0).any():
        raise ValueError(f"{idx_file}: offsets do not describe {s['bin']} (corrupt)")
    return offsets, crcs


# ---------------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """A finished cache, opened for training: `targets(offsets)` gives the teacher's top-k of a batch.

    `open` checks the manifest, every listed shard's size and index checksum; each record's crc32 is
    checked when it is read. Shards are memory-mapped, so opening is cheap whatever the cache's size.
    """

    def __init__(self, directory: Path, manifest: dict, index: list[tuple[np.ndarray, np.ndarray]]):
        self.directory, self.manifest, self._index = directory, manifest, index
        self.seq_len, self.top_k = int(manifest["seq_len"]), int(manifest["top_k"])
        self.vocab_size, self.values = int(manifest["vocab_size"]), manifest["values"]
        self.temperature, self.num_windows = float(manifest["temperature"]), int(manifest["num_windows"])
        self._firsts = np.array([s["first_window"] for s in manifest["shards"]], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TeacherCache:
        directory = Path(directory)
        m = read_manifest(directory)
        if not m["complete"]:
            done = sum(s["windows"] for s in m["shards"])
            raise ValueError(f"{directory / MANIFEST}: incomplete cache ({done:,} of {m['num_windows']:,} windows); "
                             "finish it with behemoth distill-cache --resume")
        expect = 0
        for s in m["shards"]:
            if s["first_window"] != expect:
                raise ValueError(f"{directory / MANIFEST}: shards do not cover the windows in order (corrupt)")
            expect += s["windows"]
        if expect != m["num_windows"]:
            raise ValueError(f"{directory / MANIFEST}: shards cover {expect} of {m['num_windows']} windows (corrupt)")
        return cls(directory, m, [_check_shard(directory, s) for s in m["shards"]])

    def tokenizer(self):
        from behemoth.data.tokenizer import Tokenizer

        return Tokenizer.load(self.directory / TOKENIZER)

    def __repr__(self) -> str:
        return (f"TeacherCache({self.directory}, {self.num_windows:,} windows x {self.seq_len}, k={self.top_k}, "
                f"temperature={self.temperature:g}, {self.values})")

    def _record(self, window: int) -> tuple[np.ndarray, Path]:
        """The bytes of one window's record (checksum verified) and its shard file."""
        shard = int(np.searchsorted(self._firsts, window, side="right")) - 1
        s = self.manifest["shards"][shard]
        offsets, crcs = self._index[shard]
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.directory / s["bin"], dtype=np.uint8, mode="r")
        i = window - s["first_window"]
        rec = np.array(self._maps[shard][offsets[i]:offsets[i + 1]])
        if zlib.crc32(rec) != int(crcs[i]):
            raise ValueError(f"{self.directory / s['bin']}: record of window {window} fails its checksum (corrupt)")
        return rec, self.directory / s["bin"]

    def read_windows(self, windows) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n, S, k], log-probs float32 [n, S, k]) of windows (ids ascending per position)."""
        windows = np.asarray(windows, dtype=np.int64).reshape(-1)
        if len(windows) and (windows.min() < 0 or windows.max() >= self.num_windows):
            raise ValueError(f"window out of range (the cache holds {self.num_windows} windows)")
        S, k = self.seq_len, self.top_k
        ids = np.empty((len(windows), S, k), dtype=np.int64)
        lps = np.empty((len(windows), S, k), dtype=np.float32)
        for j, w in enumerate(windows.tolist()):
            rec, file = self._record(w)
            ids[j], lps[j] = decode_record(rec, S, k, self.vocab_size, self.values, where=f"{file} (window {w})")
        return ids, lps

    def targets(self, offsets, top_k: int | None = None, vocab_size: int | None = None, device=None):
        """(ids [B*S, k'], log-probs [B*S, k']) tensors of the windows starting at stream `offsets` [B]
        (`Batch.offsets`): the sparse teacher targets (`train.kd.TopK`) of a batch.

        `top_k` < k keeps each position's top_k largest entries (the teacher's top-k' is part of its top-k).
        Ids >= `vocab_size` (a teacher vocabulary padded beyond the student's) become absent entries."""
        import torch

        offs = np.asarray(offsets.cpu() if hasattr(offsets, "cpu") else offsets, dtype=np.int64).reshape(-1)
        if (offs % self.seq_len).any():
            raise ValueError(f"batch offsets {offs.tolist()} are not window starts of seq_len {self.seq_len}")
        ids, lps = self.read_windows(offs // self.seq_len)
        ids_NK = torch.from_numpy(ids.reshape(-1, self.top_k))
        lp_NK = torch.from_numpy(lps.reshape(-1, self.top_k))
        if top_k is not None and top_k < self.top_k:
            lp_NK, pick = lp_NK.topk(top_k, dim=-1)
            ids_NK = ids_NK.gather(1, pick)
        if vocab_size is not None and vocab_size < self.vocab_size:
            padded = ids_NK >= vocab_size
            lp_NK = lp_NK.masked_fill(padded, float("-inf"))
            ids_NK = ids_NK.masked_fill(padded, 0)
        if device is not None:
            ids_NK, lp_NK = ids_NK.to(device, non_blocking=True), lp_NK.to(device, non_blocking=True)
        return ids_NK, lp_NK

    def validate(self, *, tokenizer_fingerprint: str, store, seq_len: int, vocab_size: int, top_k: int,
                 temperature: float) -> None:
        """Check the cache against a student run (its tokenizer and training `store`); a one-line
        `ValueError` naming the field otherwise.

        tokenizer and data (token count, then fingerprint) must be the run's; seq_len == data.seq_len; the
        teacher's vocabulary at least the student's (larger: padding, dropped); distill.top_k 0 (use the
        cache's k) or <= k; distill.temperature == the cache's, since top-k log-probs cannot be re-tempered
        exactly (the mass outside the top-k is known only as a total)."""
        m, where = self.manifest, f"teacher cache {self.directory}"
        if m["tokenizer"] != tokenizer_fingerprint:
            raise ValueError(f"{where}: tokenizer {m['tokenizer'][:12]} differs from the student's "
                             f"({tokenizer_fingerprint[:12]}); train with the cache's tokenizer (leave data.tokenizer "
                             "unset)")
        if m["num_tokens"] != store.num_tokens:
            raise ValueError(f"{where}: num_tokens={m['num_tokens']:,} but the training data has "
                             f"{store.num_tokens:,} tokens; use the data the cache was made from (data.path or the "
                             "built-in tasks, data.num_problems, train.seed)")
        data_fp = data_fingerprint(store)
        if m["data"] != data_fp:
            raise ValueError(f"{where}: data fingerprint {m['data'][:12]} differs from the training data's "
                             f"({data_fp[:12]}); use the data the cache was made from")
        if m["seq_len"] != seq_len:
            raise ValueError(f"{where}: seq_len={m['seq_len']} but data.seq_len={seq_len}; set "
                             f"--data.seq_len={m['seq_len']}")
        if m["vocab_size"] < vocab_size:
            raise ValueError(f"{where}: vocab_size={m['vocab_size']} (the teacher's) is smaller than the student's "
                             f"({vocab_size}); give the student --model.vocab_size={m['vocab_size']}")
        if top_k and top_k > m["top_k"]:
            raise ValueError(f"{where}: top_k={m['top_k']} but distill.top_k={top_k}; the cache holds only the "
                             f"teacher's top {m['top_k']} (set distill.top_k <= {m['top_k']}, or 0 for all)")
        if not math.isclose(float(m["temperature"]), float(temperature), rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"{where}: temperature={m['temperature']:g} but distill.temperature={temperature:g}; "
                             "top-k log-probs cannot be re-tempered exactly: train at the cache's temperature or "
                             "make a cache at this one")


"""One record of a teacher cache: a window's top-k ids (Elias-Fano coded in chunks of 32) and their
log-probabilities (u8 quantized, f16 or f32), encoded and decoded with vectorised numpy.

The byte layout and the u8 error bound are specified in docs/teacher_cache.md; the directory around the
records (shards, index, manifest) is `teacher_cache.py`.

Shape legend: N positions of a record, K entries per position (the top-k), C id chunks, E entries (N*K).
"""

from __future__ import annotations

import numpy as np

ID_CHUNK = 32  # ids per Elias-Fano chunk
VALUE_RANGE = 20.0  # u8: log-probs more than this many nats below their position's top are clamped
VALUE_CODECS = ("u8", "f16", "f32")
_U8_ABSENT = 255
_U8_STEPS = 254  # codes 0..254 are finite



def _chunks(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first entry, size) of each id chunk [C], and each entry's chunk and index within it [k]."""
    starts = np.arange(0, k, ID_CHUNK, dtype=np.int64)
    sizes = np.minimum(starts + ID_CHUNK, k) - starts
    entry = np.arange(k, dtype=np.int64)
    return starts, sizes, entry // ID_CHUNK, entry % ID_CHUNK


def max_low_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def encode_record(ids_NK: np.ndarray, logprobs_NK: np.ndarray, vocab_size: int, values: str = "u8") -> bytes:
    """One record: the k (distinct) ids < vocab_size and their log-probabilities at each of n positions."""
    ids_NK = np.asarray(ids_NK)
    lp_NK = np.asarray(logprobs_NK, dtype=np.float32)
    if ids_NK.ndim != 2 or ids_NK.shape != lp_NK.shape or ids_NK.shape[1] < 1:
        raise ValueError(f"ids {ids_NK.shape} and logprobs {lp_NK.shape} must both be [n, k] with k >= 1")
    if values not in VALUE_CODECS:
        raise ValueError(f"values={values!r}: expected one of {', '.join(VALUE_CODECS)}")
    N, K = ids_NK.shape
    order = np.argsort(ids_NK, axis=1, kind="stable")
    ids_NK = np.take_along_axis(ids_NK, order, 1).astype(np.int64)
    lp_NK = np.take_along_axis(lp_NK, order, 1)
    if N and (ids_NK[:, 0].min() < 0 or ids_NK[:, -1].max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size})")
    if K > 1 and N and (np.diff(ids_NK, axis=1) <= 0).any():
        raise ValueError("the ids of a position must be distinct")
    if np.isnan(lp_NK).any() or np.isposinf(lp_NK).any():
        raise ValueError("log-probabilities must not be NaN or +inf")
    parts = [_encode_values(lp_NK, values)]
    starts, sizes, chunk_of, index_in = _chunks(K)
    C = len(starts)
    last = starts + sizes - 1
    base_NC = np.zeros((N, C), dtype=np.int64)
    base_NC[:, 1:] = ids_NK[:, last[:-1]] + 1
    rel_NK = ids_NK - base_NC[:, chunk_of]
    top_NC = rel_NK[:, last]
    L = np.arange(max_low_bits(vocab_size) + 1, dtype=np.int64)
    cost_NCL = sizes[None, :, None] * L + (top_NC[:, :, None] >> L)
    l_NC = cost_NCL.argmin(-1).astype(np.int64)
    parts.append(l_NC.astype(np.uint8).tobytes())
    # low parts: l bits of each entry, MSB first
    l_E = l_NC[:, chunk_of].ravel()
    rel_E = rel_NK.ravel()
    off_E = np.cumsum(l_E) - l_E
    low_bits = np.zeros(int(l_E.sum()), dtype=np.uint8)
    for b in range(int(l_E.max(initial=0))):
        m = l_E > b
        low_bits[off_E[m] + b] = (rel_E[m] >> (l_E[m] - 1 - b)) & 1
    parts.append(np.packbits(low_bits).tobytes())
    # high parts: a 1 at (x >> l) + i in each chunk's unary stream, which ends at its last 1
    length_NC = sizes[None, :] + (top_NC >> l_NC)
    start_NC = (np.cumsum(length_NC.ravel()) - length_NC.ravel()).reshape(N, C)
    high_bits = np.zeros(int(length_NC.sum()), dtype=np.uint8)
    high_bits[(start_NC[:, chunk_of] + (rel_NK >> l_NC[:, chunk_of]) + index_in).ravel()] = 1
    parts.append(np.packbits(high_bits).tobytes())
    return b"".join(parts)


def _encode_values(lp_NK: np.ndarray, values: str) -> bytes:
    if values == "f32":
        return lp_NK.astype("<f4").tobytes()
    if values == "f16":
        return lp_NK.astype("<f2").tobytes()
    finite_NK = np.isfinite(lp_NK)
    any_N = finite_NK.any(1)
    hi_N = np.where(any_N, np.where(finite_NK, lp_NK, -np.inf).max(1), 0.0).astype(np.float32)
    lo_N = np.where(any_N, np.where(finite_NK, lp_NK, np.inf).min(1), 0.0).astype(np.float32)
    rng_N = np.minimum(hi_N.astype(np.float64) - lo_N, VALUE_RANGE)
    scale_N = (rng_N / _U8_STEPS).astype(np.float16)
    short = scale_N.astype(np.float64) * _U8_STEPS < rng_N  # float16 rounded down: one ulp up
    scale_N[short] = np.nextafter(scale_N[short], np.float16(np.inf))
    s_N = scale_N.astype(np.float32)
    q_NK = np.where(s_N[:, None] > 0, (hi_N[:, None] - np.where(finite_NK, lp_NK, hi_N[:, None]))
                    / np.where(s_N > 0, s_N, 1.0)[:, None], 0.0)
    codes_NK = np.where(finite_NK, np.clip(np.rint(q_NK), 0, _U8_STEPS), _U8_ABSENT).astype(np.uint8)
    return hi_N.astype("<f4").tobytes() + scale_N.astype("<f2").tobytes() + codes_NK.tobytes()


def _values_bytes(n: int, k: int, values: str) -> int:
    return {"u8": n * (4 + 2 + k), "f16": 2 * n * k, "f32": 4 * n * k}[values]


def decode_record(buf, n: int, k: int, vocab_size: int, values: str = "u8",
                  where: str = "record") -> tuple[np.ndarray, np.ndarray]:
    """The (ids int64 [n, k] ascending per row, log-probs float32 [n, k]) of `encode_record`'s bytes.

    Malformed bytes raise `ValueError` naming `where`."""
    buf = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    starts, sizes, chunk_of, index_in = _chunks(k)
    C = len(starts)
    pos = _values_bytes(n, k, values)
    if len(buf) < pos + n * C:
        raise ValueError(f"{where}: truncated ({len(buf)} bytes)")
    lp_NK = _decode_values(buf[:pos], n, k, values)
    l_NC = buf[pos:pos + n * C].reshape(n, C).astype(np.int64)
    pos += n * C
    if n and l_NC.max() > max_low_bits(vocab_size):
        raise ValueError(f"{where}: corrupt (low-bit width {l_NC.max()})")
    l_E = l_NC[:, chunk_of].ravel()
    off_E = np.cumsum(l_E) - l_E
    low_len = (int(l_E.sum()) + 7) // 8
    low = buf[pos:pos + low_len]
    high = buf[pos + low_len:]
    if len(low) != low_len:
        raise ValueError(f"{where}: truncated ({len(buf)} bytes)")
    # low parts: the big-endian 64-bit word at each entry's byte, shifted and masked
    padded = np.zeros(low_len + 8, dtype=np.uint8)
    padded[:low_len] = low
    words = np.ndarray((low_len + 1,), dtype=">u8", buffer=padded, strides=(1,))
    word_E = words[off_E >> 3].astype(np.uint64)
    shift_E = (64 - (off_E & 7) - l_E).astype(np.uint64)
    mask_E = (np.uint64(1) << l_E.astype(np.uint64)) - np.uint64(1)
    low_E = ((word_E >> np.minimum(shift_E, np.uint64(63))) & mask_E).astype(np.int64)
    # high parts: the m-th 1 of the stream is entry m; its chunk starts after the previous chunk's last 1
    ones = np.flatnonzero(np.unpackbits(high))
    E = n * k
    if len(ones) != E or (E and len(high) != ones[-1] // 8 + 1):
        raise ValueError(f"{where}: corrupt (id stream holds {len(ones)} entries, expected {E})")
    first_NC = np.arange(n, dtype=np.int64)[:, None] * k + starts[None, :]
    chunk_start = np.where(first_NC > 0, ones[np.maximum(first_NC - 1, 0)] + 1, 0)
    high_E = ones - chunk_start[:, chunk_of].ravel() - np.tile(index_in, n)
    if E and high_E.min() < 0:
        raise ValueError(f"{where}: corrupt (id stream out of order)")
    rel_NK = ((high_E << l_E) | low_E).reshape(n, k)
    base_NC = np.zeros((n, C), dtype=np.int64)
    base_NC[:, 1:] = np.cumsum(rel_NK[:, starts[:-1] + sizes[:-1] - 1] + 1, axis=1)
    ids_NK = rel_NK + base_NC[:, chunk_of]
    if E and ids_NK[:, -1].max() >= vocab_size:
        raise ValueError(f"{where}: corrupt (id {ids_NK[:, -1].max()} >= vocabulary size {vocab_size})")
    return ids_NK, lp_NK


def _decode_values(buf: np.ndarray, n: int, k: int, values: str) -> np.ndarray:
    if values == "f32":
        return buf.view("<f4").astype(np.float32).reshape(n, k)
    if values == "f16":
        return buf.view("<f2").astype(np.float32).reshape(n, k)
    if values != "u8":
        raise ValueError(f"values={values!r}: expected one of {', '.join(VALUE_CODECS)}")
    hi_N = buf[:4 * n].view("<f4").astype(np.float32)
    s_N = buf[4 * n:6 * n].view("<f2").astype(np.float32)
    codes_NK = buf[6 * n:].reshape(n, k)
    lp_NK = hi_N[:, None] - codes_NK.astype(np.float32) * s_N[:, None]
    lp_NK[codes_NK == _U8_ABSENT] = -np.inf
    return lp_NK


def u8_error_bound(hi: float, lowest: float) -> float:
    """The largest |decoded - true| log-prob error of the u8 codec for a position whose finite log-probs
    span [lowest, hi], for entries within VALUE_RANGE of hi."""
    rng = min(hi - lowest, VALUE_RANGE)
    return rng / (2 * _U8_STEPS) * (1 + 2.0**-10) + 3e-8

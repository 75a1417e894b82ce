"""Autoregressive generation with a KV cache: one prefill, then one-token decode steps.

Prompts of different lengths run as one batch. They are right-padded, and the padding gets position
-1, so it is never attended to; each row's positions start at 0 and continue from its own length,
so chunk boundaries and temperature tuning are per row and padding changes no row's result.

`generate_reference` re-runs the full forward on each prompt alone at every step (no cache, no
padding). It is slow and obviously right: the cached path is tested against it.

Shape legend: B batch rows, S prompt length (padded), V vocabulary, N new tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from behemoth.inference.cache import KVCache
from behemoth.inference.prefix_cache import reusable_prefix
from behemoth.inference.sampling import SamplingParams, sample

Prompts = Sequence[Sequence[int]] | torch.Tensor
COMPILE_BUCKET = 256
# query-key pairs one piece of a chunked prefill may score: a piece of n queries over k keys holds an n x k attention
# mask (and the attention's own n x k buffers), so past PREFILL_PAIRS / chunk keys the pieces shorten, and what a
# prefill holds beyond its KV cache stays bounded whatever the context (about 5 bytes a pair measured on the CPU)
PREFILL_PAIRS = 1 << 26


def _as_lists(prompts: Prompts) -> list[list[int]]:
    rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(map(int, p)) for p in prompts]
    if not rows:
        raise ValueError("no prompts")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {i} is empty (it needs at least one token, e.g. BOS)")
    return rows


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is not None and overrides:
        raise ValueError("pass either a SamplingParams or keyword options, not both")
    return params if params is not None else SamplingParams(**overrides)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def padded(rows: list[list[int]], device: torch.device, starts: list[int] | None = None):
    """Token rows right-padded into ids [B, S] and positions [B, S] (row b's at starts[b], starts[b] + 1, ...;
    default 0), the padding at position -1, which no query sees and no cache keeps; S is at least 1."""
    S = max(1, max(map(len, rows), default=0))
    ids_BS = torch.zeros(len(rows), S, dtype=torch.long, device=device)
    pos_BS = torch.full((len(rows), S), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        if r:
            start = starts[b] if starts is not None else 0
            ids_BS[b, :len(r)] = torch.tensor(r, device=device)
            pos_BS[b, :len(r)] = torch.arange(start, start + len(r), device=device)
    return ids_BS, pos_BS


def piece_len(chunk: int, done: int) -> int:
    """The next piece of a chunked prefill after `done` positions: `chunk`, halved while the piece's queries times
    the keys they see (done + piece) exceed `PREFILL_PAIRS`, down to 16 at least."""
    n = chunk
    while n > 16 and n * (done + n) > PREFILL_PAIRS:
        n //= 2
    return n


def prefill(model: nn.Module, rows: list[list[int]], cache: KVCache,
            pixel_values: torch.Tensor | None = None, hidden: bool = False, starts: list[int] | None = None,
            chunk: int | None = None):
    """Run the prompts (right-padded, padding at position -1) into `cache`; logits [B, V] of each
    row's last prompt token. `pixel_values`: the image tiles of all prompts, in order (their features
    fill the `<|patch|>` tokens row by row). `hidden`: also return the final hidden states [B, S, D] of every
    position (for scoring the prompt itself), as `(logits_BV, h_BSD)`. `starts`: row b's tokens continue at
    position starts[b] (its cache row already holding the positions before; default 0). `chunk`: run the rows
    `chunk` positions at a time (each piece into the cache before the next; shorter where the context is long,
    `piece_len`), so that activations are bounded by the chunk rather than the prompt (not with `hidden` or
    images)."""
    device = cache.k[0].device
    longest = max(map(len, rows))
    if chunk is not None and longest > chunk and not hidden and pixel_values is None:
        starts = starts or [0] * len(rows)
        logits: list[torch.Tensor | None] = [None] * len(rows)
        a = 0
        while a < longest:
            n = piece_len(chunk, a + max(starts))
            ids_BS, pos_BS = padded([r[a:a + n] for r in rows], device, [s + a for s in starts])
            h_BSD = model.hidden_states(ids_BS, pos_BS, cache=cache)
            for b, r in enumerate(rows):
                if a < len(r) <= a + n:  # the row's last token is in this piece
                    logits[b] = model.logits(h_BSD[b, len(r) - 1 - a])
            a += n
        return torch.stack(logits)
    lens_B = torch.tensor([len(r) for r in rows], device=device)
    ids_BS, pos_BS = padded(rows, device, starts)
    h_BSD = model.hidden_states(ids_BS, pos_BS, cache=cache, pixel_values=pixel_values)
    logits_BV = model.logits(h_BSD[torch.arange(len(rows), device=device), lens_B - 1])
    return (logits_BV, h_BSD) if hidden else logits_BV


def decode_step(model: nn.Module, next_B: torch.Tensor, pos_B: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row at its position: logits [B, V]. No host synchronisation."""
    return model.logits(model.hidden_states(next_B[:, None], pos_B[:, None], cache=cache)[:, 0])


def compiled_decode_step(cache: KVCache) -> Callable:
    """`decode_step` compiled for this cache's shapes (no dynamic shapes); on CUDA as a CUDA graph
    ("reduce-overhead"), with the cache's tensors marked static since they are updated in place. The guard on
    their addresses is off explicitly (older torch guarded by default, so every new cache recompiled): callers
    reuse one cache per shape (`_pooled_cache`), and a cache at another address re-records rather than recompiles."""
    device = cache.k[0].device
    if device.type == "cuda":
        for t in [*cache.k, *cache.v, *cache.pos.values()]:
            torch._dynamo.mark_static_address(t, guard=False)
    return torch.compile(decode_step, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)


@dataclass
class CacheSession:
    """One conversation's KV cache, kept from one call of `token_steps` to the next (`behemoth chat`): a call whose
    prompt begins with what the cache holds (the earlier turns and answers) prefills only the rest. The cache
    grows by doubling when a turn needs more room. `reused`: the prompt tokens the latest call did not prefill."""

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)  # the tokens the cache held after the latest prefill
    ran: list[torch.Tensor] = field(default_factory=list)  # [1] tokens decoded into it since (kept on the device)
    reused: int = 0

    def held(self) -> list[int]:
        """The tokens whose keys the cache holds, positions 0.. in order."""
        return self.ids + [int(t) for t in self.ran]

    def clear(self) -> None:
        self.cache, self.ids, self.ran, self.reused = None, [], [], 0

    def prepare(self, model: nn.Module, row: list[int], max_len: int, device: torch.device,
                dtype: torch.dtype) -> tuple[KVCache, int]:
        """(cache, n): a cache of at least `max_len` positions holding the first n tokens of `row` (n < len(row)),
        the longest beginning shared with what it held that a continuation can reuse."""
        n = 0 if self.cache is None else reusable_prefix(self.cache, self.held(), row)
        if self.cache is None or self.cache.max_len < max_len or self.cache.dtype != dtype:
            size = min(max(max_len, 2 * (self.cache.max_len if self.cache is not None else 0)),
                       model.config.max_seq_len)
            grown = KVCache(model.config, 1, size, device=device, dtype=dtype)
            if n:
                grown.load_prefix(0, self.cache, 0, n)
            self.cache = grown
        else:
            self.cache.truncate([n])
        self.ids, self.ran, self.reused = list(row), [], n
        return self.cache, n


# compiled generation: one cache and compiled step per (model, rows, length bucket, device, dtype), kept while the
# model lives and reset in place for each call, so that a second call with the same shapes compiles nothing new
_POOL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pooled_cache(model: nn.Module, rows: int, max_len: int, device: torch.device,
                  dtype: torch.dtype, lookahead: int = 0) -> tuple[KVCache, Callable]:
    caches = _POOL.setdefault(model, {})
    key = (rows, max_len, str(device), dtype, lookahead)
    if key not in caches:
        cache = KVCache(model.config, rows, max_len, device=device, dtype=dtype, lookahead=lookahead)
        caches[key] = (cache, compiled_decode_step(cache))
    cache, step = caches[key]
    cache.reset()
    return cache, step


@torch.no_grad()  # on a generator function, torch applies it around each step, not while the caller runs
def token_steps(model: nn.Module, prompts: Prompts, params: SamplingParams,
                cache_dtype: torch.dtype | None = None, compile: bool = False,
                pixel_values: torch.Tensor | None = None,
                session: CacheSession | None = None, prefill_chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Yield each step's new token of every row, [B] on the model's device (rows that stopped keep
    going; the caller decides what to keep). At most `params.max_new_tokens` steps.

    `compile` compiles the one-token decode step (the prefill stays eager): one graph with no host
    synchronisation (the MoE gathers its experts' weights instead of reading ids on the host), and
    on CUDA captured as a CUDA graph ("reduce-overhead"). Compilation takes seconds to a minute
    the first time for each batch size and cache bucket.

    `session` (one prompt, eager, no images): keep the cache in it and reuse what it held for a prompt that begins
    alike (`CacheSession`). `prefill_chunk`: prefill the prompts that many positions at a time (`prefill`).
    """
    rows = _as_lists(prompts)
    V = model.config.vocab_size
    if any(not 0 <= t < V for r in rows for t in r):
        raise ValueError(f"prompt token ids must be in [0, {V}) for this model")
    device, dtype = _model_device_dtype(model)
    max_len = max(map(len, rows)) + params.max_new_tokens
    if max_len > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {max_len} tokens exceeds the model's max_seq_len "
                         f"{model.config.max_seq_len}")
    if params.max_new_tokens == 0:
        return
    if session is not None and (compile or pixel_values is not None or len(rows) != 1):
        raise ValueError("a cache session takes one text prompt, eager")
    start = 0
    if session is not None:
        cache, start = session.prepare(model, rows[0], max_len, device, cache_dtype or dtype)
        step = decode_step
    elif compile:  # cache sizes in buckets of 256 and one cache per shape, so that later calls reuse the compiled step
        max_len = min(-(-max_len // COMPILE_BUCKET) * COMPILE_BUCKET, model.config.max_seq_len)
        cache, step = _pooled_cache(model, len(rows), max_len, device, cache_dtype or dtype)
    else:
        cache, step = KVCache(model.config, len(rows), max_len, device=device, dtype=cache_dtype or dtype), decode_step
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    next_B = sample(prefill(model, [r[start:] for r in rows], cache, pixel_values, starts=[start] * len(rows),
                            chunk=prefill_chunk), params, gen)
    pos_B = torch.tensor([len(r) for r in rows], device=device)
    yield next_B
    for _ in range(params.max_new_tokens - 1):
        if session is not None:
            session.ran.append(next_B)
        next_B = sample(step(model, next_B, pos_B, cache), params, gen)
        pos_B = pos_B + 1
        yield next_B


def stream(model: nn.Module, prompts: Prompts, params: SamplingParams | None = None,
           **options) -> Iterator[list[int | None]]:
    """Token by token: per step, each row's new token, or None for a row that has stopped.

    Ends when every row has stopped. Stop ids are not emitted. Options as `SamplingParams`.
    """
    params = _params(params, options)
    done: list[bool] | None = None
    stop = set(params.stop_ids)
    for next_B in token_steps(model, prompts, params):
        toks = next_B.tolist()
        done = done or [False] * len(toks)
        out: list[int | None] = []
        for b, t in enumerate(toks):
            done[b] = done[b] or t in stop
            out.append(None if done[b] else t)
        if all(done):
            return
        yield out


def generate(model: nn.Module, prompts: Prompts, params: SamplingParams | None = None,
             cache_dtype: torch.dtype | None = None, compile: bool = False, pixel_values: torch.Tensor | None = None,
             prefill_chunk: int | None = None, **options) -> list[list[int]]:
    """New tokens of each prompt, cut before its first stop id. Options as `SamplingParams`;
    `pixel_values` and `prefill_chunk` as in `prefill`.

    Tokens stay on the device during the loop; whether every row has stopped is checked every 16
    steps, so a GPU is not synchronised once per token. A model without a cache-aware
    `hidden_states` (any `forward(ids) -> logits`) goes through `generate_reference`.
    """
    params = _params(params, options)
    if not hasattr(model, "hidden_states"):
        if pixel_values is not None:
            raise ValueError("images need a model with a cache-aware forward (a behemoth Transformer)")
        return generate_reference(model, prompts, params)
    return [_cut(row, params.stop_ids) for row in sampled_rows(model, prompts, params, cache_dtype, compile,
                                                                pixel_values, prefill_chunk=prefill_chunk)]


def sampled_rows(model: nn.Module, prompts: Prompts, params: SamplingParams, cache_dtype: torch.dtype | None = None,
                 compile: bool = False, pixel_values: torch.Tensor | None = None,
                 early_stop: bool = True, prefill_chunk: int | None = None) -> list[list[int]]:
    """Every decode step's token of each row, uncut: all rows as long as the number of steps taken. With
    `early_stop`, decoding ends once every row has met a stop id, checked every 16 steps (`generate`); without,
    it takes all `max_new_tokens` steps (ranks of a distributed model, whose forwards are collectives, must)."""
    stop = torch.tensor(params.stop_ids, dtype=torch.long)
    steps: list[torch.Tensor] = []
    for i, next_B in enumerate(token_steps(model, prompts, params, cache_dtype, compile, pixel_values,
                                           prefill_chunk=prefill_chunk)):
        steps.append(next_B)
        if early_stop and params.stop_ids and i % 16 == 15:
            seen_B = torch.isin(torch.stack(steps, 1), stop.to(next_B.device)).any(1)
            if bool(seen_B.all()):
                break
    if not steps:
        return [[] for _ in _as_lists(prompts)]
    return torch.stack(steps, 1).tolist()


def _cut(row: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    stop = set(stop_ids)
    return next((row[:j] for j, t in enumerate(row) if t in stop), row)


@torch.no_grad()
def generate_reference(model: nn.Module, prompts: Prompts, params: SamplingParams | None = None,
                       **options) -> list[list[int]]:
    """The same contract as `generate`, by brute force: each prompt alone, a full forward per token.

    With a seed, sampling uses one generator per prompt, so it matches `generate` only when greedy
    or when there is a single prompt.
    """
    params = _params(params, options)
    out = []
    device, _ = _model_device_dtype(model)
    for row in _as_lists(prompts):
        ids_1S = torch.tensor([row], device=device)
        gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        new: list[int] = []
        for _ in range(params.max_new_tokens):
            logits = model(ids_1S)
            next_1 = sample(getattr(logits, "logits", logits)[:, -1], params, gen)
            if int(next_1) in params.stop_ids:
                break
            new.append(int(next_1))
            ids_1S = torch.cat([ids_1S, next_1[:, None]], dim=1)
        out.append(new)
    return out

"""Continuous batching: many concurrent requests share one model, one KV cache, one decode step.

The engine owns a `KVCache` of `max_batch` rows (slots). One background thread runs the loop:

1. admit waiting requests into free slots: prefill their prompts together (one padded batch, into
   a cache sized to them), copy each row into its slot of the shared cache, sample the first token;
2. one decode step for all slots at once (each row at its own position; a free slot runs at
   position -1 and writes nothing any query can see), then sample each active row with its own
   parameters and generator;
3. hand each new piece of text to its request's queue; a finished or cancelled request frees its
   slot at once, and a waiting one takes it at the next step.

A request therefore joins a running batch without waiting for it to finish, and a client that goes
away (`Request.cancel()`) stops costing anything at the next step. Handlers on other threads only
touch `Request` queues; the model runs on the engine thread alone.

With `prefill_chunk` set, a prompt longer than it is prefilled a chunk at a time into a cache of its own,
one chunk per turn of the loop between two decode steps of the running requests, and moved into its slot when
complete: a long prompt then delays a decode step by one chunk's work at most, and its activations are bounded
by the chunk, not by its length (prompts with images, or whose log-probabilities are asked for, are prefilled
whole).

With `prefix_cache_bytes`, the engine keeps the keys and values of the sequences it ran (each prompt after its
prefill, each prompt with its answer when it finishes) in a `PrefixCache`, and a newcomer copies the longest
prefix it shares with one of them into its row and prefills only the rest (`EngineStats.prefix` counts the
tokens reused).

With a `draft` model (the same tokenizer; e.g. a distilled student), every decode step is a round of speculative
decoding for all running requests (`engine_draft.py`); `EngineStats.drafted` / `accepted` count the proposals.

`Engine(..., background=False)` runs no thread: the caller submits requests and drives the same loop with
`run_until_done()` (batch work such as `behemoth synthesize`). Slots are then filled strictly in submission
order, so the same requests give the same batches, and with seeded requests the same tokens, run after run.
A request with `logprobs` gets, in its `Completion`, the sum of the model's log-probabilities (at temperature
1, before any filtering) of every token it sampled, its stop token included; one with `top_logprobs` gets each
sampled token's log-probability and its k most likely alternatives (also readable while it runs, in
`Request.sampled`); one with `prompt_logprobs` gets the same for every prompt token, from the prefill's own hidden
states (no second pass). A request with `max_new_tokens` 0 samples nothing: it only scores its prompt.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from behemoth.inference.cache import KVCache
from behemoth.inference.engine_draft import load_with_draft, spec_round
from behemoth.inference.generate import compiled_decode_step, decode_step, piece_len, prefill
from behemoth.inference.prefix_cache import PrefixCache, PrefixStats
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams, sample
from behemoth.inference.text import Completer, TokenLogprob

_ids = itertools.count()
DEFAULT_CONTEXT = 8192
SCORE_CHUNK = 256  # prompt positions scored at a time: bounds the [positions, vocabulary] log-probabilities held


@dataclass
class Request:
    """One generation. Events arrive on `events`: ("text", str)*, then ("done", Completion) or
    ("error", message)."""

    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: tuple[str, ...] = ()
    lstrip: bool = False  # drop the answer's leading whitespace (chat)
    pixel_values: torch.Tensor | None = None  # the tiles of the prompt's images, in order
    logprobs: bool = False  # sum the sampled tokens' log-probabilities into `Completion.logprob`
    top_logprobs: int | None = None  # per sampled token: its log-probability and this many alternatives
    prompt_logprobs: bool = False  # the same for every prompt token (`top_logprobs` alternatives, or none)
    on_event: Callable[[str], None] | None = None  # called with its kind (on the engine thread) after each event
    id: int = field(default_factory=lambda: next(_ids))
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sampled: list[TokenLogprob] = field(default_factory=list)  # with `top_logprobs`: filled as tokens are sampled
    prompt_scores: list[TokenLogprob | None] | None = None  # with `prompt_logprobs`: set before its first event

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value: object) -> None:
        self.events.put((kind, value))
        if self.on_event is not None:
            self.on_event(kind)

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs is not None


@dataclass
class _Prefill:
    """A long prompt being prefilled a chunk at a time into a cache of its own (then moved into its slot)."""

    cache: KVCache
    done: int = 0  # prompt tokens prefilled so far


@dataclass
class _Slot:
    request: Request
    text: Completer
    generator: torch.Generator | None
    pos: int  # position of `last`
    last: int = 0  # the latest sampled token: the next decode step runs it
    logprob: float = 0.0  # the sampled tokens' summed log-probabilities (requests with `logprobs`)
    prefill: _Prefill | None = None  # while its prompt is prefilled in chunks: not decoded yet
    tokens: list[int] = field(default_factory=list)  # the tokens sampled so far
    pending: list[int] = field(default_factory=list)  # with a draft: tokens its cache lacks, ending with `last`


@dataclass
class EngineStats:
    completed: int = 0
    cancelled: int = 0
    tokens: int = 0
    steps: int = 0
    max_active: int = 0  # the most requests ever decoded in one step
    positions: int = 0  # positions the model computed: prefills (padded to their longest prompt) and decode slots
    prefix: PrefixStats | None = None  # the prefix cache's lookups, hits and reused tokens (None: no prefix cache)
    drafted: int = 0  # with a draft model: tokens it proposed
    accepted: int = 0  # and the model accepted


class Engine:
    def __init__(self, runner: Runner, max_batch: int = 8, max_len: int | None = None, compile: bool = False,
                 background: bool = True, prefill_chunk: int | None = None, prefix_cache_bytes: int = 0,
                 draft: torch.nn.Module | None = None, draft_k: int = 4):
        """`max_len`: the context of each slot, allocated up front for every NoPE layer (default: the
        model's max_seq_len up to `DEFAULT_CONTEXT`; Scout's 10M would not fit in any memory). `background`
        False: no thread, the caller runs the loop (`run_until_done`). `prefill_chunk`: prefill longer prompts a
        chunk of this many tokens at a time (module docstring); None: whole. `prefix_cache_bytes`: keep the keys and
        values of sequences run before within this budget, for prompts that begin alike (0: no prefix cache). `draft`:
        decode speculatively with this model, `draft_k` proposals per step (module docstring)."""
        if max_batch < 1 or (max_len is not None and max_len < 1) or (prefill_chunk is not None and prefill_chunk < 1):
            raise ValueError(f"max_batch={max_batch}, max_len={max_len} and prefill_chunk={prefill_chunk} must be "
                             ">= 1")
        self.prefill_chunk = prefill_chunk
        self._prefilling: list[int] = []  # slots whose prompts are being prefilled in chunks, oldest first
        self.runner = runner
        self.max_batch = max_batch
        self.max_len = min(max_len or DEFAULT_CONTEXT, runner.max_len)
        p = next(runner.model.parameters())
        self.device = p.device
        self.draft, self.draft_k = draft, draft_k
        if draft is not None:
            if draft.config.vocab_size > runner.model.config.vocab_size or not 1 <= draft_k <= 16:
                raise ValueError(f"draft: vocabulary {draft.config.vocab_size} (at most the model's "
                                 f"{runner.model.config.vocab_size}) and draft_k={draft_k} (1 to 16)")
            draft.eval()
        look = draft_k if draft is not None else 0  # a verify step writes draft_k positions it may take back
        self.cache = KVCache(runner.model.config, max_batch, self.max_len + look, device=p.device, dtype=p.dtype,
                             lookahead=look)
        self.dcache = None if draft is None else KVCache(draft.config, max_batch, self.max_len + look,
                                                          device=p.device, dtype=p.dtype, lookahead=look)
        # The decode step always runs all `max_batch` rows over the same cache: static shapes, so one
        # compilation (on CUDA, one CUDA graph) serves every step.
        self._decode = compiled_decode_step(self.cache) if compile else decode_step
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.stats = EngineStats(prefix=self.prefix.stats if self.prefix is not None else None)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="behemoth-engine", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    # ---- API for other threads ---------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request (validated by the caller: prompt + max_new_tokens must fit `max_len`)."""
        need = len(request.prompt_ids) + request.params.max_new_tokens
        if not request.prompt_ids or need > self.max_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max tokens "
                             f"({request.params.max_new_tokens}) = {need} exceeds the context of {self.max_len}")
        self.waiting.put(request)
        self._wake.set()
        return request

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run_until_done(self) -> None:
        """Without a background thread: run the loop here until every submitted request has finished. An
        error is raised to the caller (the background loop instead fails the requests and goes on)."""
        if self._thread is not None:
            raise RuntimeError("run_until_done drives an engine made with background=False")
        while True:
            self._admit()
            if self.active == 0:
                if self.waiting.empty():
                    return
                continue  # every newcomer finished at its first token: admit the next ones
            self._turn()

    # ---- the loop -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.active == 0:
                    self._wake.wait(timeout=0.1)  # sleep until a request arrives
                    self._wake.clear()
                    continue
                self._turn()
            except Exception as e:  # never let one bad step kill the server: fail the running requests
                for i, s in enumerate(self.slots):
                    if s is not None:
                        s.request.emit("error", f"{type(e).__name__}: {e}")
                        self.slots[i] = None
                self._prefilling.clear()

    def _turn(self) -> None:
        """One turn of the loop: a chunk of the oldest long prompt, then a decode step of the running requests."""
        if self._prefilling:
            self._prefill_chunk()
        if any(s is not None and s.prefill is None for s in self.slots):
            spec_round(self) if self.draft is not None else self._step()

    def _chunked(self, req: Request) -> bool:
        return (self.prefill_chunk is not None and len(req.prompt_ids) > self.prefill_chunk
                and req.pixel_values is None and not req.prompt_logprobs and req.params.max_new_tokens > 0)

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the oldest long prompt; once whole, move it into its slot and sample its first
        token (a request cancelled meanwhile frees its slot)."""
        i = self._prefilling[0]
        s = self.slots[i]
        if s.request.cancelled.is_set():
            self.stats.cancelled += 1
            self.slots[i] = None
            self._prefilling.pop(0)
            return
        pf, ids = s.prefill, s.request.prompt_ids
        a = pf.done
        b = min(a + piece_len(self.prefill_chunk, a), len(ids))
        with torch.no_grad():
            h_1SD = self.runner.model.hidden_states(torch.tensor([ids[a:b]], device=self.device),
                                                    torch.arange(a, b, device=self.device)[None], cache=pf.cache)
            pf.done = b
            self.stats.positions += b - a
            if b < len(ids):
                return
            logits_1V = self.runner.model.logits(h_1SD[:, -1])
        self._store(s.request, ids, pf.cache, 0)
        self._load(i, pf.cache, 0, len(ids))
        s.prefill = None
        self._prefilling.pop(0)
        logp = _logprobs(logits_1V, [s.request])
        self._deliver(i, int(sample(logits_1V, s.request.params, s.generator)), None if logp is None else logp[0])

    def _admit(self) -> None:
        """Fill free slots from the queue; the newcomers' prompts are prefilled together, into a cache
        sized to them, whose rows are then copied into their slots."""
        new: list[tuple[int, Request]] = []
        for i in range(self.max_batch):
            if self.slots[i] is None:
                req = self._next_request()
                if req is None:
                    break
                new.append((i, req))
        if not new:
            return
        for i, req in list(new):
            try:
                gen = None
                if req.params.seed is not None:
                    gen = torch.Generator(device=self.device).manual_seed(req.params.seed)
            except (ValueError, RuntimeError, OverflowError) as e:  # this request's settings: fail it alone
                req.emit("error", f"{type(e).__name__}: {e}")
                new.remove((i, req))
                continue
            text = Completer(self.runner.tokenizer, req.params, req.stop_strings, req.lstrip)
            self.slots[i] = _Slot(req, text, gen, pos=len(req.prompt_ids) - 1)
            if self._chunked(req):
                cache = KVCache(self.runner.model.config, 1, len(req.prompt_ids), device=self.device,
                                dtype=self.cache.dtype)
                hit, snapshot = self._lookup(req)
                if hit:
                    cache.load_prefix(0, snapshot, 0, hit)
                self.slots[i].prefill = _Prefill(cache, done=hit)
                self._prefilling.append(i)
        new = [(i, req) for i, req in new if self.slots[i].prefill is None]
        if new:
            self._prefill_together(new)

    def _prefill_together(self, new: list[tuple[int, Request]]) -> None:
        """Prefill the newcomers' prompts (past any prefix the prefix cache holds) as one padded batch, into a cache
        sized to them; move each row into its slot and sample its first token."""
        hits = [self._lookup(req) for _, req in new]
        rows = [req.prompt_ids[n:] for (_, req), (n, _) in zip(new, hits, strict=True)]
        tiles = [req.pixel_values for _, req in new if req.pixel_values is not None]
        fresh = KVCache(self.runner.model.config, len(new), max(len(req.prompt_ids) for _, req in new),
                        device=self.device, dtype=self.cache.dtype)
        for j, (n, snapshot) in enumerate(hits):
            if n:
                fresh.load_prefix(j, snapshot, 0, n)
        self.stats.positions += len(new) * max(map(len, rows))
        score = any(req.prompt_logprobs for _, req in new)
        with torch.no_grad():
            out = prefill(self.runner.model, rows, fresh, torch.cat(tiles).to(self.device) if tiles else None,
                          hidden=score, starts=[n for n, _ in hits])
            logits_nV, h_nSD = out if score else (out, None)
            logp_nV = _logprobs(logits_nV, [req for _, req in new])
            for j, (_, req) in enumerate(new):
                if req.prompt_logprobs:
                    req.prompt_scores = score_tokens(self.runner.model, h_nSD[j, :len(req.prompt_ids)],
                                                        req.prompt_ids, req.top_logprobs or 0)
        for j, (_, req) in enumerate(new):
            self._store(req, req.prompt_ids, fresh, j)
        for j, (i, req) in enumerate(new):
            if req.params.max_new_tokens == 0:  # scoring only
                self._finish(i)
                continue
            self._load(i, fresh, j, len(req.prompt_ids))
            t = int(sample(logits_nV[j:j + 1], req.params, self.slots[i].generator))
            self._deliver(i, t, None if logp_nV is None else logp_nV[j])

    def _load(self, i: int, src: KVCache, j: int, n: int) -> None:
        """Move a prefilled prompt (row j of `src`, n tokens) into slot i; with a draft, prefill the draft too."""
        if self.draft is None:
            self.cache.load_row(i, src, j)
        else:
            load_with_draft(self, i, src, j, n)

    def _lookup(self, req: Request) -> tuple[int, KVCache | None]:
        """The prefix of `req`'s prompt held by the prefix cache: (tokens, snapshot), or (0, None). Prompts with
        images, and prompts whose every token is scored (their hidden states come from the prefill), take none."""
        if self.prefix is None or req.pixel_values is not None or req.prompt_logprobs:
            return 0, None
        return self.prefix.lookup(req.prompt_ids)

    def _store(self, req: Request, ids: list[int], cache: KVCache, row: int) -> None:
        """Keep `cache`'s row `row`, which holds `ids`, in the prefix cache (never a prompt with images)."""
        if self.prefix is not None and req.pixel_values is None and len(ids) > 1:
            self.prefix.store(ids, cache, row)

    def _next_request(self) -> Request | None:
        while True:
            try:
                req = self.waiting.get_nowait()
            except queue.Empty:
                return None
            if not req.cancelled.is_set():
                return req
            self.stats.cancelled += 1

    def _step(self) -> None:
        tokens = [s.last if s is not None and s.prefill is None else 0 for s in self.slots]
        pos = [s.pos if s is not None and s.prefill is None else -1 for s in self.slots]
        with torch.no_grad():
            logits_BV = self._decode(self.runner.model, torch.tensor(tokens, device=self.device),
                                     torch.tensor(pos, device=self.device), self.cache)
        active = [i for i, s in enumerate(self.slots) if s is not None and s.prefill is None]
        self.stats.steps += 1
        self.stats.positions += self.max_batch  # every slot runs, free ones included
        self.stats.max_active = max(self.stats.max_active, len(active))
        greedy = logits_BV.float().argmax(-1).tolist()
        logp_BV = _logprobs(logits_BV, [self.slots[i].request for i in active])
        for i in active:
            s = self.slots[i]
            t = greedy[i] if s.request.params.greedy else int(sample(logits_BV[i:i + 1], s.request.params, s.generator))
            self._deliver(i, t, None if logp_BV is None else logp_BV[i])

    def _deliver(self, i: int, token: int, logp_V: torch.Tensor | None = None) -> None:
        """Account one sampled token of slot i (and, for a request that asked, its log-probability from the row's
        log-probabilities [V]): emit its text, or finish the request."""
        s = self.slots[i]
        req = s.request
        if req.cancelled.is_set():
            self.stats.cancelled += 1
            self.slots[i] = None
            return
        if req.wants_logprobs and logp_V is not None:
            logprob = float(logp_V[token])
            s.logprob += logprob
            if req.top_logprobs is not None:
                req.sampled.append(TokenLogprob(token, logprob, _top(logp_V[None], req.top_logprobs)[0]))
        self.stats.tokens += 1
        s.tokens.append(token)
        if self.draft is not None:
            s.pending.append(token)
        piece = s.text.push(token)
        if piece:
            req.emit("text", piece)
        if s.text.reason:
            return self._finish(i)
        s.last, s.pos = token, s.pos + 1

    def _finish(self, i: int) -> None:
        s = self.slots[i]
        if s.prefill is None and s.tokens:  # the row holds the prompt and every sampled token but the last
            self._store(s.request, s.request.prompt_ids + s.tokens[:-1], self.cache, i)
        rest = s.text.finish()
        if rest:
            s.request.emit("text", rest)
        done = s.text.completion()
        if s.request.logprobs:
            done.logprob = s.logprob
        if s.request.top_logprobs is not None:
            done.token_logprobs = list(s.request.sampled)
        done.prompt_logprobs = s.request.prompt_scores
        self.stats.completed += 1
        self.slots[i] = None  # before the answer goes out: whoever receives it finds the slot free
        s.request.emit("done", done)


def _logprobs(logits_BV: torch.Tensor, requests: list[Request]) -> torch.Tensor | None:
    """Log-probabilities [B, V] (fp32) of the step's rows where any of its `requests` asked for them, else None."""
    return logits_BV.float().log_softmax(-1) if any(r.wants_logprobs for r in requests) else None


def _top(logp_NV: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely (id, log-probability) of each row, most likely first."""
    if k == 0:
        return [[] for _ in range(logp_NV.shape[0])]
    values_NK, ids_NK = torch.topk(logp_NV, min(k, logp_NV.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids_NK.tolist(), values_NK.tolist(), strict=True)]


def score_tokens(model: torch.nn.Module, h_SD: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Each token's log-probability given the ones before it, from the final hidden states [S, D] of the sequence
    `ids` (S tokens): [None, then S-1 `TokenLogprob`s with k alternatives each], computed `SCORE_CHUNK` positions
    at a time so that a long prompt never holds all its [S, V] log-probabilities at once."""
    out: list[TokenLogprob | None] = [None]
    for a in range(0, len(ids) - 1, SCORE_CHUNK):
        b = min(a + SCORE_CHUNK, len(ids) - 1)
        logp_cV = model.logits(h_SD[a:b]).float().log_softmax(-1)
        nxt = torch.tensor(ids[a + 1:b + 1], device=logp_cV.device)
        chosen = logp_cV.gather(-1, nxt[:, None])[:, 0].tolist()
        for t, lp, top in zip(ids[a + 1:b + 1], chosen, _top(logp_cV, k), strict=True):
            out.append(TokenLogprob(t, lp, top))
    return out

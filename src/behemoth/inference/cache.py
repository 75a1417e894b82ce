"""The key/value cache for incremental decoding, bounded per layer kind.

Llama 4 has two kinds of attention layer (see `model/attention.py`):

* chunked RoPE layers: a query at position p sees only keys of its own chunk (`k // C == p // C`,
  chunks aligned to 0), so they keep at most one chunk of keys, `min(C, max_len)` slots: memory
  bounded by the chunk size whatever the context length;
* global NoPE layers: a query sees every earlier key, so they keep `max_len` slots.

A key at absolute position p lives in slot `p % L` of its layer kind (L slots). For a chunked layer,
the slot of p previously held p - L, which is in an earlier chunk and never needed again; the stored
positions (`pos[kind]`, -1 = empty) let the attention mask (causal, same chunk, non-empty) drop stale
or empty slots, so no slot ever has to be cleared on a chunk boundary. Every layer of one kind writes
the same positions, so they share one positions tensor.

Each row of the batch has its own positions: rows of different lengths decode side by side, with
their own chunk boundaries and temperature tuning. A row whose position is -1 is idle (padding in a
prefill, a free slot in the server); it writes nothing that a later query of that row could see.
`load_row` replaces one row with a row of another cache (the server prefills newcomers together in a
cache sized to their prompts, then moves each into its slot).

A row's first n positions can be copied out (`extract`) and back into a row of any cache (`load_prefix`), by
position rather than by slot, so caches of other sizes exchange them: the prefix cache and a chat's cache across
turns keep conversations this way (`inference/prefix_cache.py`). `reusable(row, n)` says how much of a row a
continuation at position n may keep: every global key before n, and for the chunked kind the keys of n's own chunk,
which a row holds only if it last ran in that chunk (else the chunk's start, where no chunked key is needed).

Speculative decoding writes keys it may take back: a verify step extends each row by k + 1 tokens, and on a
rejection `truncate` empties the positions after the last accepted one. A cache made with `lookahead` = k keeps
k more slots per chunked layer (C + k), and a multi-token step then keeps every token among the last L rather than
only those of the next token's chunk, so that keys written past a chunk boundary never overwrite keys that the
chunk of an earlier position, where a row may roll back to, still needs.

The cache is created by the caller and passed into the model's forward; no module allocates one.

Shape legend: B batch rows, G KV heads, L slots of a layer kind, H head dim, S new tokens, n tokens
written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from behemoth.config import ModelConfig

CHUNKED, GLOBAL = True, False  # layer kinds, keyed like `ModelConfig.rope_layers` (RoPE layers are chunked)


def slots_per_kind(cfg: ModelConfig, max_len: int) -> dict[bool, int]:
    """Slots L per layer kind for a context of `max_len` tokens (only the kinds the model has).

    RoPE layers without a chunk size (a dense variant with `attention_chunk_size: null`) attend
    globally, so they need the full context too.
    """
    kinds = {}
    for use_rope in set(cfg.rope_layers):
        chunk = cfg.attention_chunk_size if use_rope else None
        kinds[use_rope] = max_len if chunk is None else min(chunk, max_len)
    return kinds


def cache_bytes(cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes of keys + values (plus positions) for `batch_size` rows of `max_len` tokens, by layer kind."""
    slots = slots_per_kind(cfg, max_len)
    per_slot = 2 * cfg.n_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()
    out = {"chunked": 0, "global": 0}
    for use_rope in cfg.rope_layers:
        out["chunked" if use_rope and cfg.attention_chunk_size else "global"] += batch_size * slots[use_rope] * per_slot
    out["positions"] = sum(batch_size * n * 8 for n in slots.values())
    out["total"] = sum(out.values())
    return out


@dataclass
class WritePlan:
    """Where one forward's new keys go, for one layer kind: token (b, s) -> slot `slot_n` of row `b_n`."""

    b_n: torch.Tensor
    s_n: torch.Tensor
    slot_n: torch.Tensor


class KVCache:
    """Keys and values [B, G, L, H] per layer, and key positions [B, L] per layer kind.

    `max_len` bounds the absolute positions a row may reach (the context length); positions at or
    beyond it are an error in `plan_extend` (multi-token steps) and undefined in one-token decode (the
    caller checks once, before its loop: decode does no host sync).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, lookahead: int = 0):
        if batch_size < 1 or max_len < 1 or lookahead < 0:
            raise ValueError(f"KVCache: batch_size={batch_size} and max_len={max_len} must be >= 1, "
                             f"lookahead={lookahead} >= 0")
        self.config, self.batch_size, self.max_len, self.lookahead = cfg, batch_size, max_len, lookahead
        self.chunk = {k: (cfg.attention_chunk_size if k else None) for k in slots_per_kind(cfg, max_len)}
        self.slots = {k: min(n + lookahead, max_len) if self.chunk[k] is not None else n
                      for k, n in slots_per_kind(cfg, max_len).items()}
        self.layer_kind = list(cfg.rope_layers)
        G, H = cfg.n_kv_heads, cfg.head_dim
        self.k = [torch.zeros(batch_size, G, self.slots[kind], H, device=device, dtype=dtype)
                  for kind in self.layer_kind]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.pos = {kind: torch.full((batch_size, n), -1, device=device, dtype=torch.long)
                    for kind, n in self.slots.items()}
        self.was_empty = False
        self.empty = True  # known to hold nothing: a prefill can skip reading it
        self._read: dict[bool, int] = {}  # slots of each kind a multi-token step reads (`begin`)

    def load_row(self, row: int, src: KVCache, src_row: int) -> None:
        """Make row `row` hold exactly what row `src_row` of `src` holds (the rest of the row empty).

        `src` may be smaller (a prefill cache sized to its prompts): for positions below its
        `max_len`, slot `p % L` is the same slot in both caches, so its slots copy to the first ones here.
        """
        for kind, n in src.slots.items():
            if n > self.slots[kind]:
                raise ValueError(f"load_row: the source keeps {n} slots, this cache {self.slots[kind]}")
            self.pos[kind][row].fill_(-1)
            self.pos[kind][row, :n] = src.pos[kind][src_row]
        for layer in range(len(self.k)):
            n = src.k[layer].shape[2]
            self.k[layer][row, :, :n] = src.k[layer][src_row]
            self.v[layer][row, :, :n] = src.v[layer][src_row]
        self.empty = False

    def load_prefix(self, row: int, src: KVCache, src_row: int, n: int) -> None:
        """Make row `row` hold what row `src_row` of `src` holds at positions below `n`, nothing else. Positions are
        copied by value (a key at p goes to slot p % L here), so the two caches may differ in size; `n` must be
        `src.reusable(src_row, n)` (the keys a continuation at n needs) and at most this cache's `max_len`."""
        if n > self.max_len:
            raise ValueError(f"load_prefix: {n} positions do not fit a cache of max_len={self.max_len}")
        for kind, L in self.slots.items():
            self.pos[kind][row].fill_(-1)
            p_L = src.pos[kind][src_row]
            keep = (p_L >= 0) & (p_L < n) & (p_L >= n - L)  # a ring of L slots keeps the last L positions
            idx = torch.nonzero(keep, as_tuple=True)[0]
            dst = p_L[idx].remainder(L)
            self.pos[kind][row, dst] = p_L[idx]
            for layer, k in enumerate(self.layer_kind):
                if k == kind:
                    self.k[layer][row, :, dst] = src.k[layer][src_row, :, idx].to(self.dtype)
                    self.v[layer][row, :, dst] = src.v[layer][src_row, :, idx].to(self.dtype)
        self.empty = False

    def extract(self, row: int, n: int) -> KVCache:
        """A one-row cache of `max_len` n holding row `row`'s positions below n (see `load_prefix`)."""
        out = KVCache(self.config, 1, n, device=self.k[0].device, dtype=self.dtype)
        out.load_prefix(0, self, row, n)
        return out

    def reusable(self, row: int, n: int) -> int:
        """The most of row `row`'s first n positions a continuation can keep: the first global position the row
        lacks, or n; then, if the row lacks a chunked key of that point's own chunk (it last ran in a later chunk),
        the start of the chunk, where a chunked layer needs no earlier key."""
        for kind in self.slots:
            if self.chunk[kind] is None:
                p_L = self.pos[kind][row]
                present = torch.zeros(n + 1, dtype=torch.bool, device=p_L.device)
                present[p_L[(p_L >= 0) & (p_L < n)]] = True
                n = int(torch.argmin(present.to(torch.int8)))  # the first missing position (present[n] is False)
        for kind in self.slots:
            if self.chunk[kind] is not None:
                p_L, start = self.pos[kind][row], n // self.chunk[kind] * self.chunk[kind]
                if int(((p_L >= start) & (p_L < n)).sum()) < n - start:
                    n = start
        return n

    def truncate(self, lengths_B: list[int] | torch.Tensor) -> None:
        """Forget every key at position >= `lengths_B[b]` in row b (a speculative step's rejected tokens): their
        slots become empty, so no later query sees them."""
        lengths = torch.as_tensor(lengths_B, device=next(iter(self.pos.values())).device)[:, None]
        for p in self.pos.values():
            p.masked_fill_(p >= lengths, -1)

    def reset(self) -> None:
        """Empty every row in place (positions to -1): the tensors keep their addresses, so a compiled decode step
        captured over them (a CUDA graph) runs on without recompiling or re-recording."""
        for p in self.pos.values():
            p.fill_(-1)
        self.empty, self.was_empty = True, False

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v) + sum(p.nbytes for p in self.pos.values())

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    # ---- one forward step -----------------------------------------------------------------------

    def begin(self, pos_BS: torch.Tensor) -> tuple[bool, dict[bool, WritePlan], dict[bool, torch.Tensor]]:
        """Start a forward over new tokens at `pos_BS` [B, S]: (decode?, write plans, key positions).

        One token per row is a decode step: keys come from the cache alone, [B, L]. More tokens (a
        prefill, or extending a conversation) attend to the old cache plus themselves, [B, n + S], where n
        is the kind's slots up to the last one any row uses (a chunked prefill into a long cache reads what is
        filled so far, not the whole allocation), or to themselves alone when the cache is known empty, [B, S].
        """
        if pos_BS.shape[0] != self.batch_size:
            raise ValueError(f"KVCache has {self.batch_size} rows, the input {pos_BS.shape[0]}")
        if pos_BS.shape[1] == 1:
            plans = self.plan_decode(pos_BS)
            return True, plans, dict(self.pos)
        self.was_empty = self.empty
        self._read = {kind: 0 if self.was_empty else _extent(p) for kind, p in self.pos.items()}
        key_pos = {kind: pos_BS if self.was_empty else torch.cat([p[:, :self._read[kind]], pos_BS], dim=1)
                   for kind, p in self.pos.items()}
        return False, self.plan_extend(pos_BS), key_pos

    # ---- where new keys go ------------------------------------------------------------------------

    def plan_decode(self, pos_B1: torch.Tensor) -> dict[bool, WritePlan]:
        """One new token per row at `pos_B1` [B, 1]: every row writes slot `pos % L` (no host sync).

        The stored positions are updated here, before attention, because a decode step attends over
        the cache after writing its own key into it.
        """
        B = pos_B1.shape[0]
        b_n = torch.arange(B, device=pos_B1.device)
        s_n = torch.zeros_like(b_n)
        plans = {}
        for kind, L in self.slots.items():
            slot_n = pos_B1[:, 0].remainder(L)
            self.pos[kind][b_n, slot_n] = pos_B1[:, 0]
            plans[kind] = WritePlan(b_n, s_n, slot_n)
        self.empty = False
        return plans

    def plan_extend(self, pos_BS: torch.Tensor) -> dict[bool, WritePlan]:
        """S new tokens per row at `pos_BS` [B, S] (-1 = padding): which of them to keep, and where.

        A row keeps the tokens the *next* position will need: for a chunked kind, those in the chunk
        of next = max(pos) + 1, and never more than L; for a global kind, all of them. Call after the
        step's attention has read the old positions (`pos`); this updates them. New positions must
        continue a row's cached ones (reset a row before running it from position 0 again).
        """
        valid_BS = pos_BS >= 0
        top = int(pos_BS.max()) if pos_BS.numel() else -1
        if top >= self.max_len:
            raise ValueError(f"position {top} is beyond the cache's max_len={self.max_len}")
        next_B1 = pos_BS.max(dim=1, keepdim=True).values + 1
        plans = {}
        for kind, L in self.slots.items():
            start_B1 = next_B1 - L
            if self.chunk[kind] is not None and not self.lookahead:  # (with lookahead: all of the last L)
                start_B1 = torch.maximum(start_B1, next_B1 // self.chunk[kind] * self.chunk[kind])
            b_n, s_n = torch.nonzero(valid_BS & (pos_BS >= start_B1), as_tuple=True)
            slot_n = pos_BS[b_n, s_n].remainder(L)
            self.pos[kind][b_n, slot_n] = pos_BS[b_n, s_n]
            plans[kind] = WritePlan(b_n, s_n, slot_n)
        self.empty = False
        return plans

    def update(self, layer: int, plan: WritePlan, k_BGSH: torch.Tensor, v_BGSH: torch.Tensor,
               decode: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's planned new keys/values; return the keys/values its queries attend to.

        decode: the cache itself after the write, [B, G, L, H] (its positions were updated by
        `plan_decode`). Otherwise the old cache's used slots followed by the new tokens, [B, G, n + S, H] (or just
        the new tokens when the cache is known empty), read before the write.
        """
        if decode:
            self._write(layer, plan, k_BGSH, v_BGSH)
            return self.k[layer].to(k_BGSH.dtype), self.v[layer].to(v_BGSH.dtype)  # no-op unless dtypes differ
        if self.was_empty:
            k_all, v_all = k_BGSH, v_BGSH
        else:
            n = self._read[self.layer_kind[layer]]
            k_all = torch.cat([self.k[layer][:, :, :n].to(k_BGSH.dtype), k_BGSH], dim=2)
            v_all = torch.cat([self.v[layer][:, :, :n].to(v_BGSH.dtype), v_BGSH], dim=2)
        self._write(layer, plan, k_BGSH, v_BGSH)
        return k_all, v_all

    def _write(self, layer: int, plan: WritePlan, k_BGSH: torch.Tensor, v_BGSH: torch.Tensor) -> None:
        self.k[layer][plan.b_n, :, plan.slot_n] = k_BGSH[plan.b_n, :, plan.s_n].to(self.dtype)
        self.v[layer][plan.b_n, :, plan.slot_n] = v_BGSH[plan.b_n, :, plan.s_n].to(self.dtype)


def _extent(pos_BL: torch.Tensor) -> int:
    """Slots up to the last one any row uses (positions [B, L], -1 empty): what a multi-token step must read."""
    used_L = (pos_BL >= 0).any(0)
    return int(used_L.nonzero().max()) + 1 if bool(used_L.any()) else 0

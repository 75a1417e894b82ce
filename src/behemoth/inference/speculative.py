"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward pass.

Each round, for every row: the draft decodes k tokens d_1..d_k from its own KV cache; the target runs its last
token and the k drafts as one k+1-token step, which gives its distribution p_0..p_k after each prefix; the
drafts are accepted from the left, then one more token comes from the target, so every round emits between 1
and k+1 tokens for one target forward. Both caches then forget the positions after the last accepted token
(`KVCache.truncate`; they are made with `lookahead` so that no key past a chunk boundary overwrites one that is
still needed).

* greedy: d_i is accepted while it is the target's argmax after d_1..d_{i-1}; the next token is the target's
  argmax after the accepted ones. The output is the target's own greedy output, token for token (up to the
  rounding of a multi-token step against a one-token step, which can only matter where two logits tie).
* sampling (temperature, top-k, top-p applied to both models' logits): d_i, drawn from the draft's q_i, is
  accepted with probability min(1, p(d_i) / q_i(d_i)); at the first rejection the token is drawn from
  max(0, p - q_i) renormalised; after k acceptances from p_k. Each emitted token then follows the target's own
  distribution exactly (Leviathan et al. 2023, Chen et al. 2023), whatever the draft.

k is fixed, or adaptive: after each round the acceptance rate a (a running mean over rounds) picks the k in
[1, k_max] that maximises the expected tokens per unit of cost, (1 - a^(k+1)) / ((1 - a)(k c + 1)), with c the
draft's cost relative to the target's (their active parameters).

The draft needs the target's tokenizer (the same ids); its vocabulary may be smaller (a padded target): the
draft puts no mass on ids it does not have. Shape legend: B rows, S tokens of a step, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from behemoth.inference.cache import KVCache
from behemoth.inference.generate import (
    COMPILE_BUCKET,
    _as_lists,
    _model_device_dtype,
    _pooled_cache,
    decode_step,
    padded,
    prefill,
)
from behemoth.inference.sampling import SamplingParams, distribution


@dataclass
class SpecStats:
    """What a run did: rounds (target verify steps, each over every live row), row steps (rows verified, summed
    over rounds), tokens drafted and accepted, tokens emitted, k per round."""

    rounds: int = 0
    row_steps: int = 0
    first: int = 0  # tokens that came from the prefill (one per row), not from a verify step
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    ks: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens each row gained per target verify step (1 without a draft)."""
        return (self.emitted - self.first) / self.row_steps if self.row_steps else 0.0


def probs(logits_NV: torch.Tensor, params: SamplingParams, vocab: int) -> torch.Tensor:
    """The distribution tokens are drawn from (fp32, [N, vocab]): temperature, top-k and top-p applied; a smaller
    vocabulary is padded with zeros."""
    p = distribution(logits_NV, params)
    return p if p.shape[-1] == vocab else torch.nn.functional.pad(p, (0, vocab - p.shape[-1]))


def best_k(acceptance: float, cost: float, k_max: int) -> int:
    """The k in [1, k_max] with the most expected tokens per unit of cost (module docstring)."""
    a = min(max(acceptance, 1e-6), 1 - 1e-6)
    return max(range(1, k_max + 1), key=lambda k: (1 - a ** (k + 1)) / ((1 - a) * (k * cost + 1)))


class _Step:
    """A model with its cache, run on a padded block of new tokens per row (padding at position -1), or on one
    token per row (`decode`, compiled where asked)."""

    def __init__(self, model: nn.Module, rows: int, max_len: int, lookahead: int, compile: bool = False):
        self.model = model
        device, dtype = _model_device_dtype(model)
        self.device = device
        if compile:  # one cache and compiled step per shape, reused by later calls (as `generate` does)
            max_len = min(-(-max_len // COMPILE_BUCKET) * COMPILE_BUCKET, model.config.max_seq_len)
            self.cache, self._decode = _pooled_cache(model, rows, max_len, device, dtype, lookahead)
        else:
            self.cache = KVCache(model.config, rows, max_len, device=device, dtype=dtype, lookahead=lookahead)
            self._decode = decode_step

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [B, V] of one token per row at its position (-1: an idle row)."""
        return self._decode(self.model, torch.tensor(tokens, device=self.device),
                            torch.tensor(positions, device=self.device), self.cache)

    def run(self, tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Logits [B, S, V] of each row's tokens at positions start, start + 1, ... (an empty row: none)."""
        ids, pos = padded(tokens, self.device, starts)
        return self.model.logits(self.model.hidden_states(ids, pos, cache=self.cache))


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, prompts, params: SamplingParams, k: int = 4,
                         adaptive: bool = False, k_max: int = 8, draft_cost: float | None = None,
                         compile: bool = False) -> tuple[list[list[int]], SpecStats]:
    """New tokens of each prompt (cut before its first stop id, at most `params.max_new_tokens`), decoded by the
    target with the draft's proposals, and what the run did. `k`: drafts per round (the first k when adaptive);
    `draft_cost`: a draft step's cost relative to a target step (default: their active parameters' ratio);
    `compile`: compile the draft's one-token steps (`generate.compiled_decode_step`)."""
    rows = _as_lists(prompts)
    V = target.config.vocab_size
    max_len = _check(target, draft, rows, params, k, k_max)
    t, d = _Step(target, len(rows), max_len, k_max), _Step(draft, len(rows), max_len, k_max, compile)
    gen = torch.Generator(device=t.device).manual_seed(params.seed) if params.seed is not None else None
    cost = draft_cost if draft_cost is not None else \
        draft.config.num_active_params() / target.config.num_active_params()
    stats = SpecStats()
    stop = set(params.stop_ids)
    out: list[list[int]] = [[] for _ in rows]
    done = [params.max_new_tokens == 0] * len(rows)

    def emit(b: int, token: int) -> None:
        if token in stop or len(out[b]) >= params.max_new_tokens:
            done[b] = True
            return
        out[b].append(token)
        stats.emitted += 1
        done[b] = len(out[b]) >= params.max_new_tokens

    first = _pick(prefill(target, rows, t.cache), params, gen, V)
    prefill(draft, rows, d.cache)
    for b, tok in enumerate(first.tolist()):
        if not done[b]:
            emit(b, tok)
    stats.first = stats.emitted
    pos = [len(r) for r in rows]  # position of each row's last emitted token (not yet in either cache)
    pending = [[o[-1]] if o else [] for o in out]  # tokens the draft has not run yet, ending at `pos`
    while not all(done):
        live = [not x for x in done]
        drafts, q = _draft(d, pending, pos, live, k, params, gen, V)
        verify = [[out[b][-1], *drafts[b]] if live[b] else [] for b in range(len(rows))]
        p = probs_or_logits(t.run(verify, pos), params, V)
        stats.rounds += 1
        stats.row_steps += sum(live)
        stats.ks.append(k)
        for b in range(len(rows)):
            if not live[b]:
                continue
            accepted, nxt = accept(drafts[b], p[b], None if q is None else q[b], params, gen)
            stats.drafted += k
            stats.accepted += accepted
            for tok in drafts[b][:accepted] + [nxt]:
                if not done[b]:
                    emit(b, tok)
            pending[b] = ([drafts[b][-1]] if accepted == k else []) + [nxt]
            pos[b] += accepted + 1
        keep = [pos[b] for b in range(len(rows))]  # positions before each row's newest token stay
        t.cache.truncate(keep)
        d.cache.truncate([pos[b] - len(pending[b]) + 1 for b in range(len(rows))])
        if adaptive:
            k = best_k(stats.acceptance, cost, k_max)
    return out, stats


def _check(target: nn.Module, draft: nn.Module, rows: list[list[int]], params: SamplingParams, k: int,
           k_max: int) -> int:
    """The caches' length, once the settings are checked (one vocabulary, k in range, the context in reach)."""
    V = target.config.vocab_size
    if draft.config.vocab_size > V:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) is larger than the target's ({V}): "
                         "they need one tokenizer")
    if not 1 <= k <= k_max:
        raise ValueError(f"k={k}: must be in [1, k_max={k_max}]")
    max_len = max(map(len, rows)) + params.max_new_tokens + k_max + 1
    for m, name in ((target, "target"), (draft, "draft")):
        if max_len > m.config.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens + k_max + 1 = {max_len} exceeds the {name}'s max_seq_len")
    return max_len


def probs_or_logits(logits_BSV: torch.Tensor, params: SamplingParams, vocab: int) -> torch.Tensor:
    """The target's distributions [B, S, V] (sampling), or its logits (greedy: only the argmax counts)."""
    if params.greedy:
        return logits_BSV.float()
    B, S, _ = logits_BSV.shape
    return probs(logits_BSV.reshape(B * S, -1), params, vocab).reshape(B, S, vocab)


def _pick(logits_BV: torch.Tensor, params: SamplingParams, gen, vocab: int) -> torch.Tensor:
    if params.greedy:
        return logits_BV.float().argmax(-1)
    return torch.multinomial(probs(logits_BV, params, vocab), 1, generator=gen)[:, 0]


def _draft(d: _Step, pending: list[list[int]], pos: list[int], live: list[bool], k: int, params: SamplingParams,
           gen, vocab: int) -> tuple[list[list[int]], torch.Tensor | None]:
    """k draft tokens per live row, and (sampling) the draft's distributions [B, k, V] they were drawn from. The
    draft first runs each row's pending tokens (1 or 2: two one-token steps, a row with one idle in the first),
    then one token per step."""
    B = len(pending)
    if any(live[b] and len(pending[b]) == 2 for b in range(B)):
        two = [live[b] and len(pending[b]) == 2 for b in range(B)]
        d.decode([pending[b][0] if two[b] else 0 for b in range(B)], [pos[b] - 1 if two[b] else -1 for b in range(B)])
    step_logits = d.decode([pending[b][-1] if live[b] else 0 for b in range(B)],
                           [pos[b] if live[b] else -1 for b in range(B)])
    drafts: list[list[int]] = [[] for _ in range(B)]
    dists = []
    for i in range(k):
        if params.greedy:
            tok = step_logits.float().argmax(-1)
        else:
            dist = probs(step_logits, params, vocab)
            dists.append(dist)
            tok = torch.multinomial(dist, 1, generator=gen)[:, 0]
        for b, x in enumerate(tok.tolist()):
            if live[b]:
                drafts[b].append(x)
        if i + 1 < k:  # the draft's next distribution, after this token
            step_logits = d.decode([drafts[b][-1] if live[b] else 0 for b in range(B)],
                                   [pos[b] + 1 + i if live[b] else -1 for b in range(B)])
    return drafts, (torch.stack(dists, 1) if dists else None)


def accept(drafts: list[int], p_SV: torch.Tensor, q_KV: torch.Tensor | None, params: SamplingParams,
            gen) -> tuple[int, int]:
    """(drafts accepted, the token after them) for one row: `p_SV` the target's logits (greedy) or
    distributions after each prefix, `q_KV` the draft's distributions (sampling)."""
    if params.greedy:
        best = p_SV.argmax(-1).tolist()
        n = next((i for i, x in enumerate(drafts) if x != best[i]), len(drafts))
        return n, best[n]
    for i, x in enumerate(drafts):
        ratio = float(p_SV[i, x]) / max(float(q_KV[i, x]), 1e-30)
        if float(torch.rand((), generator=gen, device=p_SV.device)) >= ratio:
            residual = (p_SV[i] - q_KV[i]).clamp_min(0)
            total = float(residual.sum())
            dist = residual / total if total > 0 else p_SV[i]
            return i, int(torch.multinomial(dist, 1, generator=gen))
    return len(drafts), int(torch.multinomial(p_SV[len(drafts)], 1, generator=gen))

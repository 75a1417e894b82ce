"""Speculative decoding inside the continuous-batching engine (`Engine(draft=...)`, `serve --draft`).

Each decode step of the engine becomes a round for every running request: the draft runs the tokens its cache
lacks (one or two per row), proposes `draft_k` tokens per row, each drawn with the row's own sampling settings and
generator; the model runs each row's last token and its proposals as one multi-token step over the shared cache;
each row accepts by `speculative.accept` (greedy: while the proposal is the model's argmax; sampled: the rejection
rule, so tokens follow the model's distribution exactly) and receives the accepted tokens and one more through the
engine's `_deliver` (stops, logprobs, text), and both caches forget the positions after what was kept. The slot's
`pending` holds the tokens the draft's cache lacks, ending with the slot's `last`.

Shape legend: B engine slots, k proposals, S = k + 1 verified tokens, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from behemoth.inference.cache import KVCache
from behemoth.inference.generate import decode_step, padded, prefill
from behemoth.inference.speculative import accept, probs

if TYPE_CHECKING:
    from behemoth.inference.engine import Engine


def load_with_draft(engine: Engine, i: int, src: KVCache, j: int, n: int) -> None:
    """Move a prefilled prompt (row j of `src`, n tokens) into slot i of the engine's cache, by position (the slot
    cache keeps `draft_k` more chunked slots), and prefill the draft's cache for it."""
    engine.cache.load_prefix(i, src, j, n)
    req = engine.slots[i].request
    dfresh = KVCache(engine.draft.config, 1, n, device=engine.device, dtype=engine.dcache.dtype)
    # a draft with a vision tower sees the prompt's pictures; one without reads their tokens as plain tokens
    pixels = req.pixel_values if getattr(engine.draft.config, "vision", None) is not None else None
    with torch.no_grad():
        prefill(engine.draft, [req.prompt_ids], dfresh, None if pixels is None else pixels.to(engine.device),
                chunk=engine.prefill_chunk)
    engine.dcache.load_prefix(i, dfresh, 0, n)


def spec_round(engine: Engine) -> None:
    """One round of speculative decoding for every running request of the engine (module docstring)."""
    k, B, dev = engine.draft_k, engine.max_batch, engine.device
    active = [i for i, s in enumerate(engine.slots) if s is not None and s.prefill is None]
    if not active:
        return
    S = {i: engine.slots[i] for i in active}
    drafts, q = _propose(engine, S)
    with torch.no_grad():
        rows = [[S[i].last, *drafts[i]] if i in S else [] for i in range(B)]
        ids_BS, pos_BS = padded(rows, dev, [S[i].pos if i in S else 0 for i in range(B)])
        model = engine.runner.model
        logits_BSV = model.logits(model.hidden_states(ids_BS, pos_BS, cache=engine.cache)).float()
    engine.stats.steps += 1
    engine.stats.positions += B * (k + 1)
    engine.stats.max_active = max(engine.stats.max_active, len(active))
    keep, dkeep = [0] * B, [0] * B
    for i in active:
        s, params = S[i], S[i].request.params
        p = logits_BSV[i] if params.greedy else probs(logits_BSV[i], params, logits_BSV.shape[-1])
        n, nxt = accept(drafts[i], p, torch.stack(q[i]) if q[i] else None, params, s.generator)
        engine.stats.drafted += k
        engine.stats.accepted += n
        logp_SV = logits_BSV[i].log_softmax(-1) if s.request.wants_logprobs else None
        for j, t in enumerate(drafts[i][:n] + [nxt]):
            engine._deliver(i, t, None if logp_SV is None else logp_SV[j])
            if engine.slots[i] is None:
                break
        if engine.slots[i] is not None:
            s.pending = ([drafts[i][-1]] if n == k else []) + [nxt]  # the draft ran all its proposals but the last
            keep[i] = s.pos  # the newest token, at s.pos, is in neither cache yet
            dkeep[i] = s.pos - len(s.pending) + 1
    engine.cache.truncate(keep)
    engine.dcache.truncate(dkeep)


def _propose(engine: Engine, S: dict) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
    """Each running slot's k proposals from the draft (its cache first catching up on the slot's `pending` tokens),
    and for sampled slots the draft's distributions [V] they were drawn from."""
    k, B, dev = engine.draft_k, engine.max_batch, engine.device
    active = list(S)
    with torch.no_grad():
        two = {i for i in active if len(S[i].pending) >= 2}  # the draft lacks the token before `last` too
        if two:
            decode_step(engine.draft, torch.tensor([S[i].pending[-2] if i in two else 0 for i in range(B)],
                                                 device=dev),
                        torch.tensor([S[i].pos - 1 if i in two else -1 for i in range(B)], device=dev),
                        engine.dcache)
        drafts: dict[int, list[int]] = {i: [] for i in active}
        q: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        tok = {i: S[i].last for i in active}
        for step in range(k):
            logits_BV = decode_step(
                engine.draft, torch.tensor([tok.get(i, 0) for i in range(B)], device=dev),
                torch.tensor([S[i].pos + step if i in S else -1 for i in range(B)], device=dev), engine.dcache)
            for i in active:
                params = S[i].request.params
                if params.greedy:
                    t = int(logits_BV[i].float().argmax())
                else:
                    dist = probs(logits_BV[i:i + 1], params, engine.runner.model.config.vocab_size)[0]
                    q[i].append(dist)
                    t = int(torch.multinomial(dist, 1, generator=S[i].generator))
                drafts[i].append(t)
                tok[i] = t
    return drafts, q

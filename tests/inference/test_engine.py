"""The continuous-batching engine without HTTP: requests joining a running batch get the answers they
would get alone, seeded sampling does not depend on the company a request keeps, and cancelled
requests free their slots."""

from __future__ import annotations

import pytest
import torch

from behemoth.inference.engine import Engine, Request
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams


def answer(req: Request) -> tuple[str, str]:
    text = ""
    while True:
        kind, value = req.events.get(timeout=60)
        assert kind != "error", value
        if kind == "text":
            text += value
        else:
            assert text == value.text
            return value.text, value.finish_reason


@pytest.fixture(scope="module")
def runner(char_model_dir):
    return Runner.load(char_model_dir)


def test_requests_joining_a_running_batch_match_their_solo_answers(runner):
    prompts = [runner.encode_prompt(f"Q: {a}*{a}=?\nA:") for a in range(3, 9)]
    params = [SamplingParams(max_new_tokens=n, stop_ids=(runner.tokenizer.eos_id,)) for n in (40, 5, 25, 12, 33, 8)]
    solo = [runner.complete([p], sp)[0].text for p, sp in zip(prompts, params, strict=True)]
    engine = Engine(runner, max_batch=4)  # fewer slots than requests: some wait, then take freed slots
    try:
        reqs = [engine.submit(Request(p, sp)) for p, sp in zip(prompts, params, strict=True)]
        got = [answer(r)[0] for r in reqs]
        assert got == solo
        assert engine.stats.max_active == 4 and engine.active == 0
    finally:
        engine.close()


def test_seeded_sampling_is_independent_of_the_batch(runner):
    p = runner.encode_prompt("Q:")
    sp = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11)
    engine = Engine(runner, max_batch=4)
    try:
        alone = answer(engine.submit(Request(p, sp)))
        others = [engine.submit(Request(runner.encode_prompt(f"Q: {i}"), SamplingParams(max_new_tokens=30,
                                                                                         temperature=1.0)))
                  for i in range(3)]
        again = answer(engine.submit(Request(p, sp)))
        for r in others:
            answer(r)
        assert alone == again
    finally:
        engine.close()


def test_cancelled_and_oversized_requests(runner):
    engine = Engine(runner, max_batch=2, max_len=256)
    try:
        with pytest.raises(ValueError, match="exceeds the context of 256"):
            engine.submit(Request([1] * 200, SamplingParams(max_new_tokens=100)))
        r = engine.submit(Request(runner.encode_prompt("Q:"), SamplingParams(max_new_tokens=200)))
        r.events.get(timeout=60)  # running
        r.cancel()
        quick = engine.submit(Request(runner.encode_prompt("Q:"), SamplingParams(max_new_tokens=3)))
        assert answer(quick)[1] == "length"
        assert engine.stats.cancelled == 1 and engine.active == 0
    finally:
        engine.close()


@pytest.mark.slow
def test_compiled_engine_gives_the_same_answers(runner):
    """`serve --compile`: the decode step over all slots compiled once (about 20 s on CPU)."""
    prompts = [runner.encode_prompt(f"Q: {a}+1=?\nA:") for a in range(5)]
    sp = SamplingParams(max_new_tokens=20)
    solo = [runner.complete([p], sp)[0].text for p in prompts]
    engine = Engine(runner, max_batch=4, compile=True)
    try:
        assert [answer(engine.submit(Request(p, sp)))[0] for p in prompts[:1]] == solo[:1]  # compiles
        reqs = [engine.submit(Request(p, sp)) for p in prompts]
        assert [answer(r)[0] for r in reqs] == solo
    finally:
        engine.close()


def test_chunked_prefill_gives_the_same_tokens_and_lets_others_decode_meanwhile(runner):
    """A long prompt prefilled 64 tokens at a time (across attention chunks of 32) answers as when prefilled whole,
    and a short request admitted with it decodes while the long one is still being prefilled."""
    from behemoth.data.tasks import make_problems

    long_prompt = runner.encode_prompt("".join(p.text for p in make_problems("train", 12, seed=3)) + "Q: 12+7=?\nA:")
    assert len(long_prompt) > 300
    short = runner.encode_prompt("Q: 3*4=?\nA:")
    params = SamplingParams(max_new_tokens=12, stop_ids=())
    answers = {}
    for chunk in (None, 64):
        engine = Engine(runner, max_batch=4, background=False, prefill_chunk=chunk)
        order: list[str] = []
        reqs = {}
        for name, ids in (("long", long_prompt), ("short", short)):
            r = Request(ids, params)
            r.on_event = lambda kind, name=name, order=order: order.append(f"{name}:{kind}")
            reqs[name] = engine.submit(r)
        engine.run_until_done()
        answers[chunk] = {name: answer(r) for name, r in reqs.items()}
        if chunk:
            first_long = order.index("long:text") if "long:text" in order else order.index("long:done")
            assert order.index("short:text") < first_long  # the short one was answered during the long prefill
            assert order[:first_long].count("short:text") >= 4
        engine.close()
    assert answers[None] == answers[64]


def test_prefix_cache_hits_give_the_same_tokens_as_misses(runner):
    """Requests sharing a long beginning (a system prompt crossing attention chunks of 32 tokens) and follow-ups that
    extend an earlier prompt with its answer reuse the cached keys, and answer exactly as without the cache; images
    and scored prompts take no prefix."""
    from behemoth.data.tasks import make_problems

    system = runner.encode_prompt("".join(p.text for p in make_problems("train", 3, seed=5)))
    assert len(system) > 70
    questions = [runner.encode_prompt(f"Q: {a}*7=?\nA:") for a in (3, 4, 5, 6)]
    params = SamplingParams(max_new_tokens=10, stop_ids=())
    results = {}
    for budget in (0, 1 << 26):
        engine = Engine(runner, max_batch=2, background=False, prefill_chunk=48, prefix_cache_bytes=budget)
        got = []
        first = engine.submit(Request(system + questions[0], params))
        engine.run_until_done()
        events = [first.events.get_nowait() for _ in range(first.events.qsize())]
        done = events[-1][1]
        got.append((done.text, done.finish_reason))
        follow = system + questions[0] + done.token_ids + questions[1]
        reqs = [engine.submit(Request(system + q, params)) for q in questions[1:]]  # the system prompt
        reqs.append(engine.submit(Request(follow, params)))  # the first prompt and its answer
        engine.run_until_done()
        got += [answer(r) for r in reqs]
        results[budget] = got
        if budget:
            st = engine.stats.prefix
            assert st.hits == 4  # every request after the first
            assert st.reused_tokens >= 3 * len(system) + len(system + questions[0]) + len(done.token_ids) - 1
        engine.close()
    assert results[0] == results[1 << 26]


def test_prefix_cache_keeps_within_its_budget_and_prefers_the_longer_sequence(runner):
    from behemoth.inference.cache import KVCache
    from behemoth.inference.prefix_cache import PrefixCache

    cfg = runner.model.config
    one = KVCache(cfg, 1, 40).nbytes()
    pc = PrefixCache(max_bytes=int(2.5 * one))
    caches = []
    for seed in range(3):
        ids = [1 + (seed + t) % 30 for t in range(40)]
        c = KVCache(cfg, 1, 40)
        c.plan_extend(torch.arange(40)[None])  # positions 0..39 held (values are zeros: only bookkeeping here)
        caches.append((ids, c))
        pc.store(ids, c, 0)
    assert len(pc.entries) == 2 and pc.stats.evicted == 1 and pc.nbytes <= pc.max_bytes
    ids0 = caches[0][0]
    assert pc.lookup(ids0 + [5])[0] == 0  # the oldest was evicted
    ids2 = caches[2][0]
    assert pc.lookup(ids2 + [5])[0] == 40 and pc.lookup(ids2)[0] == 39  # the last prompt token is always run
    longer = KVCache(cfg, 1, 60)
    longer.plan_extend(torch.arange(60)[None])
    pc.store(ids2 + [7] * 20, longer, 0)  # extends the entry of ids2, which it replaces
    assert len(pc.entries) <= 2 and all(len(e.ids) != 40 or e.ids[0] != ids2[0] for e in pc.entries.values())


def test_reusable_prefix_respects_chunks(runner):
    """A chunked layer keeps only its current chunk: reusing a row up to a point in an earlier chunk falls back to
    that chunk's start; a row that stops early is reusable up to where it stops."""
    from behemoth.inference.cache import CHUNKED, GLOBAL, KVCache

    cfg = runner.model.config
    C = cfg.attention_chunk_size
    c = KVCache(cfg, 1, 4 * C)
    c.plan_extend(torch.arange(2 * C + 5)[None])  # ran into the third chunk
    for t in c.k:
        t.copy_(torch.randn_like(t))
    assert c.reusable(0, 2 * C + 3) == 2 * C + 3  # same chunk
    assert c.reusable(0, C + 7) == C  # an earlier chunk: its keys are gone
    assert c.reusable(0, 3 * C) == 2 * C + 5  # beyond what the row holds
    other = KVCache(cfg, 1, 2 * C + 3)
    other.load_prefix(0, c, 0, 2 * C + 3)
    assert set(c.pos) == {CHUNKED, GLOBAL}  # the model has both kinds of layer
    assert sorted(p for p in other.pos[GLOBAL][0].tolist() if p >= 0) == list(range(2 * C + 3))
    assert sorted(p for p in other.pos[CHUNKED][0].tolist() if p >= 0) == list(range(2 * C, 2 * C + 3))
    for layer, kind in enumerate(c.layer_kind):  # the keys moved with their positions
        want = torch.arange(2 * C + 3) if kind == GLOBAL else torch.arange(2 * C, 2 * C + 3)
        src = [(c.pos[kind][0] == p).nonzero()[0, 0] for p in want]
        dst = [(other.pos[kind][0] == p).nonzero()[0, 0] for p in want]
        assert torch.equal(other.k[layer][0, :, dst], c.k[layer][0, :, src])
    assert other.reusable(0, 2 * C + 3) == 2 * C + 3


@pytest.mark.parametrize("k", [1, 3])
def test_a_draft_model_in_the_engine_changes_no_greedy_token(runner, k):
    """Speculative decoding in the continuous-batching engine: requests of different lengths joining and leaving,
    a long one prefilled in chunks (across 32-token attention chunks), greedy ones answered exactly as without a
    draft; sampled ones complete with their own seeds; the draft's proposals are counted."""
    from behemoth import build_model
    from behemoth.data.tasks import make_problems

    draft = build_model(runner.model.config.replace(n_layers=2), seed=3).eval()  # a poor draft: many rejections
    prompts = [runner.encode_prompt(f"Q: {a}*{a}=?\nA:") for a in range(3, 8)]
    prompts.append(runner.encode_prompt("".join(p.text for p in make_problems("train", 4, seed=3)) + "Q: 2+2=?\nA:"))
    lengths = (40, 5, 25, 12, 33, 20)
    answers = {}
    for d in (None, draft, runner.model):  # no draft, a poor one, the model itself (every proposal accepted)
        engine = Engine(runner, max_batch=3, background=False, prefill_chunk=64, draft=d, draft_k=k)
        reqs = [engine.submit(Request(p, SamplingParams(max_new_tokens=n, stop_ids=(runner.tokenizer.eos_id,))))
                for p, n in zip(prompts, lengths, strict=True)]
        sampled = engine.submit(Request(prompts[0], SamplingParams(max_new_tokens=30, temperature=1.0, seed=5)))
        engine.run_until_done()
        answers[d is None, d is runner.model] = [answer(r) for r in reqs]
        assert answer(sampled)[1] in ("stop", "length")
        if d is not None:
            assert engine.stats.drafted > 0
        if d is runner.model:
            assert engine.stats.accepted == engine.stats.drafted or engine.stats.accepted > 0.9 * engine.stats.drafted
        engine.close()
    assert answers[False, False] == answers[True, False] == answers[False, True]

"""The continuous-batching engine without HTTP: requests joining a running batch get the answers they
would get alone, seeded sampling does not depend on the company a request keeps, and cancelled
requests free their slots."""

from __future__ import annotations

import pytest

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

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

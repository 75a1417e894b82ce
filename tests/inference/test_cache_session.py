"""A conversation's cache kept across turns (`CacheSession`, `behemoth chat`): each turn prefills only what is new,
and the tokens are those of a fresh prefill of the whole conversation."""

from __future__ import annotations

import pytest

from behemoth.data.tasks import make_problems
from behemoth.inference import interactive
from behemoth.inference.generate import CacheSession, token_steps
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def runner(char_model_dir):
    return Runner.load(char_model_dir)


def run(runner, ids, params, session=None) -> list[int]:
    return [int(t[0]) for t in token_steps(runner.model, [ids], params, session=session)]


def test_a_session_reuses_the_conversation_and_changes_no_token(runner):
    params = SamplingParams(max_new_tokens=20, stop_ids=())
    session = CacheSession()
    text = "".join(p.text for p in make_problems("train", 2, seed=1))
    ids = runner.encode_prompt(text + "Q: 3+4=?\nA:")
    reused = []
    for turn in range(4):  # each turn: the conversation so far, its answer, a new question (crossing 32-token chunks)
        got, fresh = run(runner, ids, params, session), run(runner, ids, params)
        assert got == fresh
        reused.append(session.reused)
        assert session.held() == ids + got[:-1]  # every token but the last was run into the cache
        ids = ids + got[:7] + runner.encode_prompt(f"Q: {turn}*9=?\nA:")[1:]  # the answer cut short, as a stop would
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    assert session.cache.max_len >= len(ids)  # it grew with the conversation
    # a prompt that shares nothing starts afresh
    other = runner.encode_prompt("Q: 9-9=?\nA:")
    assert run(runner, other, params, session) == run(runner, other, params)
    assert session.reused <= 1  # at most the BOS they share


def chat(runner, lines, params, draft=None):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return interactive.chat_loop(runner, params, read=read, draft=draft)


def test_chat_prefills_only_the_new_turn(runner, capsys):
    params = runner.params(True, max_new_tokens=8)
    history = chat(runner, ["3+4=?", "5*6=?", "2+2=?"], params)
    stats = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(stats) == 3 and "reused" not in stats[0] and "reused" in stats[1] and "reused" in stats[2]
    # the third answer is that of a fresh prefill of the whole conversation
    fresh = runner.stream(runner.encode_chat(history[:5]), params, runner.chat.stop_strings, lstrip=True)
    while True:
        try:
            next(fresh)
        except StopIteration as stop:
            assert stop.value.text == history[5]["content"]
            break
    chat(runner, ["3+4=?", "/reset", "5*6=?"], params)
    stats = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(stats) == 2 and not any("reused" in s for s in stats)  # /reset forgets the cache


def test_chat_with_a_draft_answers_as_without(runner, capsys):
    """`chat --draft`: the same greedy answers, printed as they come, with the share of drafts accepted per turn."""
    from behemoth import build_model
    from behemoth.inference.runner import Draft

    params = runner.params(True, max_new_tokens=12)
    lines = ["3+4=?", "5*6=?", "2+2=?"]
    plain = chat(runner, lines, params)
    capsys.readouterr()
    draft = Draft(build_model(runner.model.config.replace(n_layers=2), seed=2).eval(), k=3)
    spec = chat(runner, lines, params, draft=draft)
    assert spec == plain
    captured = capsys.readouterr()
    stats = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(stats) == 3 and all("drafted tokens accepted" in s for s in stats)
    assert all(m["content"] in captured.out for m in spec if m["role"] == "assistant")

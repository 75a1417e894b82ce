"""The terminal front ends: one-shot generation and the interactive chat loop.

Both print progress the way a user wants it: text as it is generated (with `stream`), then one line
on stderr with the token count and speed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Sequence
from typing import TextIO

import torch

from behemoth.inference.generate import CacheSession
from behemoth.inference.runner import Draft, Runner
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.text import Completion

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system message), "
        "/image PATH (attach an image to your next message), /exit")


def run_generate(runner: Runner, prompts: list[str], params: SamplingParams, stop_strings: tuple[str, ...] = (),
                 chat: bool = False, system: str | None = None, stream: bool = False, compile: bool = False,
                 images: Sequence[str] = (), out: TextIO | None = None, err: TextIO | None = None,
                 draft: Draft | None = None, prefill_chunk: int | None = None) -> list[str]:
    """Complete each prompt (as raw text, or as a user turn with `chat`); several prompts run as one
    batch. `images` (files) go before the text of a single prompt; `draft`: decode speculatively;
    `prefill_chunk`: prefill the prompts that many tokens at a time (bounded activations for long prompts).
    Returns the texts."""
    out, err = out or sys.stdout, err or sys.stderr
    if images and len(prompts) > 1:
        raise ValueError("--image goes with a single --prompt")
    loaded = [runner.image(path) for path in images]
    blocks = [b for b, _ in loaded]
    pixels = torch.cat([px for _, px in loaded]) if loaded else None

    def encode(p: str) -> list[int]:
        if not chat:
            return runner.encode_prompt_with_images(p, blocks) if blocks else runner.encode_prompt(p)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": _user_content(p, blocks)}]
        return runner.encode_chat(msgs)

    ids = [encode(p) for p in prompts]
    stop_strings = tuple(stop_strings) + (runner.chat.stop_strings if chat else ())
    t0 = time.perf_counter()
    if draft is not None and stream:
        raise ValueError("--draft does not stream: leave out --stream")
    if stream and len(ids) == 1:
        done = _print_stream(runner.stream(ids[0], params, stop_strings, lstrip=chat, compile=compile,
                                           pixel_values=pixels, prefill_chunk=prefill_chunk), out)
        texts, n = [done.text], len(done.token_ids)
    else:
        done = runner.complete(ids, params, stop_strings, lstrip=chat, compile=compile, pixel_values=pixels,
                               draft=draft, prefill_chunk=prefill_chunk)
        texts = [c.text for c in done]
        n = sum(len(c.token_ids) for c in done)
        for i, t in enumerate(texts):
            if len(texts) > 1:
                out.write(f"--- {i}\n")
            out.write(t + "\n")
    dt = time.perf_counter() - t0
    err.write(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s, {len(ids)} prompt(s)]\n")
    if draft is not None and draft.stats is not None:
        st = draft.stats
        err.write(f"[speculative: {st.accepted} of {st.drafted} drafted tokens accepted ({st.acceptance:.0%}), "
                  f"{st.tokens_per_step:.2f} tokens per target step and row, k {st.ks[0] if st.ks else draft.k}"
                  f"{f'..{st.ks[-1]} (adaptive)' if draft.adaptive and st.ks else ''}]\n")
    return texts


def _user_content(text: str, blocks: Sequence[list[int]]) -> str | list[dict]:
    """A user message: the images' token blocks first, then the text."""
    if not blocks:
        return text
    return [*({"type": "tokens", "ids": b} for b in blocks), {"type": "text", "text": text}]


def _draft_engine(runner: Runner, draft: Draft | None):
    """A one-slot engine decoding with `draft` (its prefix cache keeps the conversation); None without a draft."""
    if draft is None:
        return None
    from behemoth.inference.engine import Engine

    return Engine(runner, max_batch=1, background=False, draft=draft.model, draft_k=draft.k,
                  prefix_cache_bytes=256 << 20)


def _attach(runner: Runner, path: str, pending: list, err: TextIO) -> None:
    """`/image PATH`: the image's token block and tiles go with the next user message."""
    try:
        pending.append(runner.image(path, path))
    except ValueError as e:
        err.write(f"error: {e}\n")
        return
    err.write(f"(image attached: {pending[-1][1].shape[0]} tile(s))\n")


def _answer(runner: Runner, ids: list[int], params: SamplingParams, pixel_values: torch.Tensor | None, engine,
            session: CacheSession, out: TextIO, err: TextIO) -> Completion:
    """One chat answer, printed as it comes, then its stats line: through the speculative engine when there is one,
    else streamed with the conversation's cache (a conversation with images starts it afresh)."""
    t0 = time.perf_counter()
    if engine is not None:
        before = (engine.stats.drafted, engine.stats.accepted)
        done = _engine_turn(engine, ids, params, runner.chat.stop_strings, pixel_values, out)
        drafted, accepted = engine.stats.drafted - before[0], engine.stats.accepted - before[1]
        note = f", {accepted / max(drafted, 1):.0%} of {drafted} drafted tokens accepted"
    else:
        if pixel_values is not None:
            session.clear()
        done = _print_stream(runner.stream(ids, params, runner.chat.stop_strings, lstrip=True,
                                           pixel_values=pixel_values,
                                           session=None if pixel_values is not None else session), out)
        note = f", {session.reused} of {len(ids)} prompt tokens reused" if session.reused else ""
    n = len(done.token_ids)
    err.write(f"[{n} tokens, {n / max(time.perf_counter() - t0, 1e-9):.1f} tokens/s{note}]\n")
    return done


def _engine_turn(engine, ids: list[int], params: SamplingParams, stop_strings: tuple[str, ...],
                 pixel_values: torch.Tensor | None, out: TextIO) -> Completion:
    """One answer through a one-slot engine run here (`background=False`), printed piece by piece as it comes."""
    from behemoth.inference.engine import Request

    done: list[Completion] = []

    def show(kind: str) -> None:
        while not req.events.empty():
            what, value = req.events.get_nowait()
            if what == "text":
                out.write(value)
                out.flush()
            elif what == "done":
                done.append(value)
            else:
                raise RuntimeError(value)

    req = Request(list(ids), params, stop_strings=stop_strings, lstrip=True, pixel_values=pixel_values, on_event=show)
    engine.submit(req)
    engine.run_until_done()
    out.write("\n")
    return done[0]


def _print_stream(pieces: Generator[str, None, Completion], out: TextIO) -> Completion:
    """Print text pieces as they come; the generator's return value is the finished `Completion`."""
    while True:
        try:
            out.write(next(pieces))
            out.flush()
        except StopIteration as stop:
            out.write("\n")
            return stop.value


def chat_loop(runner: Runner, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, out: TextIO | None = None,
              err: TextIO | None = None, draft: Draft | None = None) -> list[dict]:
    """Read user turns until EOF or /exit; stream each answer; keep the conversation. Returns it.

    The conversation's KV cache is kept from turn to turn (`CacheSession`), so a turn prefills only what is new
    since the last: its own message and the template around it (a conversation with images is prefilled whole).
    With `draft`, answers are decoded speculatively in a one-slot engine (`inference.engine`), whose prefix cache
    then keeps the conversation."""
    out, err = out or sys.stdout, err or sys.stderr
    history: list[dict] = []
    session, engine = CacheSession(), _draft_engine(runner, draft)
    context = engine.max_len if engine is not None else runner.max_len
    pending: list[tuple[list[int], torch.Tensor]] = []  # images for the next user message
    pixels: list[torch.Tensor] = []  # every image of the conversation, in order
    err.write(f"chatting with {runner.name} ({runner.chat.name} format). {HELP}\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        cmd = line.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            return history
        if cmd == "/reset":
            history, pending, pixels = [], [], []
            session.clear()
            err.write("(conversation cleared)\n")
            continue
        if cmd.startswith("/image"):
            _attach(runner, cmd[len("/image"):].strip(), pending, err)
            continue
        if cmd.startswith("/system"):
            system = cmd[len("/system"):].strip() or None
            err.write(f"(system message {'set' if system else 'cleared'})\n")
            continue
        if cmd.startswith("/"):
            err.write(f"unknown command {cmd.split()[0]}; {HELP}\n")
            continue
        user = {"role": "user", "content": _user_content(line, [b for b, _ in pending])}
        msgs = ([{"role": "system", "content": system}] if system else []) + history + [user]
        ids = runner.encode_chat(msgs)
        turn_pixels = pixels + [px for _, px in pending]
        room = context - len(ids)
        if room < 1:
            err.write(f"(the conversation has {len(ids)} tokens, the context {context}: use /reset)\n")
            continue
        turn = SamplingParams(**{**params.__dict__, "max_new_tokens": min(params.max_new_tokens, room),
                                 "stop_ids": params.stop_ids + runner.chat.stop_ids})
        done = _answer(runner, ids, turn, torch.cat(turn_pixels) if turn_pixels else None, engine, session, out, err)
        history += [user, {"role": "assistant", "content": done.text}]
        pixels, pending = turn_pixels, []

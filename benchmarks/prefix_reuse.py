"""Time to first token with and without reuse: requests that share a system prompt in the serving engine (the prefix
cache, `serve --prefix-cache-mb`), and the turns of one conversation (`behemoth chat`'s cache kept across turns).

A random `mini-maverick` (the character vocabulary) in this process, fp32:

* server: `--requests` requests, each a shared system prompt of `--system` tokens and a question of its own of
  `--question` tokens, sent one after another (each after the previous one finished, so the time to its first
  token is its prefill alone), 8 new tokens each; the engine without a prefix cache, then with one;
* chat: a conversation of `--turns` turns, each a message of `--question` tokens and an answer of 32 tokens, the
  whole conversation as each turn's prompt; each turn prefilled whole, then with the conversation's cache kept.

Recorded: each request's or turn's time to first token, and their medians after the first (the first is a miss
either way). The tokens are checked equal with and without reuse.

    .venv/bin/python benchmarks/prefix_reuse.py

Results go to benchmarks/results/prefix_reuse_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info  # noqa: E402

from behemoth import build_model  # noqa: E402
from behemoth.config import PRESETS  # noqa: E402
from behemoth.data.tasks import ALPHABET  # noqa: E402
from behemoth.data.tokenizer import Tokenizer  # noqa: E402
from behemoth.inference.engine import Engine, Request  # noqa: E402
from behemoth.inference.generate import CacheSession, token_steps  # noqa: E402
from behemoth.inference.runner import Runner  # noqa: E402
from behemoth.inference.sampling import SamplingParams  # noqa: E402
from behemoth.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def tokens(n: int, salt: int) -> list[int]:
    """n token ids of the 64-token vocabulary (never 0), different for each salt."""
    return [(salt * 31 + 7 * j + j * j) % 60 + 1 for j in range(n)]


def server(runner: Runner, system: int, question: int, requests: int, budget: int) -> dict:
    engine = Engine(runner, max_batch=4, max_len=system + question + 16, prefix_cache_bytes=budget)
    shared = tokens(system, 0)
    ttft, answers = [], []
    for i in range(requests):
        first: list[float] = []
        req = Request(shared + tokens(question, i + 1), SamplingParams(max_new_tokens=8, stop_ids=()),
                      on_event=lambda kind, first=first: first.append(time.perf_counter()))
        t0 = time.perf_counter()
        engine.submit(req)
        while True:
            kind, value = req.events.get(timeout=600)
            if kind == "error":
                raise RuntimeError(value)
            if kind == "done":
                break
        ttft.append(first[0] - t0)
        answers.append(value.token_ids)
    stats = engine.stats.prefix
    engine.close()
    return {"prefix_cache_bytes": budget, "ttft_s": ttft, "median_ttft_after_first_s": statistics.median(ttft[1:]),
            "reused_tokens": stats.reused_tokens if stats else 0, "answers": answers}


def chat(runner: Runner, question: int, turns: int, reuse: bool) -> dict:
    session = CacheSession() if reuse else None
    ids: list[int] = []
    ttft, answers, reused = [], [], []
    params = SamplingParams(max_new_tokens=32, stop_ids=())
    for turn in range(turns):
        ids = ids + tokens(question, 100 + turn)
        t0 = time.perf_counter()
        answer = []
        for i, t in enumerate(token_steps(runner.model, [ids], params, session=session)):
            if i == 0:
                ttft.append(time.perf_counter() - t0)
            answer.append(int(t[0]))
        answers.append(answer)
        reused.append(session.reused if session else 0)
        ids = ids + answer
    return {"reuse": reuse, "prompt_tokens": [question * (t + 1) + 32 * t for t in range(turns)], "ttft_s": ttft,
            "median_ttft_after_first_s": statistics.median(ttft[1:]), "reused_tokens": reused, "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", type=int, default=2048, help="tokens of the shared system prompt")
    p.add_argument("--question", type=int, default=64, help="tokens of each request's own part, each chat message")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_chars(ALPHABET)
    context = max(args.system + args.question + 16, args.turns * (args.question + 32) + 32)
    model = build_model(PRESETS["mini-maverick"].replace(vocab_size=64, max_seq_len=context), seed=0).eval()
    runner = Runner(model, tok, name="mini-maverick")
    srv = [server(runner, args.system, args.question, args.requests, budget) for budget in (0, 1 << 30)]
    conv = [chat(runner, args.question, args.turns, reuse) for reuse in (False, True)]
    same = srv[0]["answers"] == srv[1]["answers"] and conv[0]["answers"] == conv[1]["answers"]
    for r in srv:
        print(f"server, {args.requests} requests sharing a {args.system}-token system prompt, prefix cache "
              f"{'on' if r['prefix_cache_bytes'] else 'off'}: time to first token {r['ttft_s'][0] * 1e3:.0f} ms for "
              f"the first, median {r['median_ttft_after_first_s'] * 1e3:.0f} ms after", flush=True)
    for r in conv:
        print(f"chat, {args.turns} turns, cache {'kept' if r['reuse'] else 'not kept'} across turns: time to first "
              f"token {', '.join(f'{t * 1e3:.0f}' for t in r['ttft_s'])} ms", flush=True)
    print(f"same tokens with and without reuse: {same}")
    device = device_info(torch.device("cpu"))
    out = RESULTS / f"prefix_reuse_{device['type']}.json"
    out.write_text(json.dumps({
        "benchmark": "prefix_reuse", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": "python benchmarks/prefix_reuse.py " + " ".join(sys.argv[1:]), "device": device,
        "machine": machine_info(), "torch_threads": torch.get_num_threads(), "model": "mini-maverick (random), fp32",
        "system_tokens": args.system, "question_tokens": args.question, "same_tokens": same,
        "server": [{k: v for k, v in r.items() if k != "answers"} for r in srv],
        "chat": [{k: v for k, v in r.items() if k != "answers"} for r in conv]}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

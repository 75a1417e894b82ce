"""How long a long prompt stalls the requests already decoding: the running requests' worst inter-token gap when
one long prompt arrives among 8 streaming requests, with the prompt prefilled whole and in chunks
(`Engine(prefill_chunk=...)`, `serve --prefill-chunk`).

A random `mini-maverick` (the character vocabulary, a context of 40k tokens) in the serving engine, in this
process: 8 requests decode 200 tokens each; once they all run, a prompt of `--long` tokens arrives. Recorded per
setting: the worst and median gap between two tokens of the 8 running requests while the long prompt is being
prefilled, the long prompt's time to its first token, and the tokens the 8 produced meanwhile.

    .venv/bin/python benchmarks/prefill_gap.py --long 8192,32768

Results go to benchmarks/results/prefill_gap_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import threading
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
from behemoth.inference.runner import Runner  # noqa: E402
from behemoth.inference.sampling import SamplingParams  # noqa: E402
from behemoth.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CONTEXT = 40_000


def measure(runner: Runner, long: int, chunk: int | None) -> dict:
    engine = Engine(runner, max_batch=9, max_len=CONTEXT, prefill_chunk=chunk)
    stamps: dict[int, list[float]] = {}
    lock = threading.Lock()

    def stamp(i: int):
        def on_event(kind: str) -> None:
            with lock:
                stamps.setdefault(i, []).append(time.perf_counter())
        return on_event

    running = [engine.submit(Request([1 + i % 40] * 16, SamplingParams(max_new_tokens=200, temperature=1.0, seed=i,
                                                                          stop_ids=()), on_event=stamp(i)))
               for i in range(8)]
    while sum(len(stamps.get(i, [])) for i in range(8)) < 8 * 5:  # all 8 are decoding
        time.sleep(0.01)
    first: list[float] = []
    t0 = time.perf_counter()
    long_req = Request([(7 * j) % 50 + 1 for j in range(long)], SamplingParams(max_new_tokens=1, stop_ids=()),
                       on_event=lambda kind: first.append(time.perf_counter()))
    engine.submit(long_req)
    while not first:
        time.sleep(0.005)
    t1 = first[0]
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:  # every running request's next token, after the prefill
        with lock:
            if all(any(t > t1 for t in stamps[i]) for i in range(8)):
                break
        time.sleep(0.005)
    gaps = []
    with lock:
        for i in range(8):
            ts = [t for t in stamps[i] if t0 <= t <= t1]
            before = [t for t in stamps[i] if t < t0]
            ts = before[-1:] + ts  # the gap that spans the prompt's arrival counts too
            gaps += [b - a for a, b in zip(ts, ts[1:], strict=False)]
            after = [t for t in stamps[i] if t > t1]
            if ts and after:
                gaps.append(after[0] - ts[-1])  # the gap that spans the end of the prefill
        tokens_meanwhile = sum(sum(1 for t in stamps[i] if t0 <= t <= t1) for i in range(8))
    for r in running:
        r.cancel()
    engine.close()
    return {"long_prompt": long, "prefill_chunk": chunk, "time_to_first_token_s": t1 - t0,
            "worst_gap_s": max(gaps), "median_gap_s": statistics.median(gaps), "gaps": len(gaps),
            "tokens_meanwhile": tokens_meanwhile}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--long", default="8192,32768", help="long prompt lengths (comma-separated)")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--whole-up-to", type=int, default=8192, help="prefill whole only prompts up to this length "
                   "(a 32k prompt in one forward needs a dense [S, S] mask per layer)")
    args = p.parse_args()
    tok = Tokenizer.from_chars(ALPHABET)
    model = build_model(PRESETS["mini-maverick"].replace(vocab_size=64, max_seq_len=CONTEXT), seed=0).eval()
    runner = Runner(model, tok, name="mini-maverick")
    rows = []
    for long in map(int, args.long.split(",")):
        for chunk in ([None] if long <= args.whole_up_to else []) + [args.chunk]:
            r = measure(runner, long, chunk)
            rows.append(r)
            print(f"long prompt {long:,} tokens, prefill {'whole' if chunk is None else f'in chunks of {chunk}'}: "
                  f"worst gap {r['worst_gap_s'] * 1e3:.0f} ms, median {r['median_gap_s'] * 1e3:.0f} ms, first token "
                  f"of the long prompt after {r['time_to_first_token_s']:.2f} s, {r['tokens_meanwhile']} tokens "
                  "meanwhile", flush=True)
    device = device_info(torch.device("cpu"))
    out = RESULTS / f"prefill_gap_{device['type']}.json"
    out.write_text(json.dumps({"benchmark": "prefill_gap", "date": datetime.datetime.now(datetime.timezone.utc)
                               .isoformat(), "command": "python benchmarks/prefill_gap.py " + " ".join(sys.argv[1:]),
                               "device": device, "machine": machine_info(), "model": "mini-maverick (random)",
                               "running_requests": 8, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Server throughput under concurrent load: `behemoth serve`'s engine with continuous batching vs the
same server decoding one request at a time (`--max-batch 1`), and batching with the compiled decode
step (`--compile`); same model, same requests. One untimed request warms each server up first.

A random-weight model (the `--model` preset with the character tokenizer of the built-in tasks, so
its vocabulary is cut to 64) is saved and served on 127.0.0.1 by `behemoth serve` in its own process.
`--clients` threads each send `--requests` requests with the official `openai` client (alternating
completion / chat, streamed / not), greedy, `max_tokens = --max-tokens`; the prompts are held-out
task problems. Every answer is checked against the same model's offline greedy answer. Recorded:
requests answered and correct, generated tokens/s over the whole load (the engine's count over
wall-clock time), request latency p50/p95, and the most requests the engine decoded in one step
(from the server's /health).

    .venv/bin/python benchmarks/serve_load.py               # mini-maverick, 8 clients x 4 requests

Results go to benchmarks/results/serve_load_<device>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info  # noqa: E402

from behemoth import build_model  # noqa: E402
from behemoth.checkpoint import save_model  # noqa: E402
from behemoth.config import get_preset  # noqa: E402
from behemoth.data.tasks import ALPHABET, make_problems  # noqa: E402
from behemoth.data.tokenizer import Tokenizer  # noqa: E402
from behemoth.inference.runner import Runner  # noqa: E402
from behemoth.inference.sampling import SamplingParams  # noqa: E402


def offline_answer(runner: Runner, prompt: str, max_tokens: int, chat: bool) -> str:
    ids = runner.encode_chat([{"role": "user", "content": prompt}]) if chat else runner.encode_prompt(prompt)
    stop = runner.chat.stop_ids if chat else (runner.tokenizer.eos_id,)
    done = runner.complete([ids], SamplingParams(max_new_tokens=max_tokens, stop_ids=stop),
                           runner.chat.stop_strings if chat else (), lstrip=chat)
    return done[0].text


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
        return json.loads(r.read())


def load(model_dir: str, runner: Runner, max_batch: int, compile: bool, prompts: list[str], expected: dict,
         args: argparse.Namespace) -> dict:
    """Start `behemoth serve` as its own process (clients here do not share its interpreter), load it."""

    cmd = [sys.executable, "-m", "behemoth", "serve", "--model", model_dir, "--port", "0", "--name", "m",
           "--max-batch", str(max_batch)] + (["--compile"] if compile else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().split(" on ")[1].split()[0]
        return _load(url, runner, max_batch, compile, prompts, expected, args)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _load(url: str, runner: Runner, max_batch: int, compile: bool, prompts: list[str], expected: dict,
          args: argparse.Namespace) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    client.completions.create(model="m", prompt="Q:", max_tokens=2)  # warm-up (and compilation), not timed
    before = health(url)
    latencies, tokens, correct, errors = [], [], [], []

    def one(i: int) -> None:
        p, kind = prompts[i], i % 4
        chat, stream = kind >= 2, kind % 2 == 1
        t0 = time.perf_counter()
        try:
            if chat:
                r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}],
                                                   max_tokens=args.max_tokens, temperature=0, stream=stream)
                text = "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
            else:
                r = client.completions.create(model="m", prompt=p, max_tokens=args.max_tokens, temperature=0,
                                              stream=stream)
                text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        except Exception as e:  # recorded: a lost request is a result, not a crash
            errors.append(f"{i}: {type(e).__name__}: {e}")
            return
        latencies.append(time.perf_counter() - t0)
        correct.append(text == expected[(p, chat)])
        tokens.append(len(runner.tokenizer.encode(text)))

    def client_thread(c: int) -> None:
        for j in range(args.requests):
            one(c * args.requests + j)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = health(url)
    return {"max_batch": max_batch, "compile": compile, "requests": len(prompts), "answered": len(latencies),
            "correct": sum(correct),
            "errors": errors, "wall_s": wall, "completion_tokens": sum(tokens),
            "tokens_per_s": sum(tokens) / wall, "engine_tokens_per_s": (after["tokens"] - before["tokens"]) / wall,
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p95_s": sorted(latencies)[int(0.95 * (len(latencies) - 1))] if latencies else None,
            "max_active": after["max_active"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mini-maverick", help="model preset (random weights)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out")
    args = p.parse_args(argv)
    tok = Tokenizer.from_chars(ALPHABET)
    cfg = get_preset(args.model).replace(vocab_size=64)
    tmp = tempfile.TemporaryDirectory()
    d = tmp.name
    save_model(build_model(cfg, seed=0), d)
    tok.save(d)
    runner = Runner.load(d)
    n = args.clients * args.requests
    prompts = [q.prompt.removeprefix("Q: ").removesuffix("\nA:") if i % 4 >= 2 else q.prompt
               for i, q in enumerate(make_problems("test", n, seed=0))]
    expected = {(q, i % 4 >= 2): offline_answer(runner, q, args.max_tokens, i % 4 >= 2) for i, q in enumerate(prompts)}
    runs = [load(d, runner, mb, c, prompts, expected, args) for mb, c in ((8, False), (1, False), (8, True))]
    tmp.cleanup()
    for r in runs:
        name = f"max_batch {r['max_batch']}{' compiled' if r['compile'] else ''}"
        print(f"{name}: {r['answered']}/{r['requests']} answered, {r['correct']} correct, "
              f"{r['engine_tokens_per_s']:,.1f} generated tokens/s, latency p50 {r['latency_p50_s']:.2f}s "
              f"p95 {r['latency_p95_s']:.2f}s, most decoded together {r['max_active']}", flush=True)
    result = {"benchmark": "serve_load", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_info(torch.device("cpu")), "python": platform.python_version(),
              "torch": torch.__version__, "model": args.model, "params": cfg.num_params(),
              "active_params": cfg.num_active_params(), "clients": args.clients,
              "requests_per_client": args.requests, "max_tokens": args.max_tokens, "runs": runs,
              "speedup_batched": runs[0]["engine_tokens_per_s"] / runs[1]["engine_tokens_per_s"],
              "speedup_batched_compiled": runs[2]["engine_tokens_per_s"] / runs[1]["engine_tokens_per_s"]}
    out = Path(args.out or Path(__file__).parent / "results" / "serve_load_cpu.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"batched / one at a time: x{result['speedup_batched']:.2f} "
          f"(compiled x{result['speedup_batched_compiled']:.2f}); wrote {out}")


if __name__ == "__main__":
    main()

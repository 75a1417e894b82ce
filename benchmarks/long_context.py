"""Long context with bounded memory: a prompt of up to 256k tokens through `generate`, prefilled in chunks, with the
process's peak memory beside the KV cache's closed form.

Each context length runs in a process of its own (so that each peak is its own): a random `debug` model (fp32, its
context raised to fit) gets a prompt of L random tokens, prefilled `--chunk` tokens at a time (`generate(...,
prefill_chunk=...)`), then decodes 16 tokens. Recorded per length: the prefill's time, the decode's tokens/s, and
the peak resident memory above what the process held before generating (the model and the prompt), next to

  cache(L)  = `inference.cache.cache_bytes` for one row of L + 16 positions: the chunked layers' keys bounded by
              the attention chunk, the global layers' growing with L;
  pairs(L)  = the most query-key pairs one prefill piece scores, n x (keys before it + n): pieces are `--chunk`
              tokens until that would pass `generate.PREFILL_PAIRS` (2^26), then shorter, so pairs(L) stops
              growing at 64k tokens; the piece's boolean attention mask is that many bytes.

  copy(L)   = one global layer's keys and values: a multi-token step attends to the cache's keys concatenated with
              its own, a copy that grows with L like the cache.

The rest is the attention's buffers, which scale with the pairs (its float mask, its scores), the piece's
activations and the allocator's slack. The record fits peak = cache + copy + b x pairs + c over the lengths
(least squares, b and c the only free numbers) and plots it beside the measurements.

    .venv/bin/python benchmarks/long_context.py                  # 4k, 16k, 64k, 256k

Results go to benchmarks/results/long_context_<device>.json, the plot beside it (.png).
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_info  # noqa: E402

from behemoth import build_model  # noqa: E402
from behemoth.config import PRESETS  # noqa: E402
from behemoth.inference.cache import cache_bytes  # noqa: E402
from behemoth.inference.generate import PREFILL_PAIRS, piece_len, token_steps  # noqa: E402
from behemoth.inference.sampling import SamplingParams  # noqa: E402
from behemoth.machine import machine_info  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NEW = 16


def rss_bytes() -> int:
    """The process's resident memory now (/proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def one(length: int, chunk: int) -> dict:
    """Generate after a prompt of `length` tokens in this process; its figures."""
    cfg = PRESETS["debug"].replace(max_seq_len=length + NEW)
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(3, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=NEW, stop_ids=())
    before = rss_bytes()
    t0 = time.perf_counter()
    steps = token_steps(model, [prompt], params, prefill_chunk=chunk)
    next(steps)
    t1 = time.perf_counter()
    n = sum(1 for _ in steps)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    cache = cache_bytes(cfg, 1, length + NEW, torch.float32)
    pairs, done = 0, 0
    while done < length:  # the prefill's pieces, as `generate.prefill` cuts them
        piece = min(piece_len(chunk, done), length - done)
        pairs, done = max(pairs, piece * (done + piece)), done + piece
    mask = pairs
    return {"max_pairs": pairs, "kv_copy_bytes": kv_copy(cache["global"]), "context": length, "chunk": chunk,
            "prefill_s": t1 - t0, "decode_tok_s": n / (t2 - t1),
            "peak_above_start_bytes": peak - before, "cache_bytes": cache["total"],
            "cache_global_bytes": cache["global"], "cache_chunked_bytes": cache["chunked"], "mask_bytes": mask,
            }


def kv_copy(global_bytes: int) -> int:
    """One global layer's share of the global layers' cache bytes (debug preset)."""
    cfg = PRESETS["debug"]
    return global_bytes // max(1, sum(1 for rope in cfg.rope_layers if not (rope and cfg.attention_chunk_size)))


def fit_pairs(rows: list[dict]) -> dict:
    """Least squares of (peak - cache - copy) = b x pairs + c over the rows."""
    x = [r["max_pairs"] for r in rows]
    y = [r["peak_above_start_bytes"] - r["cache_bytes"] - r["kv_copy_bytes"] for r in rows]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    b = sum((a - mx) * (c - my) for a, c in zip(x, y, strict=True)) / max(sum((a - mx) ** 2 for a in x), 1e-9)
    return {"bytes_per_pair": b, "constant_bytes": my - b * mx}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [r["context"] for r in rows]
    mib = 2**20
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(L, [r["peak_above_start_bytes"] / mib for r in rows], "o-", label="peak memory (measured)")
    a.plot(L, [r["predicted_bytes"] / mib for r in rows], "s--",
           label="cache + K/V copy + b x pairs + c (b, c fitted)")
    a.plot(L, [r["cache_bytes"] / mib for r in rows], ":", label="KV cache (closed form)")
    a.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB above the model", title="memory")
    a.legend(fontsize=8)
    b.plot(L, [r["prefill_s"] for r in rows], "o-")
    b.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="seconds", title="prefill time")
    fig.suptitle(f"debug preset, fp32, prefill in chunks of {rows[0]['chunk']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="4096,16384,65536,262144")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--replot", action="store_true", help="refit and replot the recorded rows (runs nothing)")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.chunk)))
        return
    device = device_info(torch.device("cpu"))
    out = RESULTS / f"long_context_{device['type']}.json"
    if args.replot:  # the recorded measurements, refitted (the record keeps its date, command and machine)
        doc = json.loads(out.read_text())
        for r in doc["rows"]:
            r["kv_copy_bytes"] = kv_copy(r["cache_global_bytes"])
    else:
        doc = {"benchmark": "long_context", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "command": "python benchmarks/long_context.py " + " ".join(sys.argv[1:]), "device": device,
               "machine": machine_info(), "model": "debug (random), fp32", "new_tokens": NEW,
               "prefill_pairs_bound": PREFILL_PAIRS, "rows": []}
        for length in map(int, args.contexts.split(",")):
            res = subprocess.run([sys.executable, __file__, "--one", str(length), "--chunk", str(args.chunk)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            doc["rows"].append(r)
            print(f"context {length:,}: prefill {r['prefill_s']:.1f} s, decode {r['decode_tok_s']:.1f} tokens/s, "
                  f"peak {r['peak_above_start_bytes'] / 2**20:,.1f} MiB above the model (cache "
                  f"{r['cache_bytes'] / 2**20:,.1f}, largest piece's mask {r['mask_bytes'] / 2**20:,.1f})", flush=True)
    rows = doc["rows"]
    doc["fit"] = fit = fit_pairs(rows)
    for r in rows:
        r["predicted_bytes"] = r["cache_bytes"] + r["kv_copy_bytes"] + fit["bytes_per_pair"] * r["max_pairs"] + \
            fit["constant_bytes"]
    print(f"fit: {fit['bytes_per_pair']:.2f} bytes per query-key pair + {fit['constant_bytes'] / 2**20:.1f} MiB; "
          "measured / predicted: " + ", ".join(f"{r['peak_above_start_bytes'] / r['predicted_bytes']:.2f}"
                                                for r in rows))
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

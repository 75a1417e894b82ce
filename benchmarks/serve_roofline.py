"""The serving planner against published Llama 4 throughput: `behemoth plan --mode serve`'s roofline
(`src/behemoth/roofline.py`) for the setups NVIDIA measured with TensorRT-LLM, and how far off it is.

Published (TensorRT-LLM performance overview, https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html,
"Total Output Throughput (tokens/sec)" under maximum load, FP8 weights, 1,000 input and 1,000 output tokens per
request): Maverick on 8 x H200 31,782; on 8 x H100 9,677; Scout on 4 x H100 12,129.

The planner's estimate for the same load: the largest batch whose weights, KV cache (at the full 2,000 tokens) and
activations fit in 90% of each GPU; each batch of requests costs one prefill of its prompts plus 1,000 decode
steps, each timed on the roofline at the mean context (1,500 tokens); output throughput = batch x 1,000 / that
time. FP8 weights; compute at `--tflops` sustained per GPU (default 800: ~40% of the fp8 dense peak), memory and
links at the datasheets' peaks, so the estimate is an upper bound of what a server could reach.

    .venv/bin/python benchmarks/serve_roofline.py      # seconds; writes benchmarks/results/serve_roofline.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from behemoth import roofline  # noqa: E402
from behemoth.config import PRESETS  # noqa: E402
from behemoth.plan import PlanRequest, plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = "https://nvidia.github.io/TensorRT-LLM/performance/perf-overview.html"
PUBLISHED = [  # (preset, GPUs, GPU, memory GB, total output tokens/s)
    ("maverick", 8, "h200", 141, 31782.0),
    ("maverick", 8, "h100", 80, 9677.0),
    ("scout", 4, "h100", 80, 12129.0),
]
IN, OUT = 1000, 1000


def largest_batch(preset: str, gpus: int, gpu: str, mem: float, tflops: float) -> int:
    """The largest batch that fits at the requests' full length (bisection: memory grows with the batch)."""
    def fits(b: int) -> bool:
        return plan(PRESETS[preset], PlanRequest("serve", gpus, mem, "fp8", IN + OUT, b, tflops, gpu=gpu))["fits"]

    lo, hi = 1, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def estimate(preset: str, gpus: int, gpu: str, mem: float, tflops: float) -> dict:
    cfg, hw = PRESETS[preset], roofline.HARDWARE[gpu]
    batch = largest_batch(preset, gpus, gpu, mem, tflops)
    pre = roofline.prefill(cfg, hw, batch, IN, gpus, tflops, "fp8")
    dec = roofline.decode(cfg, hw, batch, IN + OUT // 2, gpus, tflops, "fp8")
    seconds = pre["seconds"] + OUT * dec["seconds"]
    return {"batch": batch, "prefill_s": pre["seconds"], "prefill_bound": pre["bound"],
            "decode_step_s": dec["seconds"], "decode_bound": dec["bound"], "decode_bounds_s": dec["bounds_seconds"],
            "output_tokens_per_s": batch * OUT / seconds,
            "compute_bound_batch": roofline.compute_bound_batch(cfg, hw, IN + OUT // 2, gpus, tflops, "fp8")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tflops", type=float, default=800.0, help="sustained fp8 TFLOP/s per GPU (default 800)")
    args = p.parse_args()
    rows = []
    for preset, gpus, gpu, mem, published in PUBLISHED:
        e = estimate(preset, gpus, gpu, mem, args.tflops)
        rows.append({"model": preset, "gpus": gpus, "gpu": roofline.HARDWARE[gpu].name, "published": published,
                     **e, "ratio": e["output_tokens_per_s"] / published})
        print(f"{preset} on {gpus} x {gpu}: batch {e['batch']:,}, planner {e['output_tokens_per_s']:,.0f} output "
              f"tokens/s ({e['decode_bound']}-bound decode) vs published {published:,.0f} "
              f"(x{rows[-1]['ratio']:.2f})")
    out = RESULTS / "serve_roofline.json"
    out.write_text(json.dumps({"benchmark": "serve_roofline", "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(), "command": "python benchmarks/serve_roofline.py " + " ".join(sys.argv[1:]),
        "published_source": SOURCE, "input_tokens": IN, "output_tokens": OUT, "tflops": args.tflops,
        "hardware": {k: vars(v) for k, v in roofline.HARDWARE.items()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

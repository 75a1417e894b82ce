"""Generation speed, side by side: behemoth's cached generator vs transformers' `generate`.

Both run the same random-weight model (our weights copied into `Llama4ForCausalLM`, sdpa), greedy,
no stop tokens, every row exactly `--new` tokens after a `--prompt`-token prompt, at each `--batch`.

  prefill tokens/s = batch x prompt / t(1 new token)           (the prompt's forward, plus one sample)
  decode tokens/s  = batch x (new - 1) / (t(new tokens) - t(1 new token))

Times are medians of `--repeats` runs after one warm-up, implementations interleaved. The greedy
tokens of the two are compared (`tokens_equal`; bf16 runs may legitimately diverge after a near-tie).
`ours_compile` is the same generator with its decode step compiled (`generate(..., compile=True)`:
`torch.compile`, and on CUDA mode "reduce-overhead", i.e. CUDA graphs); its compilation happens in
the warm-up run and is not timed.
The record includes the memory-bandwidth floor of batch-1 decode: a step reads the active weights and the whole KV
cache from memory, so it cannot beat bandwidth / (active weight bytes + cache bytes) tokens/s. The bandwidth is this
machine's, measured (a copy of 512 MiB, read + written, median of 5), and on a GPU also its datasheet peak; each
implementation's batch-1 decode is then recorded as a fraction of that ceiling (`of_floor`). Small models' weights
fit the CPU's caches, which are faster than memory, so a fraction above 1 is possible there.

    .venv/bin/python benchmarks/decode.py --preset cpu          # fp32, tiny, mini-behemoth, mini-maverick
    python benchmarks/decode.py --preset h100                   # bench-1b, bf16

Memory (on GPUs, or with --assume-device-gb): before a model is built, each batch size's need comes from the
planner's model (`common.decode_need`: weights, the prefill's activations and the KV cache, twice with
transformers' copy); a batch size that does not fit the device's free memory less a margin is recorded as
{"skipped": reason} (and a model none of whose batch sizes fit is not built).

Results go to benchmarks/results/decode_<device>_<preset>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    add_fit_args,
    decode_need,
    device_bytes,
    device_info,
    fit_record,
    say_fit,
    transformers_version,  # noqa: E402
)

from behemoth import build_model  # noqa: E402
from behemoth.checkpoint.convert import is_native_only, native_to_hf_key  # noqa: E402
from behemoth.config import get_preset  # noqa: E402
from behemoth.config_io import to_hf_config  # noqa: E402
from behemoth.inference.cache import cache_bytes  # noqa: E402
from behemoth.inference.generate import generate  # noqa: E402

PRESETS = {
    "cpu": {"models": ["tiny", "mini-behemoth", "mini-maverick"], "dtype": "float32", "device": "cpu", "repeats": 3},
    "h100": {"models": ["bench-1b"], "dtype": "bfloat16", "device": "cuda", "repeats": 5},
}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # SXM datasheet peaks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--models", nargs="+", help="model presets (default: the preset's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int)
    p.add_argument("--no-compile", action="store_true", help="skip `ours_compile`")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--device", help="override the preset's device (e.g. cpu for a dry run of --preset h100)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the preset's dtype")
    p.add_argument("--out", help="result file (default: results/decode_<device>_<preset>.json)")
    add_fit_args(p)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.models = args.models or preset["models"]
    args.repeats = args.repeats or preset["repeats"]
    args.dtype, args.device = args.dtype or preset["dtype"], args.device or preset["device"]
    return args


def hf_model(ours: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    import transformers

    d = to_hf_config(ours.config)
    d.pop("model_type")
    d.pop("architectures")
    with torch.device(device):
        hf = transformers.Llama4ForCausalLM._from_config(transformers.Llama4TextConfig(**d), dtype=dtype,
                                                         attn_implementation="sdpa")
    state = {native_to_hf_key(k): v for k, v in ours.state_dict().items() if not is_native_only(k)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"weight transfer: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large device-to-device copy (each byte read once and written once), median of
    `repeats` after a warm-up."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times)


def bandwidth_floor(cfg, args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    """The batch-1 decode ceiling: bandwidth / (active weight bytes + the bytes of the KV cache a step reads; the
    generator's cache holds prompt + new positions and a step attends over all of them)."""
    dtype = getattr(torch, args.dtype)
    weights = cfg.num_active_params() * torch.empty(0, dtype=dtype).element_size()
    cache = cache_bytes(cfg, 1, args.prompt + args.new, dtype)["total"]
    out = {"measured_bytes_per_s": bandwidth, "active_weight_bytes": weights, "cache_bytes": cache,
           "batch1_max_tok_s": bandwidth / (weights + cache)}
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in gpu), None)
        if peak:
            out |= {"hbm_bytes_per_s": peak, "batch1_max_tok_s_at_peak": peak / (weights + cache)}
    return out


def run_model(name: str, args: argparse.Namespace, device: torch.device, bandwidth: float) -> dict:
    dtype = getattr(torch, args.dtype)
    cfg = get_preset(name)
    entry = {"model": name, "total_params": cfg.num_params(), "active_params": cfg.num_active_params(), "runs": []}
    dev = device_bytes(device, args.assume_device_gb)
    checks = {B: fit_record(decode_need(cfg, B, args.prompt, args.new, args.dtype, not args.skip_hf), dev,
                            args.memory_margin) for B in args.batch}
    for B, rec in checks.items():
        say_fit(f"{name} batch {B}", rec)
    if all("skipped" in rec for rec in checks.values()):
        entry["skipped"] = checks[args.batch[0]]["skipped"]
        entry["runs"] = [{"batch": B, "prompt": args.prompt, "new": args.new, "skipped": rec["skipped"],
                          "memory": rec} for B, rec in checks.items()]
        return entry
    ours = build_model(cfg, device=device, dtype=dtype).eval()
    hf = None if args.skip_hf else hf_model(ours, dtype, device)
    for B in args.batch:
        if "skipped" in checks[B]:
            entry["runs"].append({"batch": B, "prompt": args.prompt, "new": args.new, "skipped": checks[B]["skipped"],
                                  "memory": checks[B]})
            print(f"{name} batch {B}: skipped: {checks[B]['skipped']}", flush=True)
            continue
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g).to(device)

        def ours_run(n, prompts=prompts, compile=False):
            return generate(ours, prompts, max_new_tokens=n, compile=compile)

        def hf_run(n, prompts=prompts):
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
            return out[:, prompts.shape[1]:].tolist()

        impls = {"ours": ours_run}
        if not args.no_compile:
            impls["ours_compile"] = lambda n, f=ours_run: f(n, compile=True)
        if hf is not None:
            impls["hf"] = hf_run
        outputs = {k: fn(args.new) for k, fn in impls.items()}  # warm-up (and compile), and the tokens
        times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "total": []} for k in impls}
        for _ in range(args.repeats):
            for k, fn in impls.items():
                for what, n in (("prefill", 1), ("total", args.new)):
                    sync(device)
                    t0 = time.perf_counter()
                    fn(n)
                    sync(device)
                    times[k][what].append(time.perf_counter() - t0)
        run = {"batch": B, "prompt": args.prompt, "new": args.new, "memory": checks[B]}
        for k, t in times.items():
            pre, tot = statistics.median(t["prefill"]), statistics.median(t["total"])
            run[k] = {"prefill_s": pre, "total_s": tot, "prefill_tok_s": B * args.prompt / pre,
                      "decode_tok_s": B * (args.new - 1) / max(tot - pre, 1e-9), "times": t}
        if hf is not None:
            for k in [k for k in impls if k != "hf"]:
                run[k]["decode_speedup_vs_hf"] = run[k]["decode_tok_s"] / run["hf"]["decode_tok_s"]
                run[k]["prefill_speedup_vs_hf"] = run[k]["prefill_tok_s"] / run["hf"]["prefill_tok_s"]
                run[k]["tokens_equal_hf"] = outputs[k] == outputs["hf"]
        entry["runs"].append(run)
        print(summary_line(name, run), flush=True)
    floor = entry["bandwidth_floor"] = bandwidth_floor(cfg, args, device, bandwidth)
    for run in entry["runs"]:
        if run["batch"] == 1 and "skipped" not in run:
            for k in ("ours", "ours_compile", "hf"):
                if k in run:
                    run[k]["of_floor"] = run[k]["decode_tok_s"] / floor["batch1_max_tok_s"]
            print(f"{name} batch 1 against the bandwidth floor ({floor['batch1_max_tok_s']:,.0f} tokens/s at "
                  f"{bandwidth / 1e9:.1f} GB/s): " + ", ".join(f"{k} {run[k]['of_floor']:.2f}" for k in
                                                               ("ours", "ours_compile", "hf") if k in run), flush=True)
    return entry


def summary_line(name: str, run: dict) -> str:
    parts = []
    for k in ("ours", "ours_compile", "hf"):
        if k in run:
            r = run[k]
            vs = ""
            if "tokens_equal_hf" in r:
                vs = f" (x{r['decode_speedup_vs_hf']:.2f}, same tokens: {r['tokens_equal_hf']})"
            parts.append(f"{k} prefill {r['prefill_tok_s']:,.0f} decode {r['decode_tok_s']:,.1f}{vs}")
    return f"{name} batch {run['batch']} tok/s: " + " | ".join(parts)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("decode.py: error: --preset h100 needs CUDA")
    result = {
        "benchmark": "decode", "preset": args.preset, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device_info(device), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers_version(), "dtype": args.dtype,
    }
    bandwidth = result["bandwidth_bytes_per_s"] = measure_bandwidth(device)
    print(f"memory bandwidth (a 512 MiB copy): {bandwidth / 1e9:.1f} GB/s", flush=True)
    result["models"] = [run_model(m, args, device, bandwidth) for m in args.models]
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_{device.type}_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

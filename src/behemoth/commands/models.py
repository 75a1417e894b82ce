"""`behemoth info`, `convert`, `plan`: what a model is, its checkpoints in either format, what it needs."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from behemoth.commands.common import DTYPES, UsageError, add_model_choice, model_from_args

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def cmd_info(args: argparse.Namespace) -> None:
    from behemoth.info import format_info, info_report

    cfg, name = model_from_args(args)
    if (args.context is not None and args.context < 1) or args.batch < 1:
        raise UsageError("behemoth info: error: --context and --batch must be >= 1")
    report = info_report(cfg, name, args.context, args.batch)
    print(json.dumps(report, indent=2) if args.json else format_info(report))


def cmd_convert(args: argparse.Namespace) -> None:
    from behemoth.checkpoint import export_hf, load_model, resolve_model_dir, save_model
    from behemoth.checkpoint.model_card import carry_card
    from behemoth.checkpoint.model_dir import detect_format

    src, dst = resolve_model_dir(args.src), Path(args.dst)
    want = "hf" if args.direction == "hf-to-native" else "native"
    fmt = detect_format(src)
    if fmt != want:
        raise UsageError(f"{src}: is a {fmt} checkpoint, not {want} (direction {args.direction})")
    model = load_model(src, dtype=DTYPES[args.dtype] if args.dtype else None)
    shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
    t0 = time.time()
    if args.direction == "hf-to-native":
        save_model(model, dst, max_shard_bytes=shard, source=str(src))
    else:
        export_hf(model, dst, max_shard_bytes=shard, drop_router_bias=args.drop_router_bias)
    for name in TOKENIZER_FILES:  # the tokenizer travels with the weights, so `generate` works on dst
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    carry_card(src, dst, library="transformers" if args.direction == "native-to-hf" else "behemoth")
    print(f"wrote {dst} ({model.config.num_params():,} parameters, {time.time() - t0:.1f}s)")


def cmd_plan(args: argparse.Namespace) -> None:
    """Memory per GPU by part, whether it fits, the fewest GPUs that fit, FLOPs and time (`behemoth.plan`)."""
    from behemoth.plan import PlanRequest, format_plan, plan

    cfg, name = model_from_args(args)
    req = PlanRequest(mode=args.mode, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, precision=args.precision,
                      context=args.context, batch=args.batch, tflops=args.tflops, tokens=args.tokens, gpu=args.gpu,
                      hbm_tb_s=args.hbm_tb_s, link_gb_s=args.link_gb_s)
    try:
        result = plan(cfg, req, name)
    except ValueError as e:
        raise UsageError(f"behemoth plan: error: {e}") from None
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def register(sub) -> None:
    s = sub.add_parser("info", help="parameter table (total and active per token) for a preset or config")
    add_model_choice(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--context", type=int, help="also report the bf16 KV cache for this many tokens")
    s.add_argument("--batch", type=int, default=1, help="sequences in the KV cache report")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="convert checkpoints between transformers and native formats")
    s.add_argument("direction", choices=["hf-to-native", "native-to-hf"])
    s.add_argument("src", help="source checkpoint directory (or a run directory: its latest checkpoint)")
    s.add_argument("dst", help="destination directory (must not exist or be empty)")
    s.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep stored dtype)")
    s.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size for the output (GiB)")
    s.add_argument("--drop-router-bias", action="store_true",
                   help="native-to-hf: drop trained routing biases (transformers has none; routing changes)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("plan", help="memory per GPU, fit, fewest GPUs, FLOPs and time to train or serve a model")
    add_model_choice(s)
    s.add_argument("--mode", choices=("train", "serve"), required=True)
    s.add_argument("--gpus", type=int, required=True, help="GPU count")
    s.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU in GB (10^9 bytes), e.g. 80")
    s.add_argument("--precision", choices=("bf16", "fp8"), required=True,
                   help="serve: weight format (fp8: routed experts in fp8); train: compute precision")
    s.add_argument("--context", type=int, default=8192, help="tokens per sequence (default 8192)")
    s.add_argument("--batch", type=int, default=1, help="sequences: in all when serving, per GPU when training")
    s.add_argument("--tflops", type=float, default=400.0,
                   help="sustained TFLOP/s per GPU for the time estimates (default 400, ~40%% of an H100's "
                        "dense bf16 peak)")
    s.add_argument("--tokens", type=float, help="also give the time for this many tokens (e.g. 30e12)")
    s.add_argument("--gpu", default="h100", choices=("h100", "h200"),
                   help="serve: the GPU whose memory bandwidth and interconnect bound decode (default h100)")
    s.add_argument("--hbm-tb-s", type=float, help="serve: memory bandwidth per GPU in TB/s (default: the GPU's)")
    s.add_argument("--link-gb-s", type=float,
                   help="serve: interconnect per GPU in GB/s, one direction (default: the GPU's NVLink, 450)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=cmd_plan)

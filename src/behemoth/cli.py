"""`behemoth <subcommand>`: argument parsing only; each subcommand calls plain functions.

Bad input (unknown preset, missing file, corrupt checkpoint, bad option) prints one line
`behemoth <cmd>: error: ...` and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from behemoth.config import PRESET_NOTES, PRESETS, ModelConfig, get_preset, load_config_file
from behemoth.train.trainer import Interrupted, TrainingStopped

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
COMPONENTS = ("embeddings", "output", "attention", "routers", "routed_experts", "shared_experts", "dense_ffn",
              "norms", "vision_tower", "projector")


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage block)
        raise UsageError(f"{self.prog}: error: {message}")


# ---- info ----------------------------------------------------------------------------------------

def info_report(cfg: ModelConfig, name: str, context: int | None = None, batch: int = 1) -> dict:
    """Parameter counts by component, computed from the config alone (nothing is allocated); with
    `context`, the bf16 KV cache for `batch` sequences of that many tokens."""
    b = cfg.param_breakdown()
    report = {
        "name": name, "note": PRESET_NOTES.get(name, ""),
        "total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "components": {c: {"total": b["total"][c], "active": b["active"][c]} for c in COMPONENTS
                       if c in b["total"]},
        "layers": cfg.n_layers, "moe_layers": list(cfg.moe_layers),
        "nope_layers": [i for i, r in enumerate(cfg.rope_layers) if not r],
        "config": cfg.to_dict(),
    }
    if context:
        from behemoth.inference.cache import cache_bytes, slots_per_kind

        report["kv_cache"] = {"context": context, "batch": batch, "dtype": "bfloat16",
                              "slots": {"chunked" if k and cfg.attention_chunk_size else "global": n
                                        for k, n in slots_per_kind(cfg, context).items()},
                              "bytes": cache_bytes(cfg, batch, context, torch.bfloat16)}
    return report


def format_info(r: dict) -> str:
    def n(x: int) -> str:
        return f"{x:,}"

    lines = [f"{r['name']}: {r['note']}" if r["note"] else r["name"]]
    cfg = r["config"]
    moe = cfg["moe"]
    lines.append(f"  dim {cfg['dim']}, {r['layers']} layers ({len(r['moe_layers'])} MoE, "
                 f"{len(r['nope_layers'])} NoPE), heads {cfg['n_heads']}/{cfg['n_kv_heads']} x {cfg['head_dim']}, "
                 f"vocab {cfg['vocab_size']}"
                 + (f", {moe['num_experts']} experts top-{moe['top_k']} x {moe['expert_dim']}"
                    f" + {moe['num_shared_experts']} shared" if moe else ", dense"))
    lines.append(f"  {'component':<16}{'total':>22}{'active/token':>22}")
    for c, v in r["components"].items():
        lines.append(f"  {c:<16}{n(v['total']):>22}{n(v['active']):>22}")
    lines.append(f"  {'TOTAL':<16}{n(r['total_params']):>22}{n(r['active_params']):>22}")
    if "kv_cache" in r:
        kv, gib = r["kv_cache"], 2**30
        by = kv["bytes"]
        lines.append(f"  KV cache, bf16, {kv['batch']} x {kv['context']:,} tokens: {by['total'] / gib:,.3f} GiB "
                     f"(chunked layers {by['chunked'] / gib:,.3f} GiB, {kv['slots'].get('chunked', 0):,} slots each; "
                     f"global layers {by['global'] / gib:,.3f} GiB)")
    return "\n".join(lines)


def model_from_args(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """(config, name) from `--preset NAME` or `--config` (a config.json, or a checkpoint directory)."""
    if args.config:
        path = Path(args.config)
        return load_config_file(path / "config.json" if path.is_dir() else path), str(path)
    return get_preset(args.preset), args.preset


def cmd_info(args: argparse.Namespace) -> None:
    cfg, name = model_from_args(args)
    if (args.context is not None and args.context < 1) or args.batch < 1:
        raise UsageError("behemoth info: error: --context and --batch must be >= 1")
    report = info_report(cfg, name, args.context, args.batch)
    print(json.dumps(report, indent=2) if args.json else format_info(report))


# ---- convert -------------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> None:
    from behemoth.checkpoint import export_hf, load_checkpoint, save_model
    from behemoth.checkpoint.io import detect_format

    src, dst = Path(args.src), Path(args.dst)
    want = "hf" if args.direction == "hf-to-native" else "native"
    fmt = detect_format(src)
    if fmt != want:
        raise UsageError(f"{src}: is a {fmt} checkpoint, not {want} (direction {args.direction})")
    model = load_checkpoint(src, dtype=DTYPES[args.dtype] if args.dtype else None)
    shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
    t0 = time.time()
    if args.direction == "hf-to-native":
        save_model(model, dst, max_shard_bytes=shard, source=str(src))
    else:
        export_hf(model, dst, max_shard_bytes=shard, drop_router_bias=args.drop_router_bias)
    for name in TOKENIZER_FILES:  # the tokenizer travels with the weights, so `generate` works on dst
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    print(f"wrote {dst} ({model.config.num_params():,} parameters, {time.time() - t0:.1f}s)")


# ---- train, tokenizer ---------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    from behemoth.train.config import build_config
    from behemoth.train.run import run_training

    cfg = build_config(args.config, args.overrides)
    summary = run_training(cfg, resume=args.resume, mode=args.mode)
    if _rank()[0] == 0:
        print(f"done: {summary['step']} steps, {summary['tokens']:,} tokens, {summary['nonfinite_steps']} skipped; "
              f"run dir {cfg.train.out_dir}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from behemoth.data.corpus import iter_documents, resolve_paths
    from behemoth.data.tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out}: already exists (pass --force to replace it)")
    tok = Tokenizer.train(iter_documents(resolve_paths(args.data), args.field), vocab_size=args.vocab_size)
    tok.save(out)
    print(f"wrote {out}: {tok.vocab_size} tokens (fingerprint {tok.fingerprint[:12]})")


# ---- distill-cache -------------------------------------------------------------------------------

def cmd_distill_cache(args: argparse.Namespace) -> None:
    from behemoth.train.config import DataSection
    from behemoth.train.run import run_distill_cache

    data = DataSection(path=args.data, field=args.field, seq_len=args.seq_len, val_fraction=args.val_fraction,
                       cache_dir=args.cache_dir, tasks=args.tasks, num_problems=args.num_problems,
                       difficulty=args.difficulty)
    run_distill_cache(args.teacher, args.out, data, seed=args.seed, top_k=args.top_k, temperature=args.temperature,
                      resume=args.resume, batch_size=args.batch_size, shard_tokens=args.shard_tokens,
                      device=args.device, precision=args.precision, values=args.values,
                      say=lambda line: print(line, flush=True))


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_distill_cache_parser(sub) -> None:
    s = sub.add_parser("distill-cache", help="run a teacher once over the training data and store its top-k "
                                             "log-probabilities (then: behemoth distill --distill.cache=DIR)",
                       description="Run a frozen teacher over the training token store (a corpus --data, or the "
                                   "built-in tasks) window by window, as `behemoth distill` would cut it, and write "
                                   "its top-k log-probabilities to compact shards with a manifest. Use the same data "
                                   "options (and --seed = train.seed) for the distill run.")
    s.add_argument("--teacher", required=True, help="the teacher's checkpoint directory (with its tokenizer.json)")
    s.add_argument("--out", required=True, help="the cache directory to write")
    s.add_argument("--top-k", type=int, default=128, help="log-probabilities kept per position (default 128)")
    s.add_argument("--temperature", type=float, default=1.0, help="the distillation temperature (default 1.0)")
    s.add_argument("--data", help="a .txt/.jsonl/.parquet file or glob (data.path); default: the built-in tasks")
    s.add_argument("--field", default="text", help="text field (.jsonl) or column (.parquet) (data.field)")
    s.add_argument("--seq-len", type=int, default=256, help="window length (data.seq_len; default 256)")
    s.add_argument("--val-fraction", type=float, default=0.01, help="corpus documents held out (data.val_fraction)")
    s.add_argument("--cache-dir", default=".cache/behemoth", help="tokenized-corpus cache (data.cache_dir)")
    s.add_argument("--tasks", type=_task_list, help="built-in tasks, comma-separated (data.tasks; default all)")
    s.add_argument("--num-problems", type=int, default=50000, help="built-in training problems (data.num_problems)")
    s.add_argument("--difficulty", type=int, default=1, help="built-in task difficulty (data.difficulty)")
    s.add_argument("--seed", type=int, default=0, help="the distill run's train.seed (problems, validation split)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted cache after its last full shard")
    s.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward (default 8)")
    s.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard file (default 1048576)")
    s.add_argument("--values", choices=["u8", "f16", "f32"], default="u8",
                   help="log-prob storage: u8 (default; 1 byte, error <= 0.04 nats), f16, or f32 (exact)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="teacher forward: auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16")
    s.set_defaults(fn=cmd_distill_cache)


# ---- eval ----------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> None:
    from behemoth.eval import evaluate_model

    report = evaluate_model(args.model, args.teacher, args.data, args.problems, args.difficulty, args.seq_len)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    h = report["heldout"]
    print(f"{args.model}: held-out loss {h['loss']:.4f} (ppl {h['ppl']:.2f}, {h['tokens']:,} tokens)")
    if "teacher_kl" in report:
        print(f"  KL(teacher || model) {report['teacher_kl']['kl']:.4f} nats/token")
    if "tasks" in report:
        t = report["tasks"]
        per = ", ".join(f"{k} {v:.0%}" for k, v in t["per_task"].items())
        print(f"  exact match {t['overall']:.1%} on {t['n']} held-out problems ({per})")
    if args.out:
        print(f"wrote {args.out}")


# ---- generate, chat, serve ----------------------------------------------------------------------

def _runner(args: argparse.Namespace):
    from behemoth.inference.runner import Runner

    return Runner.load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                       chat=args.chat_format)


def _sampling(args: argparse.Namespace, runner, chat: bool):
    return runner.params(chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from behemoth.inference.interactive import run_generate

    runner = _runner(args)
    run_generate(runner, args.prompt, _sampling(args, runner, args.chat), tuple(args.stop), chat=args.chat,
                 system=args.system, stream=args.stream, compile=args.compile, images=args.image)


def cmd_chat(args: argparse.Namespace) -> None:
    from behemoth.inference.interactive import chat_loop

    runner = _runner(args)
    chat_loop(runner, _sampling(args, runner, True), system=args.system)


def cmd_serve(args: argparse.Namespace) -> None:
    from behemoth.inference.server import make_server

    runner = _runner(args)
    server, engine = make_server(runner, args.host, args.port, max_batch=args.max_batch,
                                 max_tokens_limit=args.max_tokens_limit, model_name=args.name, max_len=args.max_len,
                                 compile=args.compile)
    host, port = server.server_address[:2]
    print(f"serving {server.RequestHandlerClass.api.model_name} on http://{host}:{port}/v1 "
          f"(batch {args.max_batch}, context {engine.max_len}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        engine.close()


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True,
                   help="a checkpoint directory (native or transformers), or a run directory (its latest checkpoint); "
                        "its tokenizer.json is used")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    s.add_argument("--chat-format", choices=["llama4", "plain"],
                   help="default: llama4 when the tokenizer has its header tokens, else plain (Q:/A:)")


def _add_sampling_args(s: argparse.ArgumentParser, max_new: int) -> None:
    s.add_argument("--max-new-tokens", type=int, default=max_new)
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, help="makes sampling reproducible")
    s.add_argument("--system", help="a system message (chat)")


# ---- plan ----------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> None:
    """Memory per GPU by part, whether it fits, the fewest GPUs that fit, FLOPs and time (`behemoth.plan`)."""
    from behemoth.plan import PlanRequest, format_plan, plan

    cfg, name = model_from_args(args)
    req = PlanRequest(mode=args.mode, gpus=args.gpus, gpu_mem_gb=args.gpu_mem_gb, precision=args.precision,
                      context=args.context, batch=args.batch, tflops=args.tflops, tokens=args.tokens)
    try:
        result = plan(cfg, req, name)
    except ValueError as e:
        raise UsageError(f"behemoth plan: error: {e}") from None
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


# ---- demo ----------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> None:
    """The main job: the preset table, then teacher -> distilled student vs scratch student, measured."""
    from behemoth.demo import run_demo

    print(f"{'preset':<15}{'total params':>24}{'active/token':>22}  note")
    for name, cfg in PRESETS.items():
        r = info_report(cfg, name)
        print(f"{name:<15}{r['total_params']:>24,}{r['active_params']:>22,}  {r['note']}")
    print()
    run_demo(args.out, quick=args.quick, force=args.force, vision=args.vision,
             say=lambda line: print(line, flush=True))


# ---- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="behemoth", description="The Llama 4 model family: build, inspect, convert, run.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="parameter table (total and active per token) for a preset or config")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=list(PRESETS), help="a built-in preset")
    g.add_argument("--config", help="a config.json (native or transformers), or a checkpoint directory")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--context", type=int, help="also report the bf16 KV cache for this many tokens")
    s.add_argument("--batch", type=int, default=1, help="sequences in the KV cache report")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="convert checkpoints between transformers and native formats")
    s.add_argument("direction", choices=["hf-to-native", "native-to-hf"])
    s.add_argument("src", help="source checkpoint directory")
    s.add_argument("dst", help="destination directory (must not exist or be empty)")
    s.add_argument("--dtype", choices=list(DTYPES), help="cast weights (default: keep stored dtype)")
    s.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size for the output (GiB)")
    s.add_argument("--drop-router-bias", action="store_true",
                   help="native-to-hf: drop trained routing biases (transformers has none; routing changes)")
    s.set_defaults(fn=cmd_convert)

    modes = {
        "train": ("pretrain", "train a model (built-in STEM tasks by default, or --data.path=CORPUS)"),
        "distill": ("distill", "train a student from a frozen teacher (--distill.teacher=DIR): CE + KD"),
        "codistill": ("codistill", "train a teacher (--distill.teacher_preset) and a student together, "
                                   "the teacher's forward pass giving the student's targets"),
    }
    for name, (mode, help_text) in modes.items():
        s = sub.add_parser(name, help=help_text,
                           description=f"{help_text}. Configure with defaults, a TOML --config and dotted overrides "
                                       "such as --optim.lr=3e-4 --train.steps=1000 --data.path='corpus/*.jsonl'.")
        s.add_argument("--config", help="a TOML file with [model], [data], [optim], [router], [distill], [train], "
                                        "[log], [health], [checkpoint] tables")
        s.add_argument("--resume", action="store_true",
                       help="continue the run in --train.out_dir from its latest checkpoint")
        s.set_defaults(fn=cmd_train, allow_overrides=True, mode=mode)

    _add_distill_cache_parser(sub)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    t.add_argument("--data", required=True, help="a .txt/.jsonl/.parquet file or glob")
    t.add_argument("--field", default="text", help="text field (.jsonl) or column (.parquet)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    t.add_argument("--force", action="store_true", help="replace an existing file")
    t.set_defaults(fn=cmd_tokenizer_train)

    s = sub.add_parser("eval", help="held-out loss, KL to a teacher, task accuracy; JSON report")
    s.add_argument("--model", required=True, help="a checkpoint directory with its tokenizer.json")
    s.add_argument("--teacher", help="a teacher checkpoint directory (same tokenizer): adds KL(teacher || model)")
    s.add_argument("--data", help="held-out documents (.txt/.jsonl/.parquet); default: built-in test problems")
    s.add_argument("--problems", type=int, default=200, help="built-in test problems to evaluate")
    s.add_argument("--difficulty", type=int, default=1)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--out", help="write the JSON report here")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("generate", help="complete prompts (raw text, or --chat for a user turn)")
    _add_model_args(s)
    s.add_argument("--prompt", action="append", required=True, help="the prompt; repeat for a batch")
    _add_sampling_args(s, 128)
    s.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format as a user message")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    s.add_argument("--compile", action="store_true", help="compile the decode step (pays off for long outputs)")
    s.add_argument("--image", action="append", default=[],
                   help="an image file placed before the prompt's text (repeatable; needs a vision model)")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="an interactive chat that keeps the conversation (/reset, /system, /exit)")
    _add_model_args(s)
    _add_sampling_args(s, 512)
    s.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="the model id clients use (default: the directory name)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-len", type=int,
                   help="context per request, allocated up front (default: the model's max_seq_len, at most 8192)")
    s.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    s.add_argument("--compile", action="store_true",
                   help="compile the decode step (CUDA graphs on GPU); the first request waits for compilation")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("plan", help="memory per GPU, fit, fewest GPUs, FLOPs and time to train or serve a model")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=list(PRESETS), help="a built-in preset")
    g.add_argument("--config", help="a config.json (native or transformers), or a checkpoint directory")
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
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("demo", help="the main job: train a teacher, distil a student, compare with one trained "
                                    "from scratch, report (about 8 minutes on 2 CPU cores; --quick about 1)")
    s.add_argument("--quick", action="store_true", help="a short recipe (about a minute), for CI and a first look")
    s.add_argument("--out", default="out/demo", help="output directory (report.json, report.html, the runs)")
    s.add_argument("--force", action="store_true", help="replace an earlier demo in --out")
    s.add_argument("--vision", action="store_true",
                   help="also train mini-maverick-vl on the built-in visual tasks and report its accuracy on "
                        "held-out pictures (about 6 more minutes; with --quick about 20 s)")
    s.set_defaults(fn=cmd_demo)
    return p


def _rank() -> tuple[int, bool]:
    """(this process's rank under torchrun, whether it has joined a process group)."""
    import torch.distributed as dist

    return int(os.environ.get("RANK", "0")), dist.is_available() and dist.is_initialized()


def _report(msg: str, every_rank: bool = False) -> None:
    """An error line on stderr. In a distributed run rank 0 reports what every rank meets alike (an
    interruption; bad settings, checked before the process group forms, which the first rank of every
    other machine reports too, in case that machine differs); a later error on another rank is reported by
    that rank. Ranks other than 0 mark their lines with their number."""
    rank, joined = _rank()
    first_here = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if rank == 0 or (every_rank and (joined or first_here)):
        print(msg if rank == 0 else f"[rank {rank}] {msg}", file=sys.stderr)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "allow_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
        args.fn(args)
    except UsageError as e:
        _report(str(e))
        return 2
    except Interrupted as e:
        _report(f"behemoth: {e}; continue with --resume")
        return 128 + e.signum
    except TrainingStopped as e:
        _report(f"behemoth train: stopped: {e}")
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        cmd = getattr(locals().get("args"), "command", "")
        _report(f"behemoth {cmd}: error: {e}".replace("  ", " "), every_rank=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if _rank()[1]:  # a distributed run (torchrun) in this process
        from behemoth.parallel.distributed import teardown

        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:  # on failure the other ranks may be stuck in a collective: torchrun stops them
            teardown()
        # gloo's threads can abort the interpreter's shutdown after a finished run (std::terminate), turning
        # success into a failure torchrun reports: leave without it
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`behemoth <subcommand>`: argument parsing only; each subcommand calls plain functions.

Bad input (unknown preset, missing file, corrupt checkpoint, bad option) prints one line
`behemoth <cmd>: error: ...` and exits with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from behemoth.config import PRESET_NOTES, PRESETS, ModelConfig, get_preset, load_config_file
from behemoth.train.trainer import Interrupted, TrainingStopped

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
COMPONENTS = ("embeddings", "output", "attention", "routers", "routed_experts", "shared_experts", "dense_ffn",
              "norms")


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage block)
        raise UsageError(f"{self.prog}: error: {message}")


# ---- info ----------------------------------------------------------------------------------------

def info_report(cfg: ModelConfig, name: str) -> dict:
    """Parameter counts by component, computed from the config alone (nothing is allocated)."""
    b = cfg.param_breakdown()
    return {
        "name": name, "note": PRESET_NOTES.get(name, ""),
        "total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "components": {c: {"total": b["total"][c], "active": b["active"][c]} for c in COMPONENTS},
        "layers": cfg.n_layers, "moe_layers": list(cfg.moe_layers),
        "nope_layers": [i for i, r in enumerate(cfg.rope_layers) if not r],
        "config": cfg.to_dict(),
    }


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
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    if args.config:
        path = Path(args.config)
        cfg, name = load_config_file(path / "config.json" if path.is_dir() else path), str(path)
    else:
        cfg, name = get_preset(args.preset), args.preset
    report = info_report(cfg, name)
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
    print(f"wrote {dst} ({model.config.num_params():,} parameters, {time.time() - t0:.1f}s)")


# ---- train, tokenizer ---------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> None:
    from behemoth.train.config import build_config
    from behemoth.train.run import run_training

    cfg = build_config(args.config, args.overrides)
    summary = run_training(cfg, resume=args.resume, mode=args.mode)
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


# ---- eval ----------------------------------------------------------------------------------------

def evaluate_model(model_dir: str, teacher_dir: str | None = None, data: str | None = None, problems: int = 200,
                   difficulty: int = 1, seq_len: int = 256, seed: int = 0, max_new_tokens: int = 64) -> dict:
    """Held-out loss/perplexity, KL to a teacher (if given) and, on the built-in tasks, exact-match
    accuracy of greedy answers. Data: the built-in held-out test problems, or every document of `data`."""
    from behemoth import load_model
    from behemoth.data.packing import build_in_memory
    from behemoth.data.tasks import generate
    from behemoth.data.tokenizer import Tokenizer
    from behemoth.eval import heldout_loss, task_accuracy, teacher_kl

    model = load_model(model_dir, dtype=torch.float32)
    tok = Tokenizer.load(model_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    if data is None:
        test = generate("test", problems, seed=seed, difficulty=difficulty)
        store = build_in_memory((p.text for p in test), tok)
    else:
        from behemoth.data.corpus import iter_documents, resolve_paths

        test, store = None, build_in_memory(iter_documents(resolve_paths(data)), tok)
    seq_len = min(seq_len, store.num_tokens - 1)  # a small held-out set still gives one window
    report: dict = {"model": model_dir, "params": model.config.num_params(),
                    "active_params": model.config.num_active_params(),
                    "heldout": heldout_loss(model, store, seq_len, max_batches=None)}
    if teacher_dir:
        teacher = load_model(teacher_dir, dtype=torch.float32)
        if Tokenizer.load(teacher_dir).fingerprint != tok.fingerprint:
            raise ValueError(f"{teacher_dir}: the teacher's tokenizer differs from the model's")
        report["teacher_kl"] = teacher_kl(model, teacher, store, seq_len, max_batches=None)
    if test is not None:
        report["tasks"] = task_accuracy(model, tok, test, max_new_tokens=max_new_tokens)
    return report


def cmd_eval(args: argparse.Namespace) -> None:
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


# ---- demo ----------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> None:
    """The main job, for now: the preset table, then a small model's forward pass and generation."""
    from behemoth import build_model
    from behemoth.inference import generate

    reports = [info_report(cfg, name) for name, cfg in PRESETS.items()]
    print(f"{'preset':<15}{'total params':>24}{'active/token':>22}  note")
    for r in reports:
        print(f"{r['name']:<15}{r['total_params']:>24,}{r['active_params']:>22,}  {r['note']}")
    name = "debug" if args.quick else "tiny"
    torch.manual_seed(0)
    model = build_model(name).eval()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (2, 256 if not args.quick else 64))
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        logits = model(ids)
        dt = time.perf_counter() - t0
    fwd_tps = ids.numel() / dt
    print(f"\n{name}: forward {tuple(ids.shape)} -> logits {tuple(logits.shape)} in {dt * 1e3:.1f} ms "
          f"({fwd_tps:,.0f} tokens/s); finite: {bool(torch.isfinite(logits).all())}")
    prompt = ids[:1, :8]
    t0 = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=8)
    dt = time.perf_counter() - t0
    print(f"{name}: greedy generation (random weights) {prompt[0].tolist()} -> {out[0, 8:].tolist()} "
          f"({8 / dt:.1f} tokens/s)")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {"presets": reports, "forward_tokens_per_s": fwd_tps, "model": name,
                   "generated": out[0].tolist()}
        (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {out_dir / 'demo_summary.json'}")


# ---- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="behemoth", description="The Llama 4 model family: build, inspect, convert, run.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("info", help="parameter table (total and active per token) for a preset or config")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=list(PRESETS), help="a built-in preset")
    g.add_argument("--config", help="a config.json (native or transformers), or a checkpoint directory")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
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

    s = sub.add_parser("demo", help="the main job: preset table, a small model's forward and generation")
    s.add_argument("--quick", action="store_true", help="use the debug preset (seconds)")
    s.add_argument("--out", help="directory for the demo's JSON summary")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "allow_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
        args.fn(args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"behemoth: {e}; continue with --resume", file=sys.stderr)
        return 128 + e.signum
    except TrainingStopped as e:
        print(f"behemoth train: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        cmd = getattr(locals().get("args"), "command", "")
        print(f"behemoth {cmd}: error: {e}".replace("  ", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

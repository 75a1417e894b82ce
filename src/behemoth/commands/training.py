"""`behemoth train`, `distill`, `codistill`, `distill-cache`, `tokenizer train`, `eval`, `demo`: making models
and measuring them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from behemoth import ranks
from behemoth.commands.common import Parser, UsageError, add_train_config, train_config

MODES = {  # command: (training mode, help)
    "train": ("pretrain", "train a model (built-in STEM tasks by default, or --data.path=CORPUS)"),
    "distill": ("distill", "train a student from a frozen teacher (--distill.teacher=DIR): CE + KD"),
    "codistill": ("codistill", "train a teacher (--distill.teacher_preset) and a student together, "
                               "the teacher's forward pass giving the student's targets"),
}


def cmd_train(args: argparse.Namespace) -> None:
    from behemoth.train.run import run_training

    cfg = train_config(args)
    summary = run_training(cfg, resume=args.resume, mode=args.mode)
    if ranks.is_rank0():
        print(f"done: {summary['step']} steps, {summary['tokens']:,} tokens, {summary['nonfinite_steps']} skipped; "
              f"run dir {cfg.train.out_dir}")


def cmd_distill_cache(args: argparse.Namespace) -> None:
    from behemoth.train.distill_cache import run_distill_cache

    cfg = train_config(args)  # a flag left out takes the distill run's setting, so the two cannot disagree
    top_k = args.top_k if args.top_k is not None else cfg.distill.top_k or 128
    temperature = args.temperature if args.temperature is not None else cfg.distill.temperature
    run_distill_cache(args.teacher, args.out, cfg.data, seed=cfg.train.seed, top_k=top_k, temperature=temperature,
                      resume=args.resume, batch_size=args.batch_size, shard_tokens=args.shard_tokens,
                      device=args.device or cfg.train.device, precision=args.precision or cfg.train.precision,
                      values=args.values, say=lambda line: print(line, flush=True))


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from behemoth.data.corpus import as_text, iter_documents, resolve_paths
    from behemoth.data.tokenizer import Tokenizer

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out}: already exists (pass --force to replace it)")
    docs = iter_documents(resolve_paths(args.data), args.field)
    tok = Tokenizer.train(map(as_text, docs), vocab_size=args.vocab_size)
    tok.save(out)
    print(f"wrote {out}: {tok.vocab_size} tokens (fingerprint {tok.fingerprint[:12]})")


def cmd_eval(args: argparse.Namespace) -> None:
    from behemoth.eval import evaluate_model
    from behemoth.eval.metrics import format_accuracy

    harness = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    report = evaluate_model(args.model, args.teacher, args.data, args.problems, args.difficulty, args.seq_len,
                            lm_eval=harness, lm_eval_limit=args.lm_eval_limit, lm_eval_include=args.lm_eval_include)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    h = report["heldout"]
    bpb = f", {h['bits_per_byte']:.4f} bits/byte, {h['bits_per_char']:.4f} bits/char" if "bits_per_byte" in h else ""
    print(f"{args.model}: held-out loss {h['loss']:.4f} (ppl {h['ppl']:.2f}, {h['tokens']:,} tokens{bpb})")
    if "teacher_kl" in report:
        print(f"  KL(teacher || model) {report['teacher_kl']['kl']:.4f} nats/token")
    if "tasks" in report:
        t = report["tasks"]
        per = ", ".join(f"{k} {format_accuracy(v, t['per_task_interval'][k])}" for k, v in t["per_task"].items())
        print(f"  exact match {format_accuracy(t['overall'], t['interval'])} (95% interval) on {t['n']} held-out "
              f"problems ({per})")
    for task, row in report.get("lm_eval", {}).items():
        shown = ", ".join(f"{k} {v:.4f} ± {row[k + '_stderr']:.4f}" if k + "_stderr" in row else f"{k} {v:.4f}"
                          for k, v in row.items() if k != "n" and not k.endswith("_stderr"))
        print(f"  lm-eval {task} ({row['n']} documents): {shown}")
    if args.card:
        from behemoth.eval.card import write_card_results

        card = write_card_results(report["model"], report, "behemoth eval")
        print(f"updated the results of {card}" if card else f"{report['model']}: no model card (README.md) to update")
    if args.out:
        print(f"wrote {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job: the preset table, then teacher -> distilled student vs scratch student, measured."""
    from behemoth.demo import run_demo
    from behemoth.info import preset_table

    if args.seeds < 1:
        raise UsageError(f"behemoth demo: error: --seeds {args.seeds}: must be at least 1")
    if args.results:  # checked before the runs, not after them
        folder = Path(args.results).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"behemoth demo: error: --results {args.results}: {folder} is not a writable folder")
    print(preset_table() + "\n")
    run_demo(args.out, quick=args.quick, force=args.force, vision=args.vision, seeds=args.seeds,
             results=args.results, say=lambda line: print(line, flush=True))


def register(sub) -> None:
    for name, (mode, help_text) in MODES.items():
        s = sub.add_parser(name, help=help_text,
                           description=f"{help_text}. Configure with defaults, a TOML --config and dotted overrides "
                                       "such as --optim.lr=3e-4 --train.steps=1000 --data.path='corpus/*.jsonl'.")
        add_train_config(s)
        s.add_argument("--resume", action="store_true",
                       help="continue the run in --train.out_dir from its latest checkpoint")
        s.set_defaults(fn=cmd_train, mode=mode)
    _register_distill_cache(sub)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, parser_class=Parser)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on a corpus")
    t.add_argument("--data", required=True, help="a .txt/.jsonl/.parquet file or glob")
    t.add_argument("--field", default="text", help="text field (.jsonl) or column (.parquet)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    t.add_argument("--force", action="store_true", help="replace an existing file")
    t.set_defaults(fn=cmd_tokenizer_train)

    s = sub.add_parser("eval", help="held-out loss and bits per byte, KL to a teacher, task accuracy; JSON report")
    s.add_argument("--model", required=True, help="a checkpoint directory with its tokenizer.json, a run directory "
                                                  "(its latest checkpoint), or a transformers causal LM directory")
    s.add_argument("--teacher", help="a teacher (the same kinds of directory; the same tokenizer): adds "
                                     "KL(teacher || model)")
    s.add_argument("--data", help="held-out documents (.txt/.jsonl/.parquet); default: built-in test problems")
    s.add_argument("--problems", type=int, default=200, help="built-in test problems to evaluate")
    s.add_argument("--difficulty", type=int, default=1)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--out", help="write the JSON report here")
    s.add_argument("--lm-eval", metavar="TASKS",
                   help="also run lm-evaluation-harness tasks in-process (comma-separated; behemoth_tasks_gen and "
                        "behemoth_tasks_mc ship with behemoth, others need their data at hand); needs lm_eval")
    s.add_argument("--lm-eval-limit", type=int, help="at most this many documents per harness task")
    s.add_argument("--lm-eval-include", help="a folder of further harness task definitions (YAML)")
    s.add_argument("--card", action="store_true",
                   help="also write the results into the model directory's model card (README.md)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="the main job: train a teacher, distil a student, compare with one trained "
                                    "from scratch, report (about 10 minutes on 2 CPU cores; --quick about 2)")
    s.add_argument("--quick", action="store_true", help="a short recipe (about two minutes), for CI and a first look")
    s.add_argument("--out", default="out/demo", help="output directory (report.json, report.html, the runs)")
    s.add_argument("--force", action="store_true", help="replace an earlier demo in --out")
    s.add_argument("--vision", action="store_true",
                   help="also train mini-maverick-vl on the built-in visual tasks and report its accuracy on "
                        "held-out pictures (about 6 more minutes; with --quick about 20 s)")
    s.add_argument("--seeds", type=int, default=1,
                   help="run the whole story N times, training seeds 0..N-1, into OUT/seed_K (the held-out "
                        "problems stay the same); OUT/report.json then adds each figure's mean, sample std, "
                        "min and max over seeds (default 1: one run, straight into OUT)")
    s.add_argument("--results", help="also write the figures over seeds, each seed's figures and the machine "
                                     "(platform, CPUs, versions, date) to this JSON file")
    s.set_defaults(fn=cmd_demo)


def _register_distill_cache(sub) -> None:
    s = sub.add_parser("distill-cache", help="run a teacher once over the training data and store its top-k "
                                             "log-probabilities (then: behemoth distill --distill.cache=DIR)",
                       description="Run a frozen teacher over the training token store (a corpus --data.path, or "
                                   "the built-in tasks) window by window, as `behemoth distill` would cut it, and "
                                   "write its top-k log-probabilities to compact shards with a manifest. The data "
                                   "come from the same --config file and --data.* overrides (and --train.seed) as "
                                   "the distill run's.")
    s.add_argument("--teacher", required=True, help="the teacher's checkpoint or run directory (with its "
                                                    "tokenizer.json)")
    s.add_argument("--out", required=True, help="the cache directory to write")
    add_train_config(s)
    s.add_argument("--top-k", type=int,
                   help="log-probabilities kept per position (default: distill.top_k if set, else 128)")
    s.add_argument("--temperature", type=float, help="the distillation temperature (default: distill.temperature, "
                                                     "1.0 unless the config sets it)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted cache after its last full shard")
    s.add_argument("--batch-size", type=int, default=8, help="windows per teacher forward (default 8)")
    s.add_argument("--shard-tokens", type=int, default=1 << 20, help="tokens per shard file (default 1048576)")
    s.add_argument("--values", choices=["u8", "f16", "f32"], default="u8",
                   help="log-prob storage: u8 (default; 1 byte, error <= 0.04 nats), f16, or f32 (exact)")
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: train.device, auto unless set)")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="teacher forward: auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16 (default: "
                        "train.precision, auto unless set)")
    s.set_defaults(fn=cmd_distill_cache)

"""`behemoth generate`, `chat`, `serve`: a model answering, from one prompt to many clients; `synthesize`: a
teacher writing a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from behemoth.commands.common import DTYPES, UsageError


def _runner(args: argparse.Namespace):
    from behemoth.inference.runner import Runner

    return Runner.load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                       chat=args.chat_format)


def _sampling(args: argparse.Namespace, runner, chat: bool):
    return runner.params(chat, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> None:
    from behemoth.inference.interactive import run_generate

    if args.prefill_chunk < 0:
        raise UsageError(f"behemoth generate: error: --prefill-chunk {args.prefill_chunk}: must be >= 0")
    prompts = list(args.prompt)
    for path in args.prompt_file:
        try:
            prompts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise UsageError(f"behemoth generate: error: --prompt-file {path}: {why}") from None
    if not prompts:
        raise UsageError("behemoth generate: error: give a --prompt or a --prompt-file")
    runner = _runner(args)
    draft = _draft(args, runner, "generate", adaptive=args.draft_adaptive, k_max=max(args.draft_k, 8))
    run_generate(runner, prompts, _sampling(args, runner, args.chat), tuple(args.stop), chat=args.chat,
                 system=args.system, stream=args.stream, compile=args.compile, images=args.image, draft=draft,
                 prefill_chunk=args.prefill_chunk or None)


def cmd_chat(args: argparse.Namespace) -> None:
    from behemoth.inference.interactive import chat_loop

    runner = _runner(args)
    chat_loop(runner, _sampling(args, runner, True), system=args.system, draft=_draft(args, runner, "chat"))


def _draft(args: argparse.Namespace, runner, command: str, **options):
    """The `--draft` model (a `runner.Draft` with k = `--draft-k` and `options`), checked against the model's
    tokenizer; None without one."""
    if not args.draft:
        return None
    from behemoth.inference.runner import Draft

    if not 1 <= args.draft_k <= 16:
        raise UsageError(f"behemoth {command}: error: --draft-k {args.draft_k}: must be in [1, 16]")
    return Draft.load(args.draft, runner, k=args.draft_k, **options)


def _add_draft_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--draft", help="decode speculatively with this draft model (a smaller model with the same "
                                   "tokenizer, e.g. the demo's distilled student); the output follows the model's own "
                                   "distribution")
    s.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per step (default 4)")


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from behemoth.inference.server import make_server
    except ImportError as e:
        raise UsageError(f"serve needs FastAPI and uvicorn ({e}): pip install 'behemoth[serve]'") from None

    if args.prefix_cache_mb < 0:
        raise UsageError(f"behemoth serve: error: --prefix-cache-mb {args.prefix_cache_mb}: must be >= 0")
    runner = _runner(args)
    draft = _draft(args, runner, "serve")
    server, engine = make_server(runner, args.host, args.port, max_batch=args.max_batch,
                                 max_tokens_limit=args.max_tokens_limit, model_name=args.name, max_len=args.max_len,
                                 compile=args.compile, prefill_chunk=args.prefill_chunk or None,
                                 prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                                 draft=draft and draft.model, draft_k=args.draft_k)
    host, port = server.server_address[:2]
    print(f"serving {server.api.model_name} on http://{host}:{port}/v1 "
          f"(batch {args.max_batch}, context {engine.max_len}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        engine.close()


def cmd_synthesize(args: argparse.Namespace) -> None:
    from behemoth.data.prompts import load_prompts
    from behemoth.inference.runner import default_dtype
    from behemoth.inference.synthesize import Settings, synthesize

    settings = Settings(samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop), seed=args.seed, verify=args.verify,
                        extract=args.extract, keep=args.keep, shard_size=args.shard_size, batch_size=args.batch_size)
    prompts, source = load_prompts(args.prompts, tasks=args.tasks, num_prompts=args.num_prompts,
                                   difficulty=args.difficulty, seed=args.seed, prompt_field=args.prompt_field,
                                   answer_field=args.answer_field)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(torch.device(args.device))
    m = synthesize(args.teacher, args.out, prompts, source, settings, device=args.device, dtype=dtype,
                   say=lambda line: print(line, flush=True))
    c = m["counts"]
    accept = "" if c["acceptance"] is None else f", {c['acceptance']:.1%} verified (" + ", ".join(
        f"{t} {v['acceptance']:.0%}" for t, v in c["per_task"].items()) + ")"
    print(f"wrote {args.out}: {c['kept']:,} of {c['samples']:,} samples kept{accept}; train on it with "
          f"--data.path={args.out}")


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


def _add_generate(sub) -> None:
    s = sub.add_parser("generate", help="complete prompts (raw text, or --chat for a user turn)")
    _add_model_args(s)
    s.add_argument("--prompt", action="append", default=[], help="the prompt; repeat for a batch")
    s.add_argument("--prompt-file", action="append", default=[],
                   help="a file whose text is a prompt (long prompts); repeatable, after the --prompt ones")
    _add_sampling_args(s, 128)
    s.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format as a user message")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated (one prompt)")
    s.add_argument("--compile", action="store_true", help="compile the decode step (pays off for long outputs)")
    s.add_argument("--image", action="append", default=[],
                   help="an image file placed before the prompt's text (repeatable; needs a vision model)")
    _add_draft_args(s)
    s.add_argument("--draft-adaptive", action="store_true",
                   help="adapt k to the running acceptance rate (--draft-k is the first k, 8 the most)")
    s.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prefill prompts this many tokens at a time: activations bounded by the chunk, not the prompt "
                        "(default 2048; 0: whole)")
    s.set_defaults(fn=cmd_generate)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="the model id clients use (default: the directory name)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-len", type=int,
                   help="context per request, allocated up front (default: the model's max_seq_len, at most 8192)")
    s.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    s.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prefill longer prompts this many tokens at a time, between decode steps of the running "
                        "requests (default 2048; 0: whole)")
    s.add_argument("--prefix-cache-mb", type=float, default=1024,
                   help="memory for the keys and values of earlier requests, reused by prompts that begin alike "
                        "(a system prompt, a conversation's earlier turns); default 1024 MiB, 0: none")
    _add_draft_args(s)
    s.add_argument("--compile", action="store_true",
                   help="compile the decode step (CUDA graphs on GPU); the first request waits for compilation")
    s.set_defaults(fn=cmd_serve)


def register(sub) -> None:
    _add_generate(sub)

    s = sub.add_parser("chat", help="an interactive chat that keeps the conversation (/reset, /system, /exit)")
    _add_model_args(s)
    _add_sampling_args(s, 512)
    _add_draft_args(s)
    s.set_defaults(fn=cmd_chat)

    _add_serve(sub)

    s = sub.add_parser("synthesize", help="write a dataset of a teacher's completions of prompts (sequence-level "
                                          "distillation): sampled, verified, filtered, resumable")
    s.add_argument("--teacher", required=True, help="a model directory (native or transformers) or a run directory")
    s.add_argument("--out", required=True, help="the dataset directory (an interrupted run there is continued)")
    s.add_argument("--prompts", help="a .jsonl of {prompt, answer (optional), task (optional)} or a text file (one "
                                     "prompt per line); default: the built-in tasks' training problems")
    s.add_argument("--prompt-field", default="prompt", help="the prompt's field in a .jsonl")
    s.add_argument("--answer-field", default="answer", help="the reference answer's field in a .jsonl")
    s.add_argument("--tasks", help="built-in tasks, comma-separated (default: all)")
    s.add_argument("--num-prompts", type=int, default=1000, help="built-in problems to write completions for")
    s.add_argument("--difficulty", type=int, default=1, help="of the built-in problems")
    s.add_argument("--samples", type=int, default=1, help="completions per prompt")
    s.add_argument("--max-tokens", type=int, default=128, help="the most tokens of one completion")
    s.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); EOS always stops")
    s.add_argument("--seed", type=int, default=0, help="sampling (and the built-in problems drawn)")
    s.add_argument("--verify", choices=["auto", "none", "task", "answer"], default="auto",
                   help="task: the built-in exact checker; answer: the reference answer; auto: whichever applies")
    s.add_argument("--extract", default="marker",
                   help="how an answer is read from a completion: marker (after ####), boxed, last-number, re:PATTERN")
    s.add_argument("--keep", choices=["all", "verified", "best"], default="all",
                   help="all samples, the verified ones, or per prompt the most likely (verified) one")
    s.add_argument("--shard-size", type=int, default=256, help="prompts per shard (the unit of resumption)")
    s.add_argument("--batch-size", type=int, default=32, help="completions decoded together")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    s.set_defaults(fn=cmd_synthesize)

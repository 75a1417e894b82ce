"""The command line's surface, pinned: every subcommand, each flag and its default. An accidental change
(a renamed flag, a new default, a lost subcommand) fails here; a deliberate one updates this table.

Training commands take their settings from one config surface (a TOML --config and dotted overrides such
as --data.seq_len=128), checked by `behemoth.train.config`; only their own flags are pinned here."""

from __future__ import annotations

import argparse

import torch

from behemoth.cli import build_parser

RUNTIME_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PINNED = {
    'info': '--batch=1 --config=None --context=None --json=False --preset=None',
    'convert': '--drop-router-bias=False --dtype=None --max-shard-gb=5.0 direction dst src',
    'plan': ('--batch=1 --config=None --context=8192 --gpu-mem-gb=None --gpu=\'h100\' --gpus=None --hbm-tb-s=None '
             '--json=False --link-gb-s=None --mode=None --precision=None --preset=None --tflops=400.0 --tokens=None'),
    'train': '--config=None --resume=False',
    'distill': '--config=None --resume=False',
    'codistill': '--config=None --resume=False',
    'distill-cache': ("--batch-size=8 --config=None --device=None --out=None --precision=None --resume=False "
        "--shard-tokens=1048576 --teacher=None --temperature=None --top-k=None --values='u8'"),
    'tokenizer train': "--data=None --field='text' --force=False --out=None --vocab-size=8192",
    'tokenizer': '',
    'eval': ('--card=False --data=None --difficulty=1 --lm-eval-include=None --lm-eval-limit=None --lm-eval=None '
             '--model=None --out=None --problems=200 --seq-len=256 --teacher=None'),
    'demo': "--force=False --out='out/demo' --quick=False --results=None --seeds=1 --vision=False",
    'generate': ('--chat-format=None --chat=False --compile=False --device=<cuda if available> --draft-adaptive=False '
        '--draft-k=4 --draft=None --dtype=None --image=[] --max-new-tokens=128 --model=None --prefill-chunk=2048 '
        '--prompt-file=[] --prompt=[] --seed=None --stop=[] --stream=False --system=None --temperature=0.0 '
        '--top-k=None --top-p=1.0'),
    'chat': ('--chat-format=None --device=<cuda if available> --draft-k=4 --draft=None --dtype=None '
        '--max-new-tokens=512 --model=None --seed=None --system=None --temperature=0.0 --top-k=None --top-p=1.0'),
    'serve': ("--chat-format=None --compile=False --device=<cuda if available> --draft-k=4 --draft=None --dtype=None "
        "--host='127.0.0.1' --max-batch=8 --max-len=None --max-tokens-limit=1024 --model=None --name=None "
        "--port=8000 --prefill-chunk=2048 --prefix-cache-mb=1024"),
    'synthesize': ("--answer-field='answer' --batch-size=32 --device=<cuda if available> --difficulty=1 --dtype=None "
        "--extract='marker' --keep='all' --max-tokens=128 --num-prompts=1000 --out=None --prompt-field='prompt' "
        "--prompts=None --samples=1 --seed=0 --shard-size=256 --stop=[] --tasks=None --teacher=None "
        "--temperature=1.0 --top-k=None --top-p=1.0 --verify='auto'"),
}


def surface(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, str]:
    """{"subcommand": "--flag=default ... positional"} for every (nested) subcommand."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(surface(sub, f"{prefix} {name}".strip()))
    if prefix:
        items = []
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction | argparse._HelpAction):
                continue
            default = "<cuda if available>" if a.dest == "device" and a.default == RUNTIME_DEVICE else repr(a.default)
            items.append(f"{'/'.join(a.option_strings)}={default}" if a.option_strings else a.dest)
        out[prefix] = " ".join(sorted(items))
    return out


def test_subcommands_flags_and_defaults_are_as_pinned():
    got = surface(build_parser())
    assert list(got) == list(PINNED), "subcommands changed"
    for name, flags in PINNED.items():
        assert got[name] == flags, f"behemoth {name}: flags or defaults changed"


def test_training_commands_share_the_config_surface():
    """train, distill, codistill and distill-cache all read --config plus dotted overrides (collected as the
    arguments argparse does not know), and nothing else duplicates a training setting."""
    parser = build_parser()
    for argv in (["train"], ["distill"], ["codistill"], ["distill-cache", "--teacher", "t", "--out", "o"]):
        args, extra = parser.parse_known_args([*argv, "--config", "run.toml", "--data.seq_len=64"])
        assert args.config == "run.toml" and args.allow_overrides and extra == ["--data.seq_len=64"], argv

"""What every command shares: the usage error, dtype names, and the two config surfaces (a model from
`--preset`/`--config`; a training config from a TOML `--config` and dotted overrides)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.config import PRESETS, ModelConfig, get_preset
from behemoth.config_io import load_config_file

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage block)
        raise UsageError(f"{self.prog}: error: {message}")


def model_from_args(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    """(config, name) from `--preset NAME` or `--config` (a config.json, a model directory or a run
    directory: its latest checkpoint's)."""
    if args.config:
        path = Path(args.config)
        return load_config_file(resolve_model_dir(path) / "config.json" if path.is_dir() else path), str(path)
    return get_preset(args.preset), args.preset


def add_model_choice(s: argparse.ArgumentParser) -> None:
    """`--preset NAME` or `--config PATH`, one of them required."""
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=list(PRESETS), help="a built-in preset")
    g.add_argument("--config", help="a config.json (native or transformers), or a checkpoint or run directory")


def add_train_config(s: argparse.ArgumentParser) -> None:
    """`--config FILE.toml`, and dotted overrides (`--optim.lr=3e-4`) collected as the unknown arguments."""
    s.add_argument("--config", help="a TOML file with [model], [data], [optim], [router], [distill], [train], "
                                    "[log], [health], [checkpoint] tables")
    s.set_defaults(allow_overrides=True)


def train_config(args: argparse.Namespace):
    from behemoth.train.config import build_config

    return build_config(args.config, args.overrides)

"""Where a run's models live: its processes, the device each model is built or loaded on, and their
placement (activation checkpointing, compile, FSDP2 with expert parallelism), one function for a single
process and for many.

In one process a model is built on the run's device and wrapped in place. In a distributed run
(`torchrun`, WORLD_SIZE > 1) no rank ever holds a model whole on its device: rank 0 builds or loads it in
CPU memory and the others a meta-device shell, then `parallel.distributed.shard_model` gives every rank
its shards (sent by rank 0, or read by every rank from a sharded checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from behemoth.checkpoint.dcp import load_sharded_state
from behemoth.checkpoint.model_dir import sharded_model_files
from behemoth.config import ModelConfig
from behemoth.model import Transformer
from behemoth.parallel import apply_activation_checkpointing, apply_compile
from behemoth.parallel.distributed import DistInfo, check_degrees, setup_distributed, shard_foreign, shard_model
from behemoth.train.config import TrainConfig


@dataclass
class RunContext:
    """What every phase of a run needs to know about it (`train/run.py` builds it first)."""

    run_dir: Path
    checkpoint: Path | None  # the checkpoint a resumed run continues from
    dist: DistInfo
    autocast: torch.dtype | None  # bf16 autocast, or None
    say: Callable[[str], None]  # output (silent on ranks other than 0)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def load_device(self, source: Path | str | None = None) -> torch.device:
        """Where a model is built (`source` None) or loaded (from `source`) before `place_model`: the run's
        device in one process. In a distributed run rank 0 holds it in CPU memory and the others a
        meta-device shell, or every rank a shell when `source` holds sharded files (each reads its part)."""
        if self.dist.world == 1:
            return self.dist.device
        if self.dist.is_main and (source is None or not sharded_model_files(source)):
            return torch.device("cpu")
        return torch.device("meta")


def start_processes(cfg: TrainConfig, device: torch.device, model_cfg: ModelConfig) -> DistInfo:
    """The run's processes: one, or those `torchrun` started (WORLD_SIZE > 1), which join one process group.
    The parallel settings are checked first, on every rank alike (so only rank 0 need report them)."""
    world, p = int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel
    if world == 1:
        if p.ep > 1:
            raise ValueError(f"parallel.ep={p.ep}: expert parallelism needs {p.ep} processes or a multiple; launch "
                             f"with torchrun --nproc-per-node {p.ep} -m behemoth ...")
        return DistInfo(0, 1, 0, device)
    check_degrees(world, p.ep, p.dp_shard)
    experts = model_cfg.moe.num_experts if model_cfg.moe is not None else 0
    if p.ep > 1 and experts % p.ep:
        raise ValueError(f"parallel.ep={p.ep}: the model's {experts} routed experts cannot be split evenly over "
                         f"{p.ep} ranks")
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size}: must be divisible by the number of processes "
                         f"({world}); it is the global micro-batch, split evenly over the ranks")
    return setup_distributed(device.type, cfg.parallel.timeout_start_s)


def place_model(model: nn.Module, cfg: TrainConfig, ctx: RunContext, trained: bool,
                source: Path | str | None = None) -> nn.Module:
    """`model` ready to run: a trained one with activation checkpointing and compile as configured (a frozen
    teacher runs forward only: neither); in a distributed run sharded with FSDP2 (+ expert parallelism),
    its weights sent by rank 0 or, when `source` holds sharded files, read by every rank."""
    t, p = cfg.train, cfg.parallel
    if ctx.dist.world == 1:
        if trained and t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if trained and t.compile:
            apply_compile(model, ctx.device, ctx.autocast)
        return model
    if not isinstance(model, Transformer):  # a transformers teacher of another family (frozen)
        model = shard_foreign(model, ctx.dist.world, ctx.device, p.dp_shard)
        ctx.say(f"teacher: {model.config.model_type} sharded with FSDP2 over {ctx.dist.world} processes, one unit "
                f"per decoder layer ({len(model.layers)}) plus embeddings and head")
        return model
    files = sharded_model_files(source) if source is not None else None
    model = shard_model(model, ctx.dist.world, p.ep, ctx.device, trained and t.activation_checkpointing,
                        trained and t.compile, p.dp_shard, from_rank0=files is None, compute_dtype=ctx.autocast)
    if files is not None:
        load_sharded_state(model, files)
    return model

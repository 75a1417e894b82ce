"""`behemoth train | distill | codistill`: a run assembled in phases from a `TrainConfig`, then trained.

    prepare   the run directory, the checkpoint to resume, device, processes, precision, seeds
    teacher   where the teacher comes from (a model, a cache, or none) and the tokenizer it fixes
    data      the run's tokenizer and data; the student's config fitted to that tokenizer
    models    student (and codistilled teacher), new or resumed, checked against the config
    place     activation checkpointing, compile, FSDP2 + expert parallelism (one function for any world)
    trainer   the step of the mode, the loader, the routing probe, the `Trainer`; then the loop

What a mode needs is declared once, in `MODES`: its step and where its teacher comes from. Everything
that can be checked before the first step is checked before anything is written, with one-line errors
(`ValueError`); a new run never writes into a directory that already holds checkpoints.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch

from behemoth.checkpoint.locate import CHECKPOINTS, latest_checkpoint
from behemoth.data.tokenizer import Tokenizer
from behemoth.parallel.distributed import ShardedBatches, broadcast_from_rank0
from behemoth.train.card import run_card_facts
from behemoth.train.config import TrainConfig
from behemoth.train.datasets import build_data, build_image_data, make_loader
from behemoth.train.device import allow_tf32, autocast_dtype, peak_flops, resolve_device
from behemoth.train.models import TEACHER_DIR, Models, build_models, fit_to_tokenizer, model_config
from behemoth.train.on_policy import OnPolicyDistillStep, check_on_policy
from behemoth.train.placement import RunContext, place_model, start_processes
from behemoth.train.probe import RouterProbe, probe_batch
from behemoth.train.steps import CachedDistillStep, CodistillStep, DistillStep, PretrainStep, Step
from behemoth.train.teachers import TeacherSource, check_teacher, frozen_teacher, no_teacher
from behemoth.train.trainer import MetricsLog, NullLog, RunInfo, Trainer, stdout_say


def _distill_step(cfg: TrainConfig, model, teacher: TeacherSource, autocast) -> Step:
    if teacher.cache is not None:
        return CachedDistillStep(model, teacher.cache, cfg.router, cfg.distill, autocast)
    if teacher.student_tokenizer is not None:
        from behemoth.train.cross_step import CrossTokenizerDistillStep

        return CrossTokenizerDistillStep(model, teacher.model, teacher.tokenizer, teacher.student_tokenizer,
                                         cfg.router, cfg.distill, autocast)
    if cfg.distill.on_policy > 0:
        return OnPolicyDistillStep(model, teacher.model, cfg.router, cfg.distill, autocast, teacher.prompts,
                                   teacher.tokenizer.eos_id, cfg.train.seed)
    return DistillStep(model, teacher.model, cfg.router, cfg.distill, autocast)


@dataclass(frozen=True)
class Mode:
    """What a training mode needs: its step, where its teacher comes from, whether it trains the teacher."""

    step: Callable[[TrainConfig, torch.nn.Module, TeacherSource, torch.dtype | None], Step]
    teacher: Callable[[TrainConfig, RunContext], TeacherSource] = no_teacher
    trains_teacher: bool = False  # the teacher is built (or resumed) and trained with the student

    @property
    def distils(self) -> bool:
        """Whether the student learns from a teacher (the `distill.*` settings apply)."""
        return self.teacher is not no_teacher or self.trains_teacher


MODES: dict[str, Mode] = {
    "pretrain": Mode(lambda cfg, model, _, autocast: PretrainStep(model, cfg.router, autocast)),
    "distill": Mode(_distill_step, teacher=frozen_teacher),
    "codistill": Mode(lambda cfg, model, t, autocast: CodistillStep(model, t.model, cfg.router, cfg.distill,
                                                                    autocast), trains_teacher=True),
}


def run_training(cfg: TrainConfig, resume: bool = False, say: Callable[[str], None] = stdout_say,
                 mode: str = "pretrain") -> dict:
    """Train as configured; returns a summary. Raises ValueError for bad input (nothing written).

    mode: "pretrain" (next-token loss), "distill" (a frozen teacher from `distill.teacher`, or its cached
    top-k from `distill.cache`), or "codistill" (a `distill.teacher_preset` teacher trained in the same run
    on the same batches).
    """
    spec = MODES[mode]
    ctx, shared_tok = prepare(cfg, resume, say)
    teacher = spec.teacher(cfg, ctx)
    given = teacher.tokenizer if cfg.distill.tokenizer == "teacher" else None
    tok, train, val, model_cfg = build_run_data(cfg, ctx, shared_tok or given)
    d, t = cfg.data, cfg.train
    train_loader = make_loader(train, t.batch_size, d.seq_len, t.seed, shuffle=True)  # enough data for a batch?
    if cfg.log.eval_every:  # and for one validation window (found now, not after training)
        try:
            make_loader(val, 1, d.seq_len, t.seed, shuffle=False)
        except ValueError as e:
            raise ValueError(f"{e} (the held-out split: raise data.val_fraction, lower data.seq_len, or turn "
                             "evaluation off with log.eval_every=0)") from None
    check_teacher(teacher, cfg, model_cfg, tok, train, ctx.say, spec.distils)  # before anything is built
    check_on_policy(cfg, mode, teacher)
    models = build_models(cfg, ctx, model_cfg, tok, spec.trains_teacher)
    if models.teacher is not None:
        teacher.model = models.teacher
    if ctx.dist.world > 1 and ctx.dist.is_main:  # the run is checked: the other ranks may start
        broadcast_from_rank0({"tokenizer": tok.hf.to_str(), "tokenizer_config": tok.config,
                              "teacher": cfg.distill.teacher})
    model, teacher.model = place(cfg, ctx, models, teacher, spec.trains_teacher)
    step = spec.step(cfg, model, teacher, ctx.autocast)
    trainer = make_trainer(cfg, ctx, step, train_loader, (train, val), models.state,
                           run_flops(cfg, model, teacher.model, spec.trains_teacher))
    opening = [{"type": "cross_tokenizer", **teacher.overlap}] if teacher.overlap else []
    trainer.card_facts = run_card_facts(cfg, mode, trainer.models, tok, train, teacher, ctx.device) \
        if ctx.dist.is_main else None
    return fit(cfg, ctx, trainer, tok, model_cfg, resumed=models.state is not None, opening=opening)


def prepare(cfg: TrainConfig, resume: bool, say: Callable[[str], None]) -> tuple[RunContext, Tokenizer | None]:
    """The run's context: its directory (a new run refuses one that holds checkpoints), the checkpoint a
    resumed run continues from, device, processes, precision and seeds. Ranks other than 0 wait here until
    rank 0 has built the data and the models and checked the run, and take its tokenizer (returned; None
    on rank 0) and the teacher checkpoint it resolved."""
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / CHECKPOINTS).is_dir() and any((run_dir / CHECKPOINTS).iterdir()):
        raise ValueError(f"{run_dir}: already holds a run's checkpoints; pass --resume to continue it or choose "
                         "another --train.out_dir")
    device = resolve_device(cfg.train.device)
    allow_tf32(device)
    dist = start_processes(cfg, device, model_config(cfg))
    shared = None
    if not dist.is_main:
        checked = broadcast_from_rank0(None)
        shared = Tokenizer(tokenizers.Tokenizer.from_str(checked["tokenizer"]), source="rank 0's tokenizer",
                           config=checked["tokenizer_config"])
        cfg.distill.teacher = checked["teacher"]  # the checkpoint rank 0 took, should a run directory move on
    ctx = RunContext(run_dir, ckpt, dist, autocast_dtype(cfg.train.precision, dist.device),
                     say if dist.is_main else _quiet)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    return ctx, shared


def _quiet(msg: str) -> None:
    """`say` on ranks other than 0."""


def build_run_data(cfg: TrainConfig, ctx: RunContext, given: Tokenizer | None):
    """(tokenizer, train data, validation data, the student's config fitted to the tokenizer, or on resume
    to the checkpoint's vocabulary)."""
    model_cfg = model_config(cfg)
    resumed = ctx.checkpoint is not None
    if cfg.data.images:
        tok, train, val = build_image_data(cfg.data, ctx.run_dir, cfg.train.seed, resumed, ctx.say, model_cfg.vision,
                                           given)
    else:
        tok, train, val = build_data(cfg.data, ctx.run_dir, cfg.train.seed, resumed, ctx.say, given)
    return tok, train, val, fit_to_tokenizer(cfg, model_cfg, tok, ctx.say, ctx.checkpoint)


def place(cfg: TrainConfig, ctx: RunContext, models: Models, teacher: TeacherSource, trains_teacher: bool):
    """(model, teacher) placed: a trained model from where it was loaded (`place_model`); a frozen teacher
    sharded the same way in a distributed run (forward only)."""
    ckpt = ctx.checkpoint
    model = place_model(models.model, cfg, ctx, trained=True, source=ckpt)
    if teacher.model is None:
        return model, None
    source = (ckpt / TEACHER_DIR if ckpt is not None else None) if trains_teacher else teacher.path
    return model, place_model(teacher.model, cfg, ctx, trained=trains_teacher, source=source)


def run_flops(cfg: TrainConfig, model, teacher, trains_teacher: bool) -> float:
    """Model FLOPs per trained token: the student's training step, plus the teacher's forward (a third of a
    training step) or, when it trains too, its whole step."""
    flops = model.config.train_flops_per_token(cfg.data.seq_len)
    if teacher is not None:
        t_flops = teacher.config.train_flops_per_token(cfg.data.seq_len)
        flops += t_flops if trains_teacher else t_flops / 3
    return flops


def make_trainer(cfg: TrainConfig, ctx: RunContext, step: Step, train_loader, data: tuple, state: dict | None,
                 flops: float) -> Trainer:
    """The loop over `step` with this rank's rows of every batch; restored from `state` on resume. `data`: the
    (train, validation) data, for the validation batches and the routing-stability probe (`train/probe.py`)."""
    d, t, world = cfg.data, cfg.train, ctx.dist.world
    train, val = data
    if world > 1:
        train_loader = ShardedBatches(train_loader, ctx.dist.rank, world)

    def val_batches():
        loader = make_loader(val, t.batch_size, d.seq_len, t.seed, shuffle=False)
        n = min(cfg.log.eval_batches, loader.num_windows // t.batch_size or 1)
        return itertools.islice(loader if world == 1 else ShardedBatches(loader, ctx.dist.rank, world), n)

    info = RunInfo(ctx.run_dir, flops, peak_flops(ctx.device, ctx.autocast), ctx.device, world)
    probe = RouterProbe(probe_batch(val, train, t.batch_size, d.seq_len, t.seed), ctx.device, ctx.autocast)
    trainer = Trainer(cfg, step, train_loader, val_batches, info, ctx.say, probe)  # the same probe on every rank
    if state is not None:
        trainer.load_state_dict(state, ctx.checkpoint)
    return trainer


def fit(cfg: TrainConfig, ctx: RunContext, trainer: Trainer, tok: Tokenizer, model_cfg, resumed: bool,
        opening: list[dict] = ()) -> dict:
    """The run's files (rank 0), the opening line, the loop, the plots. `opening`: records for metrics.jsonl
    before the first step (stamped with the step the run starts at)."""
    run_dir, dist = ctx.run_dir, ctx.dist
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "tokenizer.json").is_file():
            tok.save(run_dir / "tokenizer.json")
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    where = (f"{dist.world} processes (parallel.ep={cfg.parallel.ep}, dp_shard={cfg.parallel.dp_shard}), "
             f"{ctx.device.type}" if dist.world > 1 else f"device {ctx.device}")
    ctx.say(f"model: {model_cfg.num_params():,} parameters, {model_cfg.num_active_params():,} active per token; "
            f"{where}{' (bf16 autocast)' if ctx.autocast else ''}; {cfg.train.steps} steps of "
            f"{cfg.train.batch_size * cfg.train.grad_accum} x {cfg.data.seq_len} tokens; run dir {run_dir}")
    log = MetricsLog(run_dir, cfg.log.tensorboard, trainer.global_step if resumed else None) if dist.is_main \
        else NullLog()
    for record in opening:
        log.write({**record, "step": trainer.global_step})
    try:
        return trainer.fit(log)
    finally:
        log.close()
        if cfg.log.plots and dist.is_main:
            from behemoth.train.plots import plot_run

            for png in plot_run(run_dir):
                ctx.say(f"plot: {png}")

"""The model phase of a run: the student's config, fitted to the run's tokenizer, and the models
themselves, new or resumed from a checkpoint (with the codistilled teacher when the mode trains one).

A new model takes its vocabulary size from the run's tokenizer (in distillation, the teacher's) unless
`model.vocab_size` sets one; a resumed model must be the checkpoint's, and the run's data and batch
settings those it was started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from behemoth.checkpoint.model_dir import load_model
from behemoth.checkpoint.training import load_training_state
from behemoth.config import ModelConfig, get_preset
from behemoth.config_io import load_config_file
from behemoth.data.images import PATCH
from behemoth.data.tokenizer import Tokenizer
from behemoth.model import build_model
from behemoth.train.config import BIAS_RULES, TrainConfig
from behemoth.train.datasets import check_same_image_tokens, image_token_id
from behemoth.train.placement import RunContext

TEACHER_DIR = "teacher"  # where a codistilled teacher lies in a training checkpoint


@dataclass
class Models:
    """A run's models before placement, and the trainer state to resume (None for a new run)."""

    model: nn.Module
    teacher: nn.Module | None
    state: dict | None


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture asked for: a preset or a config file, with `model.vocab_size` if set."""
    m = cfg.model
    mc = load_config_file(m.config_file) if m.config_file else get_preset(m.preset)
    return mc.replace(vocab_size=m.vocab_size) if m.vocab_size else mc


def fit_to_tokenizer(cfg: TrainConfig, model_cfg: ModelConfig, tok: Tokenizer, say,
                     checkpoint: Path | None = None) -> ModelConfig:
    """The student's config for the run's tokenizer: its vocabulary size (unless `model.vocab_size` set one,
    which must hold the tokenizer; a resumed run keeps its checkpoint's) and, on image-text data, its image
    token (the tokenizer's `<|patch|>`)."""
    changes: dict = {}
    if cfg.model.vocab_size is None:
        changes["vocab_size"] = (load_config_file(checkpoint / "config.json").vocab_size if checkpoint is not None
                                 else tok.vocab_size)
    if tok.vocab_size > changes.get("vocab_size", model_cfg.vocab_size):
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary holds "
                         f"{model_cfg.vocab_size}; set --model.vocab_size={tok.vocab_size} or use a smaller tokenizer")
    if cfg.data.images and model_cfg.image_token_id != (patch := image_token_id(tok)):
        say(f"model: image token id {model_cfg.image_token_id} -> {patch} (the tokenizer's {PATCH})")
        changes["image_token_id"] = patch
    return model_cfg.replace(**changes)


def check_resume(cfg: TrainConfig, saved: dict, model_cfg: ModelConfig, ckpt_model_cfg: ModelConfig,
                 where: Path) -> None:
    """A resumed run must train the checkpoint's model on the same data with the same batches."""
    if ckpt_model_cfg != model_cfg:
        diff = [k for k in model_cfg.to_dict() if model_cfg.to_dict()[k] != ckpt_model_cfg.to_dict()[k]]
        raise ValueError(f"{where}: the checkpoint's model differs from this config ({', '.join(diff)}); "
                         "resume with the same model settings or start a new --train.out_dir")
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    for key in ("data", "distill", "train.seed", "train.batch_size", "train.grad_accum"):
        section, _, name = key.partition(".")
        if name:
            changed = [key] if now[section][name] != saved[section][name] else []
        else:  # a setting the saved run predates (or postdates) counts as its default
            a, b, d = now[section], saved.get(section, {}), defaults[section]
            changed = [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k, d.get(k)) != b.get(k, d.get(k))]
        if changed:
            raise ValueError(f"{where}: incompatible resume: {changed[0]} differs from the checkpoint's run; "
                             "resume with the same data and batch settings or start a new --train.out_dir")


def balancing_change(saved: dict, cfg: TrainConfig) -> str | None:
    """What a resumed run changes in its routing balance, in words (None: nothing). A run saved before
    `router.bias_update` existed balanced with the sign rule, one saved before `router.selection_noise` without
    noise."""
    old = saved.get("router", {})
    old_rule, old_rate = old.get("bias_update", "sign"), old.get("bias_update_rate")
    old_rate = BIAS_RULES.get(old_rule, 0.0) if old_rate is None else old_rate
    notes = []
    if (old_rule, old_rate) != (cfg.router.bias_update, cfg.router.bias_rate):
        notes.append(f"the checkpoint's run moved the routing bias with router.bias_update={old_rule} at rate "
                     f"{old_rate:g}; this run continues with {cfg.router.bias_update} at {cfg.router.bias_rate:g} "
                     "(set both to keep them)")
    old_noise = old.get("selection_noise", 0.0)
    if old_noise != cfg.router.selection_noise:
        notes.append(f"the checkpoint's run selected experts with router.selection_noise={old_noise:g}; this run "
                     f"continues with {cfg.router.selection_noise:g} (set it to keep it)")
    return "; ".join(notes) or None


def build_models(cfg: TrainConfig, ctx: RunContext, model_cfg: ModelConfig, tok: Tokenizer,
                 trains_teacher: bool) -> Models:
    """The student (and a codistilled teacher when `trains_teacher`): resumed from `ctx.checkpoint`, checked
    against this config, or new (the teacher from `distill.teacher_preset`, fitted to the same tokenizer)."""
    ckpt = ctx.checkpoint
    if ckpt is not None:
        state = load_training_state(ckpt)
        model = load_model(ckpt, dtype=torch.float32, device=ctx.load_device(ckpt))
        check_resume(cfg, state["config"], model_cfg, model.config, ckpt)
        if note := balancing_change(state["config"], cfg):
            ctx.say(f"note: {note}")
        teacher = None
        if trains_teacher:
            source = ckpt / TEACHER_DIR
            teacher = load_model(source, dtype=torch.float32, device=ctx.load_device(source))
        ctx.say(f"resuming from {ckpt} (step {state['step']})")
        return Models(model, teacher, state)
    model = build_model(model_cfg, device=ctx.load_device(), seed=cfg.train.seed)
    teacher = None
    if trains_teacher:
        teacher = build_model(codistill_teacher_config(cfg, model_cfg, tok), device=ctx.load_device(),
                              seed=cfg.train.seed + 1)
    return Models(model, teacher, None)


def codistill_teacher_config(cfg: TrainConfig, model_cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    """The codistilled teacher's config: `distill.teacher_preset`, a new model sized to the run's tokenizer
    like the student (unless `model.vocab_size` is set: then the preset's), with the tokenizer's image token."""
    name = cfg.distill.teacher_preset
    tcfg = get_preset(name)
    changes: dict = {} if cfg.model.vocab_size else {"vocab_size": tok.vocab_size}
    if cfg.data.images:
        check_same_image_tokens(model_cfg.vision, tcfg.vision, f"teacher preset {name!r}")
        changes["image_token_id"] = image_token_id(tok)
    tcfg = tcfg.replace(**changes)
    if tcfg.vocab_size < model_cfg.vocab_size:
        raise ValueError(f"distill.teacher_preset={name!r} has a smaller vocabulary ({tcfg.vocab_size}) than "
                         f"the student ({model_cfg.vocab_size})")
    return tcfg

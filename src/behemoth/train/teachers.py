"""The teacher phase of a run: where its teacher comes from (a model, a cache, or none yet), the tokenizer
that teacher binds the run to, and the checks of teacher against student once the data are known.

A frozen teacher (`behemoth distill`) is a model directory (`distill.teacher`: native, Llama 4, or any
transformers causal LM, `checkpoint/foreign.py`) or a teacher cache from `behemoth distill-cache`
(`distill.cache`); a codistilled teacher is built or resumed with the student (`train/models.py`) and fixes no
tokenizer. A teacher whose tokenizer differs from the student's is distilled across tokenizers
(`distill.cross_method`, `train/token_align.py`): `check_teacher` measures the two vocabularies' overlap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.foreign import is_foreign_dir, load_any_model
from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.config import ModelConfig
from behemoth.data.images import PATCH
from behemoth.data.teacher_cache import TeacherCache
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.config import TrainConfig
from behemoth.train.datasets import Data, check_same_image_tokens, image_token_id
from behemoth.train.placement import RunContext


@dataclass
class TeacherSource:
    """A run's teacher: a model (frozen, or codistilled once built), a cache of its targets, or neither."""

    model: nn.Module | None = None
    cache: TeacherCache | None = None
    tokenizer: Tokenizer | None = None  # the tokenizer it binds the run to (None: the run chooses)
    path: Path | None = None  # the frozen teacher's model directory
    student_tokenizer: Tokenizer | None = None  # set by `check_teacher` when it differs from `tokenizer`
    overlap: dict | None = None  # then also the vocabularies' overlap (`cross_step.overlap_report`), for the log
    prompts: object | None = None  # on-policy distillation: the prompts it grades the student's answers to
    # (`on_policy.PromptPool`, made once by `on_policy.check_on_policy`)


def no_teacher(cfg: TrainConfig, ctx: RunContext) -> TeacherSource:
    return TeacherSource()


def frozen_teacher(cfg: TrainConfig, ctx: RunContext) -> TeacherSource:
    """`behemoth distill`'s teacher: the model in `distill.teacher` (loaded where `ctx` says), or the cache
    in `distill.cache`; either with its tokenizer."""
    d = cfg.distill
    if d.cache:
        if cfg.data.images:
            raise ValueError("distill.cache does not hold image-text data (its targets are keyed by token-stream "
                             "offsets); distil online with distill.teacher")
        if d.teacher:
            raise ValueError("distill.teacher and distill.cache are both set; set one (a cache needs no teacher model)")
        cache = TeacherCache.open(d.cache)
        return TeacherSource(cache=cache, tokenizer=cache.tokenizer())
    if not d.teacher:
        raise ValueError("distill.teacher: set it to the teacher's checkpoint directory (or distill.cache to a "
                         "teacher cache from behemoth distill-cache)")
    try:
        path = resolve_model_dir(d.teacher)
    except CheckpointError as e:
        raise ValueError(f"distill.teacher: {e}") from None
    d.teacher = str(path)  # pinned: a run directory's latest checkpoint may move on; this run (and its resume) stay
    if cfg.data.images and is_foreign_dir(path):
        raise ValueError(f"distill.teacher: {path} is a transformers text model; image-text data needs a native "
                         "multimodal teacher")
    model, tok = load_teacher(path, ctx.load_device(path), teacher_dtype(d.teacher_dtype, ctx.autocast))
    return TeacherSource(model=model, tokenizer=tok, path=path)


def teacher_dtype(setting: str, autocast: torch.dtype | None) -> torch.dtype:
    """The frozen teacher's weights' dtype: `distill.teacher_dtype`, auto = the run's autocast dtype (a bf16 run holds
    and reads half the bytes; its matmuls run in bf16 under autocast anyway)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(setting, autocast or torch.float32)


def load_teacher(directory: Path, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Tokenizer]:
    """A teacher model (native, Llama 4, or a transformers model of another family) in `dtype` and its tokenizer,
    both from its model directory (`resolve_model_dir`'s). Errors name distill.teacher."""
    tok = load_teacher_tokenizer(directory)
    try:
        model = load_any_model(directory, dtype, device)
    except CheckpointError as e:
        raise ValueError(f"distill.teacher: {e}") from None
    return model, tok


def load_teacher_tokenizer(directory: Path) -> Tokenizer:
    try:
        return Tokenizer.load(directory)
    except ValueError as e:
        raise ValueError(f"distill.teacher: {e}; the teacher's tokenizer is needed to check that teacher and "
                         "student share one") from None


def check_vocabularies(teacher_vocab: int, teacher_tok: Tokenizer, student_vocab: int, student_tok: Tokenizer) -> None:
    """A teacher cache needs teacher and student to share a tokenizer. A teacher vocabulary padded beyond the
    student's is fine (the KD loss drops the padding columns, checking they hold no probability); a different
    tokenizer, or a student vocabulary larger than the teacher's, is an error."""
    if teacher_tok.fingerprint != student_tok.fingerprint:
        raise ValueError("the teacher's tokenizer differs from the student's (data.tokenizer); distillation from a "
                         "teacher cache needs one shared tokenizer (distil online with distill.teacher to distil "
                         "across tokenizers)")
    check_vocab_sizes(teacher_vocab, student_vocab)


def check_positions(teacher: nn.Module, seq_len: int) -> None:
    """A transformers teacher with learned positions (GPT-2's n_positions) takes rows of at most that many
    tokens: data.seq_len longer is an error naming both."""
    hf = getattr(teacher.config, "hf", None)
    limit = getattr(hf, "n_positions", None) if hf is not None else None
    if limit and seq_len > limit:
        raise ValueError(f"data.seq_len={seq_len}: the teacher ({teacher.config.model_type}) has learned positions "
                         f"for {limit} tokens at most; set data.seq_len to {limit} or less")


def check_vocab_sizes(teacher_vocab: int, student_vocab: int) -> None:
    if teacher_vocab < student_vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocab}) is smaller than the student's "
                         f"({student_vocab}); give the student --model.vocab_size={teacher_vocab}")


def check_teacher(source: TeacherSource, cfg: TrainConfig, model_cfg: ModelConfig, tok: Tokenizer, train: Data,
                  say, distils: bool) -> None:
    """A frozen teacher or cache against the student and its data, before anything is built or written: the
    same tokenizer, a vocabulary at least the student's, the same image tokens; a cache made from these
    very training tokens with these settings. In every mode that distils, a top-k within the vocabulary."""
    if distils and cfg.distill.top_k > model_cfg.vocab_size:
        raise ValueError(f"distill.top_k={cfg.distill.top_k} exceeds the vocabulary ({model_cfg.vocab_size} "
                         "tokens); set at most that, or 0 for the teacher's whole distribution")
    if source.model is not None:
        if cfg.data.images:
            check_same_image_tokens(model_cfg.vision, source.model.config.vision, "teacher")
            patch, have = image_token_id(tok), source.model.config.image_token_id
            if have != patch:
                raise ValueError(f"the teacher's image token is id {have}, but the shared tokenizer's {PATCH} is "
                                 f"id {patch}")
        check_positions(source.model, cfg.data.seq_len)
        if source.tokenizer.fingerprint == tok.fingerprint:
            check_vocab_sizes(source.model.config.vocab_size, model_cfg.vocab_size)
        else:
            check_cross(source, cfg, tok, train, say)
    if source.cache is not None:
        cache, d = source.cache, cfg.distill
        cache.validate(tokenizer_fingerprint=tok.fingerprint, store=train, seq_len=cfg.data.seq_len,
                       vocab_size=model_cfg.vocab_size, top_k=d.top_k, temperature=d.temperature)
        say(f"teacher: cached top-{d.top_k or cache.top_k} of {cache.top_k} from {cache.directory} "
            f"({cache.manifest['bytes_per_token']:.1f} bytes/token, mean mass captured "
            f"{cache.manifest['mean_captured_mass']:.4f})")


def check_cross(source: TeacherSource, cfg: TrainConfig, tok: Tokenizer, train: Data, say) -> None:
    """A teacher with a tokenizer of its own: the options that cannot apply are errors, both tokenizers must spell
    text token by token, and the vocabularies' overlap and the first batch's alignment are reported."""
    from behemoth.data.token_bytes import TokenBytes
    from behemoth.train.cross_step import overlap_report

    d = cfg.distill
    if cfg.data.images:
        raise ValueError("distill.teacher: its tokenizer differs from the student's, and image-text data cannot be "
                         "distilled across tokenizers; give the student the teacher's tokenizer")
    if d.top_k:
        raise ValueError(f"distill.top_k={d.top_k}: a teacher with another tokenizer is matched on the tokens the "
                         "vocabularies share (distill.cross_method), not on its top-k; set distill.top_k=0")
    if d.token_rule != "none":
        raise ValueError(f"distill.token_rule={d.token_rule!r}: not defined across tokenizers; set "
                         "distill.token_rule=none")
    if d.cross_method == "aligned" and d.vocab_match == "marginal" and (
            d.loss == "reverse_kl" or (d.loss == "jsd" and d.beta == 1)):
        raise ValueError(f"distill.loss={d.loss}: the marginal target gives no mass to most student tokens, where "
                         "a reverse KL is infinite; use forward_kl, jsd with beta < 1, skew_reverse_kl or tvd, or "
                         "distill.vocab_match=prefix")
    spelled = []
    for name, t in (("distill.teacher", source.tokenizer), ("data.tokenizer", tok)):
        try:
            spelled.append(TokenBytes.of(t))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    source.student_tokenizer = tok
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1  # else rank 0 holds the whole teacher in CPU memory
    line, source.overlap = overlap_report(source.tokenizer, tok, train, cfg, source.model, *spelled,
                                          measure_mass=alone)
    say(line)

"""The teacher phase of a run: where its teacher comes from (a model, a cache, or none yet), the tokenizer
that teacher binds the run to, and the checks of teacher against student once the data are known.

A frozen teacher (`behemoth distill`) is a model directory (`distill.teacher`) or a teacher cache from
`behemoth distill-cache` (`distill.cache`); a codistilled teacher is built or resumed with the student
(`train/models.py`) and fixes no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.checkpoint.model_dir import load_model
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
    model, tok = load_teacher(path, ctx.load_device(path))
    return TeacherSource(model=model, tokenizer=tok, path=path)


def load_teacher(directory: Path, device: torch.device) -> tuple[nn.Module, Tokenizer]:
    """A teacher model (fp32) and its tokenizer, both from its model directory (`resolve_model_dir`'s)."""
    tok = load_teacher_tokenizer(directory)
    return load_model(directory, dtype=torch.float32, device=device), tok


def load_teacher_tokenizer(directory: Path) -> Tokenizer:
    try:
        return Tokenizer.load(directory)
    except ValueError as e:
        raise ValueError(f"distill.teacher: {e}; the teacher's tokenizer is needed to check that teacher and "
                         "student share one") from None


def check_vocabularies(teacher_vocab: int, teacher_tok: Tokenizer, student_vocab: int, student_tok: Tokenizer) -> None:
    """Teacher and student must share a tokenizer. A teacher vocabulary padded beyond the student's is
    fine (the KD loss drops the padding columns, checking they hold no probability); a different
    tokenizer, or a student vocabulary larger than the teacher's, is an error."""
    if teacher_tok.fingerprint != student_tok.fingerprint:
        raise ValueError("the teacher's tokenizer differs from the student's (data.tokenizer); distillation needs "
                         "one shared tokenizer")
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
        check_vocabularies(source.model.config.vocab_size, source.tokenizer, model_cfg.vocab_size, tok)
    if source.cache is not None:
        cache, d = source.cache, cfg.distill
        cache.validate(tokenizer_fingerprint=tok.fingerprint, store=train, seq_len=cfg.data.seq_len,
                       vocab_size=model_cfg.vocab_size, top_k=d.top_k, temperature=d.temperature)
        say(f"teacher: cached top-{d.top_k or cache.top_k} of {cache.top_k} from {cache.directory} "
            f"({cache.manifest['bytes_per_token']:.1f} bytes/token, mean mass captured "
            f"{cache.manifest['mean_captured_mass']:.4f})")

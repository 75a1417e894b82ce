"""`behemoth distill-cache`: run a frozen teacher once over a run's training tokens and write its top-k
(a teacher cache, `data/teacher_cache.py`), so `behemoth distill --distill.cache=DIR` trains without it.

The training tokens are those `behemoth distill` builds from the same data settings (the same `--config`
file and `--data.*` overrides, and `train.seed`), with the teacher's tokenizer; the top-k is computed
exactly as online top-k distillation computes it (`steps.teacher_hidden`, `kd.teacher_topk`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.foreign import load_any_model
from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.data.fingerprint import teacher_fingerprint
from behemoth.data.teacher_cache import check_out_dir, write_cache
from behemoth.train.config import DataSection
from behemoth.train.datasets import build_data
from behemoth.train.device import autocast_dtype, resolve_device
from behemoth.train.kd import teacher_topk
from behemoth.train.steps import teacher_hidden
from behemoth.train.teachers import check_vocabularies, load_teacher, load_teacher_tokenizer
from behemoth.train.trainer import stdout_say


def teacher_topk_fn(teacher: torch.nn.Module, top_k: int, temperature: float, device: torch.device,
                    autocast: torch.dtype | None):
    """batch -> (ids, log-probs) [B*S, k] numpy: the teacher's top-k, as `DistillStep` computes it online."""
    def targets(batch):
        t = teacher_topk(teacher.logits, teacher_hidden(teacher, batch.to(device), autocast), top_k, temperature)
        return t.ids.cpu().numpy(), t.logprobs.float().cpu().numpy()

    return targets


def run_distill_cache(teacher_dir: str, out_dir: str, data: DataSection, seed: int = 0, top_k: int = 128,
                      temperature: float = 1.0, resume: bool = False, batch_size: int = 8,
                      shard_tokens: int = 1 << 20, device: str = "auto", precision: str = "auto", values: str = "u8",
                      say: Callable[[str], None] = stdout_say) -> dict:
    """Write a teacher cache of the teacher's top-k over the training token store that `behemoth distill`
    with the same data settings (`data`, `seed` = train.seed) builds, with the teacher's tokenizer. Returns
    the manifest; `ValueError` for bad input, before the teacher's weights are loaded."""
    dev = resolve_device(device, "--device")
    autocast = autocast_dtype(precision, dev)
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens!r}: must be an integer >= 1")
    if data.seq_len < 2:
        raise ValueError(f"seq_len={data.seq_len}: must be >= 2")
    if data.images:
        raise ValueError("data.images: a teacher cache holds text windows only; distil image-text data online")
    check_out_dir(out_dir, resume)  # before the teacher is loaded or any data is built
    try:
        teacher_path = resolve_model_dir(teacher_dir)
        teacher_cfg = load_any_model(teacher_path, device="meta").config
    except CheckpointError as e:
        raise ValueError(f"--teacher: {e}") from None
    teacher_tok = load_teacher_tokenizer(teacher_path)
    if top_k > teacher_cfg.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary ({teacher_cfg.vocab_size})")
    out = Path(out_dir)
    info = {"teacher_path": str(teacher_dir), "teacher_params": teacher_cfg.num_params(),
            "data_config": {**data.__dict__, "seed": seed}}
    if not data.tokenizer:  # the student of `distill` uses the teacher's tokenizer unless told otherwise
        data = DataSection(**{**data.__dict__, "tokenizer": str(teacher_path / "tokenizer.json")})
    tok, train_store, _ = build_data(data, out, seed, False, say)
    check_vocabularies(teacher_cfg.vocab_size, teacher_tok, tok.vocab_size, tok)
    teacher, _ = load_teacher(teacher_path, dev, autocast or torch.float32)
    teacher.eval().requires_grad_(False)
    say(f"teacher: {teacher_dir} ({teacher.config.num_params():,} parameters, vocabulary "
        f"{teacher.config.vocab_size:,}) on {dev}{' (bf16 autocast)' if autocast else ''}; top-{top_k} at "
        f"temperature {temperature:g}, {values} values")
    targets = teacher_topk_fn(teacher, top_k, temperature, dev, autocast)
    return write_cache(out, train_store, data.seq_len, targets, top_k=top_k, temperature=temperature,
                       vocab_size=teacher.config.vocab_size, teacher_fingerprint=teacher_fingerprint(teacher_path),
                       tokenizer=teacher_tok, values=values, windows_per_shard=max(1, shard_tokens // data.seq_len),
                       batch_size=batch_size, resume=resume, say=say, info=info)

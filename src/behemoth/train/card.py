"""What a training run says about the models it writes: the facts of their model cards (`checkpoint/model_card.py`).

`run_card_facts` gathers, once at the start of a run, what does not change while it trains (architecture,
tokenizer, data and its fingerprint, the teacher and its fingerprint, the recipe, the machine); `card_text` adds
what does (steps, tokens seen, wall time, the latest held-out loss) each time a checkpoint is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from behemoth.checkpoint.model_card import model_fingerprint, render_card
from behemoth.data.tokenizer import Tokenizer
from behemoth.machine import machine_info
from behemoth.train.config import TrainConfig

MODES = {"pretrain": "trained from scratch (next-token loss)", "distill": "distilled from a frozen teacher",
         "codistill": "distilled from a teacher trained in the same run"}
COMMANDS = {"pretrain": "train", "distill": "distill", "codistill": "codistill"}
HASH_TOKENS = 1 << 28  # in-memory training tokens up to this many are hashed for the card


def _cache_fingerprint(store) -> str | None:
    """The corpus fingerprint of a cached tokenized corpus (`data.packing`: its meta.json, beside the split)."""
    directory = getattr(store, "directory", None)
    meta = Path(directory).parent / "meta.json" if directory else None
    if meta is None or not meta.is_file():
        return None
    corpus = json.loads(meta.read_text()).get("corpus")
    return f"corpus sha256 {corpus}" if corpus else None


def data_facts(cfg: TrainConfig, train) -> dict:
    """The training data: a corpus path, or the built-in tasks with their settings; its size; a fingerprint (the
    corpus fingerprint of a cached corpus: sha256 over its files' names, sizes and contents; else sha256 of the
    training tokens, up to `HASH_TOKENS` of them)."""
    d = cfg.data
    if d.path:
        name, source = Path(d.path).name, {"path": d.path, "field": d.field}
    elif d.images:
        name, source = "behemoth built-in visual tasks", {"tasks": d.tasks or "all"}
    else:
        name, source = "behemoth built-in tasks", {"tasks": d.tasks or "all", "problems": d.num_problems,
                                                    "difficulty": d.difficulty}
    fingerprint = _cache_fingerprint(train)
    tokens = getattr(train, "tokens", None)
    if fingerprint is None and tokens is not None and len(tokens) <= HASH_TOKENS:
        fingerprint = "tokens sha256 " + hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()
    size = {"documents": train.num_docs, "tokens": train.num_tokens} if hasattr(train, "num_docs") else \
        {"examples": len(train)} if hasattr(train, "__len__") else {}
    return {"name": name, **source, **size, "seq_len": d.seq_len, "fingerprint": fingerprint}


def teacher_facts(cfg: TrainConfig, mode: str, teacher) -> dict | None:
    """Which teacher a student learned from, and its fingerprint."""
    d = cfg.distill
    if mode == "codistill":
        return {"kind": f"{d.teacher_preset}, trained in the same run (its own card is in teacher/)",
                "loss": d.loss, "alpha": d.alpha, "temperature": d.temperature}
    if mode != "distill":
        return None
    facts = {"loss": d.loss, "alpha": d.alpha, "temperature": d.temperature,
             "tokenizer fingerprint": teacher.tokenizer.fingerprint if teacher.tokenizer else None}
    if d.cache:
        return {"kind": "cached top-k targets", "cache": d.cache, **facts}
    model = teacher.model
    params = {"params": model.config.num_params(), "active params": model.config.num_active_params()} \
        if hasattr(getattr(model, "config", None), "num_params") else {}
    fp = model_fingerprint(teacher.path) if teacher.path is not None else {}
    return {"path": str(teacher.path), **params, "fingerprint": fp.get("sha256"),
            "fingerprint of": fp.get("kind"), **facts}


def run_card_facts(cfg: TrainConfig, mode: str, models: dict[str, torch.nn.Module], tok: Tokenizer, train,
                   teacher, device: torch.device) -> dict[str, dict]:
    """The unchanging facts of each trained model's card, by the model's name in the checkpoint."""
    run = Path(cfg.train.out_dir).resolve().name
    tokenizer = {"fingerprint": tok.fingerprint, "vocab size": tok.vocab_size,
                 "source": cfg.data.tokenizer or ("the teacher's" if cfg.distill.tokenizer == "teacher" and
                                                  teacher.tokenizer else "built for the run")}
    hardware = {"device": str(device), **machine_info()}
    data = data_facts(cfg, train)
    out = {}
    for name, model in models.items():
        student = name == "model"
        c = model.config
        out[name] = {
            "name": run if student else f"{run} ({name})",
            "summary": f"A Llama 4 family model ({c.n_layers} layers, dim {c.dim}"
                       f"{f', {c.moe.num_experts} experts' if c.moe else ''}), "
                       f"{MODES[mode] if student else 'the teacher of a codistillation run, trained on its own loss'}"
                       f", written by `behemoth {COMMANDS[mode]}`.",
            "architecture": {"config": c.to_dict(), "total_params": c.num_params(),
                             "active_params": c.num_active_params()},
            "tokenizer": tokenizer, "data": data, "recipe": cfg.to_dict(), "hardware": hardware,
            "teacher": teacher_facts(cfg, mode, teacher) if student else None}
    return out


def card_text(facts: dict, state: dict) -> str:
    """The card of one model at a checkpoint: `facts` (from `run_card_facts`) with the run's state then ("step",
    "total_steps", "tokens_seen", "elapsed_s", "eval": the latest {"step", "val_loss"} or None)."""
    ev = state.get("eval")
    training = {"steps": f"{state['step']:,} of {state['total_steps']:,}", "tokens seen": state["tokens_seen"],
                "wall time (s)": round(state["elapsed_s"], 1)}
    results = [] if not ev else [{"metric": "held-out loss (nats/token)", "value": ev["val_loss"],
                                  "dataset": facts["data"]["name"] + " (held-out split)",
                                  "source": f"training run, step {ev['step']}"}]
    return render_card(facts | {"training": training, "results": results})

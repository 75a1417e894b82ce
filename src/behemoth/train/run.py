"""`behemoth train`: assemble a run (data, tokenizer, model, step, trainer) from a `TrainConfig`.

Everything that can be checked before the first step is checked here, with one-line errors
(`ValueError`): the data exist and are non-empty, the tokenizer fits the model's vocabulary, a
resumed run has the same model, data and batch settings. A new run never writes into a directory
that already holds checkpoints.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch

from behemoth import build_model
from behemoth.checkpoint.io import latest_checkpoint, load_checkpoint, load_training_state, sharded_model_files
from behemoth.config import ModelConfig, get_preset, load_config_file
from behemoth.data.image_text import ImageTextData, ImageTextLoader, read_jsonl, split_examples, visual_task_examples
from behemoth.data.loader import DataLoader
from behemoth.data.packing import TokenStore, build_in_memory, tokenize_corpus
from behemoth.data.teacher_cache import TeacherCache, check_out_dir, teacher_fingerprint, write_cache
from behemoth.data.tokenizer import Tokenizer
from behemoth.parallel import apply_activation_checkpointing, apply_compile
from behemoth.parallel.distributed import (
    DistInfo,
    ShardedBatches,
    broadcast_from_rank0,
    check_degrees,
    setup_distributed,
    shard_model,
)
from behemoth.train.config import DataSection, TrainConfig
from behemoth.train.kd import topk_targets
from behemoth.train.steps import CachedDistillStep, CodistillStep, DistillStep, PretrainStep, autocast_context
from behemoth.train.trainer import MetricsLog, NullLog, RunInfo, Trainer, stdout_say

# Dense bf16 peak of GPUs whose MFU we report (FLOP/s); elsewhere MFU is shown as n/a.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r}: CUDA is not available here")
    return torch.device(name)


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def model_config(cfg: TrainConfig) -> ModelConfig:
    m = cfg.model
    mc = load_config_file(m.config_file) if m.config_file else get_preset(m.preset)
    return mc.replace(vocab_size=m.vocab_size) if m.vocab_size else mc


def _fixed_tokenizer(d: DataSection, run_dir: Path, resume: bool, tokenizer: Tokenizer | None) -> Tokenizer | None:
    """The tokenizer a run is bound to, in order: its own (on resume), `data.tokenizer`, `tokenizer` (a
    distillation teacher's); None when the run makes its own from the data."""
    saved = run_dir / "tokenizer.json"
    if resume and saved.is_file():
        return Tokenizer.load(saved)
    if d.tokenizer:
        return Tokenizer.load(d.tokenizer)
    return tokenizer


def build_data(d: DataSection, run_dir: Path, seed: int, resume: bool, say,
               tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, TokenStore, TokenStore]:
    """Tokenizer and train/validation token stores: the built-in tasks, or a corpus on disk.

    The tokenizer is, in order: the run's own (on resume), `data.tokenizer`, `tokenizer` (a
    distillation teacher's), the character tokenizer of the built-in tasks, or a BPE trained on the
    corpus."""
    paths = None
    if d.path is not None:
        from behemoth.data.corpus import iter_documents, resolve_paths

        paths = resolve_paths(d.path)
    tok = _fixed_tokenizer(d, run_dir, resume, tokenizer)
    if tok is None and paths is None:
        from behemoth.data.tasks import ALPHABET

        tok = Tokenizer.from_chars(ALPHABET)
    elif tok is None:
        say(f"tokenizer: training a byte-level BPE ({d.tokenizer_vocab_size} tokens) on {d.path}")
        tok = Tokenizer.train(iter_documents(paths, d.field), vocab_size=d.tokenizer_vocab_size)
    if paths is None:
        from behemoth.data.tasks import generate

        train = generate("train", d.num_problems, seed=seed, tasks=d.tasks, difficulty=d.difficulty)
        val = generate("test", max(64, d.num_problems // 50), seed=seed, tasks=d.tasks, difficulty=d.difficulty)
        say(f"data: built-in tasks ({', '.join(sorted({p.task for p in train}))}), {len(train):,} training and "
            f"{len(val):,} held-out problems")
        return tok, build_in_memory((p.text for p in train), tok), build_in_memory((p.text for p in val), tok)
    train, val = tokenize_corpus(paths, tok, Path(d.cache_dir), field=d.field, val_fraction=d.val_fraction, seed=seed)
    say(f"data: {d.path}: {train.num_docs:,} documents / {train.num_tokens:,} tokens for training, "
        f"{val.num_docs:,} / {val.num_tokens:,} held out")
    return tok, train, val


def build_image_data(d: DataSection, run_dir: Path, seed: int, resume: bool, say, vision,
                     tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, ImageTextData, ImageTextData]:
    """Tokenizer and train/validation image-text data (`data.images`): a JSONL of examples, or the built-in
    visual tasks. The tokenizer is chosen as in `build_data`; the built-in tasks' is the character tokenizer
    with the image tokens, a BPE trained on a JSONL's text gets the image tokens added."""
    from behemoth.data.images import IMAGE_SPECIAL_TOKENS

    if vision is None:
        raise ValueError("data.images needs a model with a vision tower (e.g. --model.preset=mini-maverick-vl)")
    if d.path is None:
        from behemoth.data.vision_tasks import generate as generate_visual

        train_p = generate_visual("train", d.num_problems, seed=seed, tasks=d.tasks)
        val_p = generate_visual("test", max(64, d.num_problems // 50), seed=seed, tasks=d.tasks)
        train_ex, val_ex = visual_task_examples(train_p), visual_task_examples(val_p)
        say(f"data: built-in visual tasks ({', '.join(sorted({p.task for p in train_p}))}), {len(train_ex):,} "
            f"training and {len(val_ex):,} held-out pictures")
    else:
        examples = read_jsonl(d.path, image_field=d.image_field, text_field=d.field, prompt_field=d.prompt_field)
        train_ex, val_ex = split_examples(examples, d.val_fraction)
        say(f"data: {d.path}: {len(train_ex):,} image-text examples for training, {len(val_ex):,} held out")
    tok = _fixed_tokenizer(d, run_dir, resume, tokenizer)
    if tok is None and d.path is None:
        from behemoth.data.tasks import ALPHABET

        tok = Tokenizer.from_chars(ALPHABET, IMAGE_SPECIAL_TOKENS)
    elif tok is None:
        say(f"tokenizer: training a byte-level BPE ({d.tokenizer_vocab_size} tokens) on {d.path}, plus image tokens")
        bpe = Tokenizer.train((ex.prompt + ex.text for ex in train_ex), vocab_size=d.tokenizer_vocab_size)
        bpe.hf.add_special_tokens(list(IMAGE_SPECIAL_TOKENS))
        tok = Tokenizer(bpe.hf, source=bpe.source)
    data = [ImageTextData(ex, tok, vision, d.seq_len, d.max_tiles) for ex in (train_ex, val_ex)]
    return tok, data[0], data[1]


def _image_token(cfg: ModelConfig, tok: Tokenizer, who: str, say) -> ModelConfig:
    """The model's image token made the tokenizer's `<|patch|>` (a fresh model adopts it, like a vocabulary
    size; a loaded teacher must already have it)."""
    from behemoth.data.images import PATCH

    patch = tok.token_to_id(PATCH)
    if patch is None:
        raise ValueError(f"the tokenizer has no {PATCH} token: it cannot carry images (data.tokenizer)")
    if cfg.image_token_id != patch:
        if who != "model":
            raise ValueError(f"the {who}'s image token is id {cfg.image_token_id}, but the shared tokenizer's "
                             f"{PATCH} is id {patch}")
        say(f"model: image token id {cfg.image_token_id} -> {patch} (the tokenizer's {PATCH})")
        cfg = cfg.replace(image_token_id=patch)
    return cfg


def _same_image_tokens(student, teacher, who: str) -> None:
    """Teacher and student must turn an image into the same token block (tile size and tokens per tile)."""
    if teacher is None:
        raise ValueError(f"the {who} has no vision tower; distillation on image-text data needs one in both models")
    a, b = (student.image_size, student.tokens_per_tile), (teacher.image_size, teacher.tokens_per_tile)
    if a != b:
        raise ValueError(f"the {who}'s vision tower cuts {b[0]}-pixel tiles into {b[1]} tokens, the student's "
                         f"{a[0]}-pixel tiles into {a[1]}; their image tokens must match")


def _check_resume(cfg: TrainConfig, saved: dict, model_cfg: ModelConfig, ckpt_model_cfg: ModelConfig,
                  where: Path) -> None:
    if ckpt_model_cfg != model_cfg:
        diff = [k for k in model_cfg.to_dict() if model_cfg.to_dict()[k] != ckpt_model_cfg.to_dict()[k]]
        raise ValueError(f"{where}: the checkpoint's model differs from this config ({', '.join(diff)}); "
                         "resume with the same model settings or start a new --train.out_dir")
    same = ["data", "distill", "train.seed", "train.batch_size", "train.grad_accum"]
    now = cfg.to_dict()
    for key in same:
        section, _, name = key.partition(".")
        a = now[section] if not name else now[section][name]
        b = saved[section] if not name else saved[section][name]
        if a != b:
            changed = key if name else next(f"{section}.{k}" for k in a if a[k] != b.get(k))
            raise ValueError(f"{where}: incompatible resume: {changed} differs from the checkpoint's run; "
                             "resume with the same data and batch settings or start a new --train.out_dir")


def load_teacher(path: str, device: torch.device) -> tuple[torch.nn.Module, Tokenizer]:
    """A distillation teacher and its tokenizer, both from its checkpoint directory."""
    teacher_dir = Path(path)
    try:
        tok = Tokenizer.load(teacher_dir)
    except ValueError as e:
        raise ValueError(f"distill.teacher: {e}; the teacher's tokenizer is needed to check that teacher and "
                         "student share one") from None
    return load_checkpoint(teacher_dir, dtype=torch.float32, device=device), tok


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


def make_loader(data: TokenStore | ImageTextData, batch_size: int, seq_len: int, seed: int, shuffle: bool):
    """Packed windows of a token store, or whole examples of image-text data."""
    if isinstance(data, ImageTextData):
        return ImageTextLoader(data, batch_size, seed=seed, shuffle=shuffle)
    return DataLoader(data, batch_size, seq_len, seed=seed, shuffle=shuffle)


def start_distributed(cfg: TrainConfig, device: torch.device, model_cfg: ModelConfig) -> DistInfo:
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
    return setup_distributed(device.type)


def _quiet(msg: str) -> None:
    """`say` on ranks other than 0."""


def _tokenizer_from_json(text: str) -> Tokenizer:
    import tokenizers

    return Tokenizer(tokenizers.Tokenizer.from_str(text), source="rank 0's tokenizer")


def _load_device(dist_info: DistInfo, source: Path | str | None = None) -> torch.device:
    """Where a model is built or loaded before training: the run's device in one process. In a distributed
    run no rank holds a model whole on its device (`shard_model` gives each its shards): rank 0 holds it in
    CPU memory and the others a meta-device shell, or every rank a shell when `source` holds sharded files
    (which every rank reads its part of)."""
    if dist_info.world == 1:
        return dist_info.device
    if dist_info.is_main and (source is None or not sharded_model_files(source)):
        return torch.device("cpu")
    return torch.device("meta")


def _parallelize_models(cfg: TrainConfig, mode: str, dist_info: DistInfo, model, teacher,
                        sources: tuple[Path | None, Path | None]):
    """(model, teacher) sharded by `shard_model` with FSDP2 (+ expert parallelism, activation checkpointing,
    compile); a frozen teacher is sharded the same way (forward only: no checkpointing, no compile)."""
    p, t = cfg.parallel, cfg.train

    def shard(m, source, trained: bool):
        files = sharded_model_files(source) if source is not None else None
        return shard_model(m, dist_info.world, p.ep, dist_info.device, trained and t.activation_checkpointing,
                           trained and t.compile, p.dp_shard, files)

    model = shard(model, sources[0], True)
    if teacher is not None:
        teacher = shard(teacher, sources[1], mode == "codistill")
    return model, teacher


def build_step(mode: str, cfg: TrainConfig, model, teacher, autocast_dtype, cache=None):
    if mode == "pretrain":
        return PretrainStep(model, cfg.router, autocast_dtype)
    if mode == "distill" and cache is not None:
        return CachedDistillStep(model, cache, cfg.router, cfg.distill, autocast_dtype)
    if mode == "distill":
        return DistillStep(model, teacher, cfg.router, cfg.distill, autocast_dtype)
    return CodistillStep(model, teacher, cfg.router, cfg.distill, autocast_dtype)


def run_training(cfg: TrainConfig, resume: bool = False, say: Callable[[str], None] = stdout_say,
                 mode: str = "pretrain") -> dict:
    """Train as configured; returns a summary. Raises ValueError for bad input (nothing written).

    mode: "pretrain" (next-token loss), "distill" (a frozen teacher from `distill.teacher`, or its cached
    top-k from `distill.cache`), or "codistill" (a `distill.teacher_preset` teacher trained in the same run
    on the same batches).
    """
    run_dir = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if not resume and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ValueError(f"{run_dir}: already holds a run's checkpoints; pass --resume to continue it or choose "
                         "another --train.out_dir")
    device = resolve_device(cfg.train.device)
    model_cfg = model_config(cfg)
    dist_info = start_distributed(cfg, device, model_cfg)
    device, world, rank0 = dist_info.device, dist_info.world, dist_info.is_main
    # the other ranks wait until rank 0 has built the data and checked the run, then take its tokenizer
    shared_tok = None if rank0 else _tokenizer_from_json(broadcast_from_rank0(None))
    say = say if rank0 else _quiet
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if use_bf16 else None
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    teacher = teacher_tok = cache = None
    if mode == "distill" and cfg.distill.cache:
        if cfg.data.images:
            raise ValueError("distill.cache does not hold image-text data (its targets are keyed by token-stream "
                             "offsets); distil online with distill.teacher")
        if cfg.distill.teacher:
            raise ValueError("distill.teacher and distill.cache are both set; set one (a cache needs no teacher model)")
        cache = TeacherCache.open(cfg.distill.cache)
        teacher_tok = cache.tokenizer()
    elif mode == "distill":
        if not cfg.distill.teacher:
            raise ValueError("distill.teacher: set it to the teacher's checkpoint directory (or distill.cache to a "
                             "teacher cache from behemoth distill-cache)")
        teacher, teacher_tok = load_teacher(cfg.distill.teacher, _load_device(dist_info, cfg.distill.teacher))
    given_tok = shared_tok or teacher_tok  # on ranks > 0, rank 0's choice (which its own precedence made)
    if cfg.data.images:
        tok, train_store, val_store = build_image_data(cfg.data, run_dir, cfg.train.seed, ckpt is not None, say,
                                                       model_cfg.vision, given_tok)
    else:
        tok, train_store, val_store = build_data(cfg.data, run_dir, cfg.train.seed, ckpt is not None, say, given_tok)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary holds "
                         f"{model_cfg.vocab_size}; set --model.vocab_size={tok.vocab_size} or use a smaller tokenizer")
    if cfg.data.images:
        model_cfg = _image_token(model_cfg, tok, "model", say)
        if teacher is not None:
            _same_image_tokens(model_cfg.vision, teacher.config.vision, "teacher")
            _image_token(teacher.config, tok, "teacher", say)
    train_loader = make_loader(train_store, cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed, shuffle=True)
    if teacher is not None:
        check_vocabularies(teacher.config.vocab_size, teacher_tok, model_cfg.vocab_size, tok)
    if cache is not None:  # before anything is built or written
        cache.validate(tokenizer_fingerprint=tok.fingerprint, store=train_store, seq_len=cfg.data.seq_len,
                       vocab_size=model_cfg.vocab_size, top_k=cfg.distill.top_k, temperature=cfg.distill.temperature)
        say(f"teacher: cached top-{cfg.distill.top_k or cache.top_k} of {cache.top_k} from {cache.directory} "
            f"({cache.manifest['bytes_per_token']:.1f} bytes/token, mean mass captured "
            f"{cache.manifest['mean_captured_mass']:.4f})")
    if ckpt is not None:
        state = load_training_state(ckpt)
        model = load_checkpoint(ckpt, dtype=torch.float32, device=_load_device(dist_info, ckpt))
        _check_resume(cfg, state["config"], model_cfg, model.config, ckpt)
        if mode == "codistill":
            teacher = load_checkpoint(ckpt / "teacher", dtype=torch.float32,
                                      device=_load_device(dist_info, ckpt / "teacher"))
        say(f"resuming from {ckpt} (step {state['step']})")
    else:
        state = None
        model = build_model(model_cfg, device=_load_device(dist_info), seed=cfg.train.seed)
        if mode == "codistill":
            tcfg = get_preset(cfg.distill.teacher_preset)
            if cfg.data.images:
                _same_image_tokens(model_cfg.vision, tcfg.vision, f"teacher preset {cfg.distill.teacher_preset!r}")
                tcfg = _image_token(tcfg, tok, "model", lambda _: None)
            if tcfg.vocab_size < model_cfg.vocab_size:
                raise ValueError(f"distill.teacher_preset={cfg.distill.teacher_preset!r} has a smaller vocabulary "
                                 f"({tcfg.vocab_size}) than the student ({model_cfg.vocab_size})")
            teacher = build_model(tcfg, device=_load_device(dist_info), seed=cfg.train.seed + 1)
    if world > 1:
        if rank0:
            broadcast_from_rank0(tok.hf.to_str())  # the run is checked: the other ranks may start
        sources = (ckpt, ckpt / "teacher" if ckpt and mode == "codistill" else
                   Path(cfg.distill.teacher) if teacher is not None and mode == "distill" else None)
        model, teacher = _parallelize_models(cfg, mode, dist_info, model, teacher, sources)
        train_loader = ShardedBatches(train_loader, dist_info.rank, world)
    else:
        for m in (model, teacher if mode == "codistill" else None):
            if m is not None and cfg.train.activation_checkpointing:
                apply_activation_checkpointing(m)
            if m is not None and cfg.train.compile:
                apply_compile(m)

    def val_batches():
        loader = make_loader(val_store, cfg.train.batch_size, cfg.data.seq_len, cfg.train.seed, shuffle=False)
        n = min(cfg.log.eval_batches, loader.num_windows // cfg.train.batch_size or 1)
        return itertools.islice(loader if world == 1 else ShardedBatches(loader, dist_info.rank, world), n)

    flops = model_cfg.train_flops_per_token(cfg.data.seq_len)
    if teacher is not None:  # a frozen teacher runs forward only (1/3 of a training step's FLOPs)
        t_flops = teacher.config.train_flops_per_token(cfg.data.seq_len)
        flops += t_flops if mode == "codistill" else t_flops / 3
    info = RunInfo(run_dir, flops, peak_flops(device, autocast_dtype), device, world)
    trainer = Trainer(cfg, build_step(mode, cfg, model, teacher, autocast_dtype, cache), train_loader, val_batches,
                      info, say)
    if state is not None:
        trainer.load_state_dict(state, ckpt)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "tokenizer.json").is_file():
            tok.save(run_dir / "tokenizer.json")
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    where = (f"{world} processes (parallel.ep={cfg.parallel.ep}, dp_shard={cfg.parallel.dp_shard}), {device.type}"
             if world > 1 else f"device {device}")
    say(f"model: {model_cfg.num_params():,} parameters, {model_cfg.num_active_params():,} active per token; "
        f"{where}{' (bf16 autocast)' if autocast_dtype else ''}; {cfg.train.steps} steps of "
        f"{cfg.train.batch_size * cfg.train.grad_accum} x {cfg.data.seq_len} tokens; run dir {run_dir}")
    log = MetricsLog(run_dir, cfg.log.tensorboard, trainer.step if state is not None else None) if rank0 else NullLog()
    try:
        summary = trainer.fit(log)
    finally:
        log.close()
        if cfg.log.plots and rank0:
            from behemoth.train.plots import plot_run

            for png in plot_run(run_dir):
                say(f"plot: {png}")
    return summary


# ---- offline teacher targets ------------------------------------------------------------------------

def teacher_topk_fn(teacher: torch.nn.Module, top_k: int, temperature: float, device: torch.device,
                    autocast_dtype: torch.dtype | None):
    """batch -> (ids, log-probs) [B*S, k] numpy: the teacher's top-k computed exactly as `DistillStep` does
    online (trunk under autocast, the head in chunks of 1024 tokens in fp32, `topk_targets`)."""
    @torch.no_grad()
    def targets(batch):
        b = batch.to(device)
        with autocast_context(device, autocast_dtype):
            h_ND = teacher.hidden_states(b.input_ids, **b.model_inputs).flatten(0, 1)
        parts = [topk_targets(teacher.logits(h_ND[s:s + 1024]).float(), top_k, temperature)
                 for s in range(0, h_ND.shape[0], 1024)]
        return (torch.cat([p.ids for p in parts]).cpu().numpy(),
                torch.cat([p.logprobs for p in parts]).float().cpu().numpy())

    return targets


def run_distill_cache(teacher_dir: str, out_dir: str, data: DataSection, seed: int = 0, top_k: int = 128,
                      temperature: float = 1.0, resume: bool = False, batch_size: int = 8,
                      shard_tokens: int = 1 << 20, device: str = "auto", precision: str = "auto", values: str = "u8",
                      say: Callable[[str], None] = stdout_say) -> dict:
    """Write a teacher cache (`behemoth.data.teacher_cache`) of the teacher's top-k over the training token
    store that `behemoth distill` with the same data settings (`data`, `seed` = train.seed) builds, with the
    teacher's tokenizer. Returns the manifest; `ValueError` for bad input."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32 or bf16")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens!r}: must be an integer >= 1")
    if data.seq_len < 2:
        raise ValueError(f"seq_len={data.seq_len}: must be >= 2")
    if data.images:
        raise ValueError("data.images: a teacher cache holds text windows only; distil image-text data online")
    check_out_dir(out_dir, resume)  # before the teacher is loaded or any data is built
    dev = resolve_device(device)
    autocast_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and dev.type == "cuda") else None
    teacher, teacher_tok = load_teacher(teacher_dir, dev)
    teacher.eval().requires_grad_(False)
    if top_k > teacher.config.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the teacher's vocabulary ({teacher.config.vocab_size})")
    out = Path(out_dir)
    info = {"teacher_path": str(teacher_dir), "teacher_params": teacher.config.num_params(),
            "data_config": {**data.__dict__, "seed": seed}}
    if not data.tokenizer:  # the student of `distill` uses the teacher's tokenizer unless told otherwise
        data = DataSection(**{**data.__dict__, "tokenizer": str(Path(teacher_dir) / "tokenizer.json")})
    tok, train_store, _ = build_data(data, out, seed, False, say)
    check_vocabularies(teacher.config.vocab_size, teacher_tok, tok.vocab_size, tok)
    say(f"teacher: {teacher_dir} ({teacher.config.num_params():,} parameters, vocabulary "
        f"{teacher.config.vocab_size:,}) on {dev}{' (bf16 autocast)' if autocast_dtype else ''}; top-{top_k} at "
        f"temperature {temperature:g}, {values} values")
    targets = teacher_topk_fn(teacher, top_k, temperature, dev, autocast_dtype)
    return write_cache(out, train_store, data.seq_len, targets, top_k=top_k, temperature=temperature,
                       vocab_size=teacher.config.vocab_size, teacher_fingerprint=teacher_fingerprint(teacher_dir),
                       tokenizer=teacher_tok, values=values, windows_per_shard=max(1, shard_tokens // data.seq_len),
                       batch_size=batch_size, resume=resume, say=say, info=info)

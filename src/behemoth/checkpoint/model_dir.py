"""Model directories on disk: load (native, sharded or transformers), save native, export to transformers.

A native directory describes itself: `config.json` ({"format": "behemoth", "model": {...}}), the weights
with Meta-style names, and `meta.json`. The weights are `model.safetensors` (or shards + index), or, for a
model saved by several processes, torch.distributed.checkpoint files in `model.dcp/`. A transformers
directory is whatever `save_pretrained` wrote for `Llama4ForCausalLM` or `Llama4ForConditionalGeneration`
(text model, vision tower and projector).

Loading builds the model on the meta device and assigns the read tensors into it, so weights are never
held twice. Directories are written to a temporary sibling and renamed into place (`fsutil`), so a crash
never leaves a half-written model under the final name.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from behemoth import ranks
from behemoth.checkpoint.convert import (
    CheckpointError,
    assemble,
    hf_source_map,
    is_native_only,
    native_to_hf_key,
    native_to_hf_state,
    read_tensors,
    source_shapes,
    weight_files,
    write_safetensors,
)
from behemoth.checkpoint.dcp import dcp_files, read_dcp, write_dcp
from behemoth.checkpoint.locate import resolve_model_dir
from behemoth.config import ModelConfig
from behemoth.config_io import load_config_file, to_hf_config
from behemoth.fsutil import atomic_dir, publish_dir, temp_sibling
from behemoth.model import Transformer
from behemoth.version import __version__

FORMAT = "behemoth"
FORMAT_VERSION = 1
SHARDED_DIR = "model.dcp"  # the DCP files of a model saved by several processes


def _read_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a checkpoint directory needs config.json)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON (not UTF-8: {e.reason})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(d).__name__}")
    return d


def _format_of(d: dict, cfg_file: Path) -> str:
    if d.get("format") == FORMAT:
        return "native"
    if d.get("model_type") in ("llama4", "llama4_text"):
        return "hf"
    if "model_type" in d:
        raise CheckpointError(f"{cfg_file}: model_type={d.get('model_type')!r} is not a Llama 4 checkpoint; a model "
                              "of another family can be a teacher (--distill.teacher, distill-cache --teacher, "
                              "eval --teacher or eval --model)")
    raise CheckpointError(f"{cfg_file}: neither a behemoth nor a transformers config (no format or model_type)")


def detect_format(directory: Path) -> str:
    """'native' or 'hf', from config.json; raises `CheckpointError` for anything else."""
    directory = Path(directory)
    return _format_of(_read_config(directory), directory / "config.json")


def sharded_model_files(directory: str | Path) -> Path | None:
    """`directory/model.dcp` when the directory holds a model saved by several processes, else None."""
    return dcp_files(Path(directory) / SHARDED_DIR)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Load a model directory (native, sharded or transformers; or a run directory: its latest checkpoint)
    into a `Transformer` (eval mode).

    `dtype=None` keeps the stored dtype. Missing, unexpected or mis-shaped tensors, truncated files and
    missing index entries raise `CheckpointError` naming the file and key. Tensors are read one file at a
    time and each is converted (dtype, device) as soon as it is complete, so the model's weights are never
    held twice; safetensors and DCP tensor files hold raw bytes, and DCP's metadata is read by a restricted
    unpickler that admits only its own classes. `device="meta"` gives the model's structure from
    config.json alone (no weight is read).
    """
    directory = resolve_model_dir(path)
    raw = _read_config(directory)
    fmt = _format_of(raw, directory / "config.json")
    try:
        cfg = load_config_file(directory / "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    with torch.device("meta"):
        model = Transformer(cfg)
    if torch.device(device).type == "meta":
        return model.eval()
    if fmt == "native" and sharded_model_files(directory):
        state = {k: torch.empty(v.shape, dtype=torch.float32, device=device) for k, v in model.state_dict().items()}
        read_dcp(state, directory / SHARDED_DIR, alone=True)  # whole, in this process, whatever world wrote it
        state = {k: t.to(dtype) for k, t in state.items()} if dtype is not None else state
    else:
        state = _read_safetensors(directory, raw, fmt, model, dtype, device)
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model, torch.device(device))
    return model.eval()


def _read_safetensors(directory: Path, raw: dict, fmt: str, model: Transformer, dtype: torch.dtype | None,
                      device) -> dict[str, torch.Tensor]:
    """The native state dict of `model` from a directory's safetensors files (native or transformers
    names, fused or per-expert layouts), each tensor converted as soon as its parts are read."""
    files, index_file = weight_files(directory)
    prefix = "language_model." if fmt == "hf" and raw.get("model_type") == "llama4" else ""
    sources = {k: [k] for k in files} if fmt == "native" else hf_source_map(files, prefix, index_file)
    if fmt == "hf" and model.config.tie_word_embeddings:
        sources.pop("output.weight", None)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    absent_ok = {k: shape for k, shape in expected.items() if is_native_only(k) and k not in sources}
    for k in absent_ok:
        del expected[k]
    for k in expected:
        if k not in sources:
            name = repr(k) if fmt == "native" else f"{native_to_hf_key(k, prefix)!r} (native {k!r})"
            raise CheckpointError(f"{index_file}: missing tensor {name}")
    for k in sources:
        if k not in expected:
            raise CheckpointError(f"{index_file}: unexpected tensor {sources[k][0]!r}")
    owner: dict[str, str] = {}  # source key -> native key
    part_shape: dict[str, tuple[int, ...]] = {}
    for k, shape in expected.items():
        for hk, s in zip(sources[k], source_shapes(k, shape, sources[k], index_file), strict=True):
            owner[hk], part_shape[hk] = k, s
    pending: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for hk, t in read_tensors(files, owner):
        if tuple(t.shape) != part_shape[hk]:
            raise CheckpointError(f"{files[hk]}: tensor {hk!r} has shape {list(t.shape)}, "
                                  f"expected {list(part_shape[hk])}")
        k = owner[hk]
        got = pending.setdefault(k, {})
        got[hk] = t
        if len(got) == len(sources[k]):
            del pending[k]
            full = assemble(k, [got.pop(s) for s in sources[k]], sources[k])
            state[k] = aligned(full.to(device=device, dtype=dtype or full.dtype))
    fill_dtype = dtype or next(iter(state.values())).dtype  # absent routing biases: zeros, like the weights
    for k, shape in absent_ok.items():
        state[k] = torch.zeros(shape, device=device, dtype=fill_dtype)
    return state


ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every fresh tensor


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied into fresh memory when it is not 64-byte aligned. A tensor read from a safetensors file
    is a view into the file's buffer at whatever offset it lies (8-byte aligned, say); vectorised CPU
    kernels split such a tensor into head, body and tail differently than a freshly allocated one and
    round a few elements differently, so a resumed run would not continue bit for bit."""
    return t.clone() if t.data_ptr() % ALIGNMENT else t


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (routing counters) are not in checkpoints: create them as zeros."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device),
                                       persistent=name not in module._non_persistent_buffers_set)


def _write_descriptions(cfg: ModelConfig, state: dict[str, torch.Tensor], directory: Path, **extra) -> None:
    """config.json and meta.json: what makes a directory describe itself."""
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "behemoth_version": __version__,
            "torch_version": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "dtypes": dtypes, "total_params": cfg.num_params(), "active_params": cfg.num_active_params(), **extra}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def write_model_files(model: Transformer, directory: Path, max_shard_bytes: int | None = None, **meta) -> None:
    """A native model into an existing (temporary) directory: config.json, safetensors, meta.json."""
    state = model.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, directory, max_shard_bytes)
    _write_descriptions(model.config, state, directory, **meta)


def write_sharded_model_files(model: Transformer, directory: Path, **meta) -> None:
    """Every rank: its shards of `model` into `directory/model.dcp`; rank 0: config.json and meta.json."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model)
    write_dcp(state, directory / SHARDED_DIR)
    if ranks.is_rank0():
        _write_descriptions(model.config, state, directory, sharded=True, **meta)


def check_new_dir(directory: Path) -> None:
    """A model is written only where nothing is: an absent or empty directory (else `CheckpointError`)."""
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: exists and is not a directory; refusing to overwrite")
        if any(directory.iterdir()):
            raise CheckpointError(f"{directory}: already exists and is not empty; refusing to overwrite")


def save_model(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None, **meta) -> Path:
    """Write a native model directory (config.json + safetensors + meta.json), atomically."""
    directory = Path(directory)
    check_new_dir(directory)
    with atomic_dir(directory) as tmp:
        write_model_files(model, tmp, max_shard_bytes, **meta)
    return directory


def shared_partial_dir(directory: Path) -> Path:
    """The temporary sibling every rank of a distributed save writes into, emptied by rank 0; every rank
    returns once it is ready."""
    tmp = temp_sibling(directory, "partial", unique=False)
    if ranks.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a torn earlier attempt
        tmp.mkdir(parents=True)
    ranks.barrier()
    return tmp


def save_sharded_model(model: Transformer, directory: str | Path, **meta) -> Path:
    """Every rank calls this: the model's state (FSDP and expert shards as they lie) as DCP files in
    `directory/model.dcp`, with config.json and meta.json from rank 0. `load_model` reads it in one process
    and DCP at any world size, so `load_model` and `convert` work on it. Written into a temporary sibling
    that rank 0 renames once every rank has finished."""
    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"{directory}: already exists")
    tmp = shared_partial_dir(directory)
    write_sharded_model_files(model, tmp, **meta)
    ranks.barrier()
    if ranks.is_rank0():
        publish_dir(tmp, directory)
    ranks.barrier()
    return directory


def export_hf(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None,
              drop_router_bias: bool = False) -> Path:
    """Write a transformers directory (config.json + safetensors), atomically: `Llama4ForCausalLM`, or
    `Llama4ForConditionalGeneration` for a model with a vision tower.

    A trained routing bias has no place in transformers' model: non-zero biases raise unless
    `drop_router_bias` (the exported model then routes by the raw logits)."""
    cfg = model.config
    hf_config = to_hf_config(cfg)  # raises ValueError for what transformers cannot express
    prefix = "language_model." if cfg.vision is not None else ""
    state = native_to_hf_state(model.state_dict(), prefix, drop_router_bias=drop_router_bias)
    dtypes = {t.dtype for t in state.values()}
    hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    directory = Path(directory)
    check_new_dir(directory)
    with atomic_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_safetensors(state, tmp, max_shard_bytes)
    return directory

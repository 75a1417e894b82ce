"""Model directories on disk: load (native or transformers), save native, export to transformers.

A native directory describes itself: `config.json` ({"format": "behemoth", "model": {...}}),
`model.safetensors` (or shards + index) with Meta-style names, and `meta.json`. A transformers
directory is whatever `save_pretrained` wrote for `Llama4ForCausalLM` or
`Llama4ForConditionalGeneration` (its text part is loaded).

Loading builds the model on the meta device and assigns the read tensors into it, so weights are
never held twice. Directories are written to a temporary sibling and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from behemoth.checkpoint.convert import (
    CheckpointError,
    assemble,
    hf_source_map,
    native_to_hf_state,
    read_tensors,
    weight_files,
    write_safetensors,
)
from behemoth.config import ModelConfig, load_config_file, to_hf_config
from behemoth.model import Transformer

FORMAT = "behemoth"
FORMAT_VERSION = 1


def detect_format(directory: Path) -> str:
    """'native' or 'hf', from config.json; raises `CheckpointError` for anything else."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a checkpoint directory needs config.json)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if d.get("format") == FORMAT:
        return "native"
    if d.get("model_type") in ("llama4", "llama4_text"):
        return "hf"
    raise CheckpointError(f"{cfg_file}: model_type={d.get('model_type')!r} is not a Llama 4 checkpoint")


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Transformer:
    """Load a native or transformers directory into a `Transformer` (eval mode).

    `dtype=None` keeps the stored dtype. Missing, unexpected or mis-shaped tensors, truncated files
    and missing index entries raise `CheckpointError` naming the file and key.
    """
    directory = Path(path)
    fmt = detect_format(directory)
    try:
        cfg = load_config_file(directory / "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    files, index_file = weight_files(directory)
    if fmt == "native":
        sources = {k: [k] for k in files}
    else:
        raw = json.loads((directory / "config.json").read_text())
        prefix = "language_model." if raw.get("model_type") == "llama4" else ""
        sources = hf_source_map(files, prefix, index_file)
        if cfg.tie_word_embeddings:
            sources.pop("output.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for k in expected:
        if k not in sources:
            raise CheckpointError(f"{index_file}: missing tensor for {k!r}")
    for k in sources:
        if k not in expected:
            raise CheckpointError(f"{index_file}: unexpected tensor {sources[k][0]!r}")
    needed = [hk for k in expected for hk in sources[k]]
    raw_tensors = dict(read_tensors(files, needed))
    state = {}
    for k, shape in expected.items():
        t = assemble(k, [raw_tensors.pop(hk) for hk in sources[k]])
        if t.shape != shape:
            raise CheckpointError(f"{files[sources[k][0]]}: tensor {sources[k][0]!r} has shape "
                                  f"{list(t.shape)}, expected {list(shape)}")
        state[k] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model, torch.device(device))
    return model.eval()


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (routing counters) are not in checkpoints: create them as zeros."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device),
                                       persistent=name not in module._non_persistent_buffers_set)


def _write_atomically(directory: Path, write) -> Path:
    """Run `write(tmp_dir)` into a temporary sibling, then rename it to `directory`."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory}: already exists and is not empty; refusing to overwrite")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if directory.exists():
            directory.rmdir()
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _meta(cfg: ModelConfig, state: dict[str, torch.Tensor], **extra) -> dict:
    from behemoth import __version__

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "behemoth_version": __version__,
            "torch_version": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "dtypes": dtypes, "total_params": cfg.num_params(), "active_params": cfg.num_active_params(), **extra}


def save_model(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None, **meta) -> Path:
    """Write a native checkpoint directory (config.json + safetensors + meta.json), atomically."""
    cfg = model.config
    state = model.state_dict()

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2))
        write_safetensors(state, tmp, max_shard_bytes)
        (tmp / "meta.json").write_text(json.dumps(_meta(cfg, state, **meta), indent=2))

    return _write_atomically(Path(directory), write)


def export_hf(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write a transformers `Llama4ForCausalLM` directory (config.json + safetensors), atomically."""
    cfg = model.config
    hf_config = to_hf_config(cfg)  # raises ValueError for what transformers cannot express
    state = native_to_hf_state(model.state_dict())
    dtypes = {t.dtype for t in state.values()}
    hf_config["dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_safetensors(state, tmp, max_shard_bytes)

    return _write_atomically(Path(directory), write)

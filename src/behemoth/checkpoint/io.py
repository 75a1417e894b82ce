"""Model directories on disk: load (native or transformers), save native, export to transformers.

A native directory describes itself: `config.json` ({"format": "behemoth", "model": {...}}),
`model.safetensors` (or shards + index) with Meta-style names, and `meta.json`. A transformers
directory is whatever `save_pretrained` wrote for `Llama4ForCausalLM` or
`Llama4ForConditionalGeneration` (text model, vision tower and projector).

Loading builds the model on the meta device and assigns the read tensors into it, so weights are
never held twice. Directories are written to a temporary sibling and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

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
from behemoth.config import ModelConfig, load_config_file, to_hf_config
from behemoth.fsutil import fsync_path
from behemoth.model import Transformer

FORMAT = "behemoth"
FORMAT_VERSION = 1


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
    raise CheckpointError(f"{cfg_file}: model_type={d.get('model_type')!r} is not a Llama 4 checkpoint")


def detect_format(directory: Path) -> str:
    """'native' or 'hf', from config.json; raises `CheckpointError` for anything else."""
    directory = Path(directory)
    return _format_of(_read_config(directory), directory / "config.json")


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Transformer:
    """Load a native or transformers directory into a `Transformer` (eval mode).

    `dtype=None` keeps the stored dtype. Missing, unexpected or mis-shaped tensors, truncated files
    and missing index entries raise `CheckpointError` naming the file and key. Tensors are read one
    file at a time and each is converted (dtype, device) as soon as it is complete, so the model's
    weights are never held twice; only safetensors files are read (nothing is unpickled).
    `device="meta"` gives the model's structure from config.json alone (no weight is read).
    """
    directory = Path(path)
    raw = _read_config(directory)
    fmt = _format_of(raw, directory / "config.json")
    try:
        cfg = load_config_file(directory / "config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return Transformer(cfg).eval()
    if fmt == "native" and sharded_model_files(directory):
        return _load_sharded(directory, cfg, dtype, device)
    files, index_file = weight_files(directory)
    prefix = ""
    if fmt == "native":
        sources = {k: [k] for k in files}
    else:
        prefix = "language_model." if raw.get("model_type") == "llama4" else ""
        sources = hf_source_map(files, prefix, index_file)
        if cfg.tie_word_embeddings:
            sources.pop("output.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
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
            state[k] = full.to(device=device, dtype=dtype or full.dtype)
    fill_dtype = dtype or next(iter(state.values())).dtype  # absent routing biases: zeros, like the weights
    for k, shape in absent_ok.items():
        state[k] = torch.zeros(shape, device=device, dtype=fill_dtype)
    model.load_state_dict(state, assign=True, strict=True)
    _materialize_buffers(model, torch.device(device))
    return model.eval()


def read_dcp(state: dict, path: Path, alone: bool = False) -> None:
    """`torch.distributed.checkpoint.load` of the files in `path` into `state` (by every rank of the process
    group, or with `alone` by this process by itself). Missing or corrupt files, or tensors that do not fit
    `state`, raise one `CheckpointError` naming `path` and the first cause."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(path), no_dist=alone or not _joined())
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error (a BaseException)
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        first = str(cause).splitlines()[0][:200] if str(cause) else ""
        raise CheckpointError(f"{path}: cannot be read into this config ({type(cause).__name__}: {first})") from None


def _load_sharded(directory: Path, cfg: ModelConfig, dtype: torch.dtype | None, device) -> Transformer:
    """A `save_sharded_model` directory, read in one process whatever world size wrote it (DCP reshards)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: torch.empty(v.shape, dtype=torch.float32, device=device) for k, v in model.state_dict().items()}
    read_dcp(state, directory / SHARDED_DIR, alone=True)  # whole, in this process
    if dtype is not None:
        state = {k: t.to(dtype) for k, t in state.items()}
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
    """Run `write(tmp_dir)` into a temporary sibling, flush it to disk, then rename it to `directory`.

    An existing non-empty `directory` (or a file of that name) is refused and left untouched; an empty
    directory is replaced. On any failure the temporary directory is removed.
    """
    directory = Path(directory)
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: exists and is not a directory; refusing to overwrite")
        if any(directory.iterdir()):
            raise CheckpointError(f"{directory}: already exists and is not empty; refusing to overwrite")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if directory.exists():
            directory.rmdir()  # empty (checked above); raises if something appeared meanwhile
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(directory.parent)
    return directory


def _fsync_tree(directory: Path) -> None:
    """Flush every file and the directory itself, so the rename never publishes unwritten data."""
    for f in directory.iterdir():
        if f.is_file():
            fsync_path(f)
    fsync_path(directory)


def _meta(cfg: ModelConfig, state: dict[str, torch.Tensor], **extra) -> dict:
    from behemoth import __version__

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "behemoth_version": __version__,
            "torch_version": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "dtypes": dtypes, "total_params": cfg.num_params(), "active_params": cfg.num_active_params(), **extra}


def _write_model_files(model: Transformer, directory: Path, max_shard_bytes: int | None = None, **meta) -> None:
    cfg = model.config
    state = model.state_dict()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2))
    write_safetensors(state, directory, max_shard_bytes)
    (directory / "meta.json").write_text(json.dumps(_meta(cfg, state, **meta), indent=2))


def save_model(model: Transformer, directory: str | Path, max_shard_bytes: int | None = None, **meta) -> Path:
    """Write a native checkpoint directory (config.json + safetensors + meta.json), atomically."""
    return _write_atomically(Path(directory), lambda tmp: _write_model_files(model, tmp, max_shard_bytes, **meta))


SHARDED_DIR = "model.dcp"  # torch.distributed.checkpoint files of a model saved by several processes


def _dcp_files(path: Path) -> Path | None:
    """`path` when it holds `torch.distributed.checkpoint` files (their .metadata written last), else None."""
    return path if (path / ".metadata").is_file() else None


def sharded_model_files(directory: str | Path) -> Path | None:
    """`directory/model.dcp` when the directory holds a model saved by several processes, else None."""
    return _dcp_files(Path(directory) / SHARDED_DIR)


def _write_sharded_model(model: Transformer, directory: Path, rank0: bool, **meta) -> None:
    """Every rank: its shards of `model` into `directory/model.dcp`; rank 0: config.json and meta.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model)
    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(directory / SHARDED_DIR), no_dist=not _joined())
    if rank0:
        cfg = model.config
        (directory / "config.json").write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2))
        (directory / "meta.json").write_text(json.dumps(_meta(cfg, state, sharded=True, **meta), indent=2))


def _from_dcp(record: logging.LogRecord) -> bool:
    return "torch/distributed/checkpoint" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every read or write in one process, which here is the intent (reading a sharded
    checkpoint whole, resuming a distributed run in one process), and logs a traceback to the root logger
    for each metadata file it cannot read, before raising; `read_dcp` reports that failure in one line."""
    root = logging.getLogger()
    root.addFilter(_from_dcp)
    alone = r"torch\.distributed is (disabled, )?unavailable or uninitialized"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=alone)
            yield
    finally:
        root.removeFilter(_from_dcp)


def _joined() -> bool:
    """Whether this process is part of a process group (else DCP reads and writes alone)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not _joined() or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if _joined():
        dist.barrier()


def _fresh_partial(directory: Path) -> Path:
    """A temporary sibling for `directory`, emptied by rank 0; every rank returns once it is ready."""
    tmp = directory.with_name(f".{directory.name}.partial")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a torn earlier attempt
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def save_sharded_model(model: Transformer, directory: str | Path, **meta) -> Path:
    """Every rank calls this: the model's state (FSDP and expert shards as they lie) as
    `torch.distributed.checkpoint` files in `directory/model.dcp`, with config.json and meta.json from rank 0.
    `load_checkpoint` reads it in one process and DCP at any world size, so `load_model` and `convert` work
    on it. Written into a temporary sibling that rank 0 renames once every rank has finished."""
    directory = Path(directory)
    if directory.exists():
        raise CheckpointError(f"{directory}: already exists")
    tmp = _fresh_partial(directory)
    _write_sharded_model(model, tmp, _is_rank0(), **meta)
    _barrier()
    if _is_rank0():
        _fsync_tree(tmp)
        os.replace(tmp, directory)
        fsync_path(directory.parent)
    _barrier()
    return directory


# ---- training checkpoints: <run>/checkpoints/step_0000100/, with a `latest` pointer ---------------

TRAIN_STATE = "train_state.json"  # plain values; its tensors are in train_state.safetensors


def save_training_checkpoint(run_dir: str | Path, step: int, models: dict[str, Transformer], train_state: dict,
                             keep_last: int, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `checkpoints/step_{step:07d}` atomically, then move `latest` to it, then prune.

    The first model ("model") sits at the directory's root, so `load_model(step_dir)` loads it; any
    other (e.g. a codistilled teacher) in a subdirectory of its name. The optimizer, data position,
    RNG and counters go to `train_state.json` + `train_state.safetensors` (nothing is pickled);
    `extra_files` (e.g. the tokenizer) are written beside every model, so each directory describes
    itself. A crash at any point leaves `latest` on a complete checkpoint.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)

    def write(tmp: Path) -> None:
        for name, model in models.items():
            target = tmp if name == "model" else tmp / name
            _write_model_files(model, target, step=step)
            for fname, data in (extra_files or {}).items():
                (target / fname).write_bytes(data)
        write_state(train_state, tmp, "train_state")

    _write_atomically(final, write)
    _publish(ckpt_root, final, keep_last)
    return final


def _publish(ckpt_root: Path, final: Path, keep_last: int) -> None:
    """Point `latest` at the complete checkpoint `final`, then prune all but the last `keep_last`."""
    pointer_tmp = ckpt_root / "latest.tmp"
    pointer_tmp.write_text(final.name)
    fsync_path(pointer_tmp)
    os.replace(pointer_tmp, ckpt_root / "latest")
    fsync_path(ckpt_root)
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


OPTIM_SHARDED_DIR = "optim.dcp"  # a distributed run's optimizer state, beside its models' model.dcp


def save_distributed_training_checkpoint(run_dir: str | Path, step: int, models: dict[str, nn.Module], optimizer,
                                         train_state: dict, keep_last: int,
                                         extra_files: dict[str, bytes] | None = None) -> Path:
    """Every rank calls this: the distributed form of `save_training_checkpoint`, the same layout with
    `torch.distributed.checkpoint` files in place of safetensors. Each model as `save_sharded_model` writes it
    (so `load_model(step_dir)` reads it in one process), the optimizer state of all models in `optim.dcp/`
    (parameters named "<model>.<parameter>"), and from rank 0 `train_state` (the trainer's state without the
    optimizer) and `extra_files`. Rank 0 renames the temporary directory once every rank has written, then
    moves `latest` and prunes. `load_optimizer_state` reads it back at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = _fresh_partial(final)
    rank0 = _is_rank0()
    for name, model in models.items():
        target = tmp if name == "model" else tmp / name
        _write_sharded_model(model, target, rank0, step=step)
        for fname, data in (extra_files or {}).items() if rank0 else ():
            (target / fname).write_bytes(data)
    optim_state = get_optimizer_state_dict(nn.ModuleDict(models), optimizer)
    with _quiet_dcp():
        dcp.save({"optimizer": optim_state}, checkpoint_id=str(tmp / OPTIM_SHARDED_DIR), no_dist=not _joined())
    if rank0:
        write_state(train_state, tmp, "train_state")
    _barrier()
    if rank0:
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (the final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _publish(ckpt_root, final, keep_last)
    _barrier()
    return final


def load_optimizer_state(models: dict[str, nn.Module], optimizer, ckpt_dir: Path, train_state: dict) -> None:
    """A training checkpoint's optimizer state into `optimizer` over `models` as they are now (one process,
    or parallelized at any world size): a distributed run's `optim.dcp/` is resharded by DCP; a one-process
    run's `train_state["optimizer"]` (indexed by parameter order) is loaded as it is into one process, and
    into parallelized models as a full state dict keyed by parameter name, from which every rank takes its
    shards. Every rank calls this."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    container = nn.ModuleDict(models)
    sharded = _dcp_files(Path(ckpt_dir) / OPTIM_SHARDED_DIR)
    if sharded is not None:
        target = {"optimizer": get_optimizer_state_dict(container, optimizer)}
        read_dcp(target, sharded)
        set_optimizer_state_dict(container, optimizer, target["optimizer"])
        return
    saved = train_state.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{ckpt_dir}: no optimizer state ({OPTIM_SHARDED_DIR}/ or train_state's)")
    if not dist.is_initialized():
        optimizer.load_state_dict(saved)
        return
    names = {id(p): n for n, p in container.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full = {"state": {fqns[int(i)]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(container, optimizer, full, options=StateDictOptions(full_state_dict=True))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory `checkpoints/latest` points to, or None when the run has no checkpoint."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    if not (target / TRAIN_STATE).is_file():
        raise CheckpointError(f"{pointer}: points to {target.name}, which is missing or incomplete")
    return target


def load_training_state(ckpt_dir: Path) -> dict:
    return read_state(Path(ckpt_dir), "train_state")


def write_state(state: dict, directory: Path, name: str) -> None:
    """A nested structure of dicts (str or int keys), lists, tuples, numbers, strings and tensors as
    `<name>.json` (the structure) + `<name>.safetensors` (the tensors). No pickle either way."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(obj, path: str):
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {"__dict__": [[k, enc(v, f"{path}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"__list__" if isinstance(obj, list) else "__tuple__": [enc(v, f"{path}.{i}")
                                                                             for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"{path}: cannot store a {type(obj).__name__} in a training state")

    structure = enc(state, "state")
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def read_state(directory: Path, name: str) -> dict:
    """Inverse of `write_state`; a missing or corrupt file raises `CheckpointError` naming it."""
    try:
        structure = json.loads((directory / f"{name}.json").read_text())
        tensors = load_file(str(directory / f"{name}.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{directory / name}.{{json,safetensors}}: unreadable training state ({e})") from None

    def dec(obj):
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__dict__" in obj:
                return {k: dec(v) for k, v in obj["__dict__"]}
            if "__list__" in obj:
                return [dec(v) for v in obj["__list__"]]
            return tuple(dec(v) for v in obj["__tuple__"])
        return obj

    return dec(structure)


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

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_safetensors(state, tmp, max_shard_bytes)

    return _write_atomically(Path(directory), write)

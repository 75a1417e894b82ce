"""Training checkpoints: `<run>/checkpoints/step_NNNNNNN/` with a `latest` pointer (see `locate`).

A step directory is a model directory (the trained model at its root, so `load_model(step_dir)` loads
it; any other trained model, e.g. a codistilled teacher, in a subdirectory of its name) plus the
trainer's state: `train_state.json` + `train_state.safetensors` (optimizer, data position, RNG,
counters; nothing is pickled). A distributed run writes the same layout with torch.distributed.checkpoint
files in place of safetensors (`model.dcp/` per model, `optim.dcp/` for the optimizer). Either kind
resumes at any world size.

Checkpoints are written into a temporary directory and renamed; `latest` moves only after that, and
pruning comes last, so a crash at any point leaves `latest` on a complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from behemoth import ranks
from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.dcp import dcp_files, read_dcp, write_dcp
from behemoth.checkpoint.locate import CHECKPOINTS, LATEST, step_dir_name
from behemoth.checkpoint.model_dir import aligned, shared_partial_dir, write_model_files, write_sharded_model_files
from behemoth.fsutil import atomic_dir, publish_dir, write_file_atomically

OPTIM_SHARDED_DIR = "optim.dcp"  # a distributed run's optimizer state, beside its models' model.dcp


def _model_target(root: Path, name: str) -> Path:
    """Where trained model `name` goes in a step directory: "model" at its root, others beside it."""
    return root if name == "model" else root / name


def save_training_checkpoint(run_dir: str | Path, step: int, models: dict[str, nn.Module], train_state: dict,
                             keep_last: int, extra_files: dict[str, bytes] | None = None,
                             model_files: dict[str, dict[str, bytes]] | None = None) -> Path:
    """Write `checkpoints/step_{step:07d}` atomically (replacing a checkpoint of the same step only once the
    new one is complete), then move `latest` to it, then prune. `extra_files` (e.g. the tokenizer) are
    written beside every model, so each directory describes itself; `model_files` beside one model each (by
    its name: e.g. its model card)."""
    ckpt_root = Path(run_dir) / CHECKPOINTS
    final = ckpt_root / step_dir_name(step)
    with atomic_dir(final) as tmp:
        for name, model in models.items():
            target = _model_target(tmp, name)
            write_model_files(model, target, step=step)
            for fname, data in {**(extra_files or {}), **(model_files or {}).get(name, {})}.items():
                (target / fname).write_bytes(data)
        write_state(train_state, tmp, "train_state")
    _publish(ckpt_root, final, keep_last)
    return final


def save_distributed_training_checkpoint(run_dir: str | Path, step: int, models: dict[str, nn.Module], optimizer,
                                         train_state: dict, keep_last: int,
                                         extra_files: dict[str, bytes] | None = None,
                                         model_files: dict[str, dict[str, bytes]] | None = None) -> Path:
    """Every rank calls this: the distributed form of `save_training_checkpoint`, the same layout with DCP
    files in place of safetensors. Each model as `save_sharded_model` writes it (so `load_model(step_dir)`
    reads it in one process), the optimizer state of all models in `optim.dcp/` (parameters named
    "<model>.<parameter>"), and from rank 0 `train_state` (the trainer's state without the optimizer) and
    `extra_files`. Rank 0 renames the temporary directory once every rank has written, then moves `latest`
    and prunes. `load_optimizer_state` reads it back at any world size."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ckpt_root = Path(run_dir) / CHECKPOINTS
    final = ckpt_root / step_dir_name(step)
    tmp = shared_partial_dir(final)
    rank0 = ranks.is_rank0()
    for name, model in models.items():
        target = _model_target(tmp, name)
        write_sharded_model_files(model, target, step=step)
        files = {**(extra_files or {}), **(model_files or {}).get(name, {})}
        for fname, data in files.items() if rank0 else ():
            (target / fname).write_bytes(data)
    write_dcp({"optimizer": get_optimizer_state_dict(nn.ModuleDict(models), optimizer)}, tmp / OPTIM_SHARDED_DIR)
    if rank0:
        write_state(train_state, tmp, "train_state")
    ranks.barrier()
    if rank0:
        publish_dir(tmp, final)
        _publish(ckpt_root, final, keep_last)
    ranks.barrier()
    return final


def _publish(ckpt_root: Path, final: Path, keep_last: int) -> None:
    """Point `latest` at the complete checkpoint `final`, then prune all but the last `keep_last`."""
    write_file_atomically(ckpt_root / LATEST, final.name)
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_optimizer_state(models: dict[str, nn.Module], optimizer, ckpt_dir: Path, train_state: dict) -> None:
    """A training checkpoint's optimizer state into `optimizer` over `models` as they are now (one process,
    or parallelized at any world size): a distributed run's `optim.dcp/` is resharded by DCP; a one-process
    run's `train_state["optimizer"]` (indexed by parameter order) is loaded as it is into one process, and
    into parallelized models as a full state dict keyed by parameter name, from which every rank takes its
    shards. Every rank calls this."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    container = nn.ModuleDict(models)
    sharded = dcp_files(Path(ckpt_dir) / OPTIM_SHARDED_DIR)
    if sharded is not None:
        target = {"optimizer": get_optimizer_state_dict(container, optimizer)}
        read_dcp(target, sharded)
        set_optimizer_state_dict(container, optimizer, target["optimizer"])
        return
    saved = train_state.get("optimizer")
    if saved is None:
        raise CheckpointError(f"{ckpt_dir}: no optimizer state ({OPTIM_SHARDED_DIR}/ or train_state's)")
    if not ranks.joined():
        optimizer.load_state_dict(saved)
        return
    names = {id(p): n for n, p in container.named_parameters()}
    fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    full = {"state": {fqns[int(i)]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(container, optimizer, full, options=StateDictOptions(full_state_dict=True))


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
        with safe_open(str(directory / f"{name}.safetensors"), framework="pt") as f:
            tensors = {k: aligned(f.get_tensor(k)) for k in f.keys()}  # bitwise resume: see `aligned`
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

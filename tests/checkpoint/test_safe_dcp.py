"""Reading DCP files runs no code from them: real model and optimizer states load back equal through
`safe_reader`; a `.metadata` naming any global beyond the metadata classes, one that alters those classes,
or a damaged one is a one-line `CheckpointError` naming the file; non-tensor entries are plain data only."""

from __future__ import annotations

import io
import os
import pickle
import shlex
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import behemoth
from behemoth.checkpoint import CheckpointError
from behemoth.checkpoint.safe_dcp import SafeFileSystemReader, safe_reader

pytestmark = pytest.mark.filterwarnings(r"ignore:torch\.distributed is (disabled, )?unavailable or uninitialized")


class RunsShell:
    """Unpickles as `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsPython:
    """Unpickles as `exec(source)`."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return exec, (self.source,)


def payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """Objects whose unpickling would create `marker`, each with the global it names."""
    return {"os.system": (RunsShell(f"touch {shlex.quote(str(marker))}"), f"{os.system.__module__}.system"),
            "exec": (RunsPython(f"open({str(marker)!r}, 'w').close()"), "builtins.exec")}


def optimizer_after_a_step(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.95), weight_decay=0.05)
    opt.step()
    return opt


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """As a distributed training checkpoint saves it: all models' optimizer state, keyed by parameter name."""
    return {"optimizer": get_optimizer_state_dict(nn.ModuleDict({"model": model}), opt)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A debug model's state and its AdamW state after one step, each saved by DCP in one process."""
    root = tmp_path_factory.mktemp("dcp")
    model = behemoth.build_model("debug", seed=0)
    model_state = {k: v.detach().clone() for k, v in get_model_state_dict(model).items()}
    opt_state = optimizer_state(model, optimizer_after_a_step(model, lr=3e-4))
    dcp.save(model_state, checkpoint_id=str(root / "model.dcp"), no_dist=True)
    dcp.save(opt_state, checkpoint_id=str(root / "optim.dcp"), no_dist=True)
    return {"model": (model_state, root / "model.dcp"), "optim": (opt_state, root / "optim.dcp")}


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_equal(a, b, where: str = "") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def one_line_error(excinfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, msg
    return msg


# ---- real states load back equal


def test_model_state_loads_back_equal(saved):
    state, path = saved["model"]
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=safe_reader(path), no_dist=True)
    assert_equal(target, state)


def test_optimizer_state_loads_back_equal(saved):
    state, path = saved["optim"]
    model = behemoth.build_model("debug", seed=1)
    target = optimizer_state(model, optimizer_after_a_step(model, lr=1.0))  # other values, same structure
    dcp.load(target, storage_reader=safe_reader(path), no_dist=True)
    assert_equal(target, state)
    assert target["optimizer"]["param_groups"][0]["lr"] == 3e-4


def test_which_entries_are_pickled_bytes(saved):
    """Model weights and optimizer moments and steps are tensors; only the optimizer's param_groups values
    (lr, betas, ..., parameter names) are stored as pickled bytes, which the reader admits as plain data."""
    kinds = {}
    for name in ("model", "optim"):
        md = FileSystemReader(saved[name][1]).read_metadata()  # our own files: trusted here
        kinds[name] = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    assert kinds["model"] == set()
    assert kinds["optim"] and all(k.startswith("optimizer.param_groups.") for k in kinds["optim"])
    assert "optimizer.param_groups.0.lr" in kinds["optim"]
    assert not any(k.endswith(".step") for k in kinds["optim"])


def test_parent_reader_state_is_mirrored(saved):
    _, path = saved["model"]
    ours, theirs = safe_reader(path), FileSystemReader(path)
    a, b = ours.read_metadata(), theirs.read_metadata()
    assert a.state_dict_metadata == b.state_dict_metadata and a.storage_data == b.storage_data
    assert a.planner_data == b.planner_data
    assert a.storage_meta.load_id == ours.load_id
    assert ours.read_metadata() == a  # read again from the file once the vetted copy is handed out
    ours.set_up_storage_reader(a, True)
    assert ours.storage_data == b.storage_data


# ---- code in .metadata never runs


@pytest.mark.parametrize("kind", ["os.system", "exec"])
def test_metadata_that_runs_code_is_refused(tmp_path, kind):
    marker = tmp_path / "ran"
    payload, global_name = payloads(marker)[kind]
    ckpt = tmp_path / "evil.dcp"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as excinfo:
        safe_reader(ckpt)
    one_line_error(excinfo, str(ckpt / ".metadata"), global_name)
    with pytest.raises(CheckpointError):
        SafeFileSystemReader(ckpt).read_metadata()
    with pytest.raises((CheckpointException, Exception)):  # DCP reports it as "metadata is None"
        dcp.load({}, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    assert not marker.exists()


def test_code_inside_real_metadata_is_refused(saved, tmp_path):
    marker = tmp_path / "ran"
    payload, global_name = payloads(marker)["os.system"]
    ckpt = copy_dir(saved["model"][1], tmp_path / "model.dcp")
    md = FileSystemReader(ckpt).read_metadata()
    md.planner_data = {"tok_embeddings.weight": payload}
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError) as excinfo:
        safe_reader(ckpt)
    one_line_error(excinfo, str(ckpt / ".metadata"), global_name)
    assert not marker.exists()


def stack_global(module: str, name: str) -> bytes:
    """Protocol-4 opcodes that push the global `module.name`."""
    return b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name)) + b"\x93"


def test_dotted_names_past_an_allowed_class_are_refused(tmp_path):
    ckpt = tmp_path / "evil.dcp"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(b"\x80\x04" + stack_global(Metadata.__module__, "Metadata.__init__") + b".")
    with pytest.raises(CheckpointError) as excinfo:
        safe_reader(ckpt)
    one_line_error(excinfo, "Metadata.__init__")


def test_metadata_that_alters_a_class_is_refused_and_undone(tmp_path):
    """BUILD on a class object sets class attributes: refused, and the class is left as it was."""
    ckpt = tmp_path / "evil.dcp"
    ckpt.mkdir()
    value = b"\x8c\x06poison"
    state = b"N}\x8c\x0cplanner_data" + value + b"s\x86"  # (None, {"planner_data": "poison"})
    (ckpt / ".metadata").write_bytes(b"\x80\x04" + stack_global(Metadata.__module__, "Metadata") + state + b"b.")
    with pytest.raises(CheckpointError) as excinfo:
        safe_reader(ckpt)
    one_line_error(excinfo, str(ckpt / ".metadata"), "Metadata")
    assert Metadata.planner_data is None


# ---- damaged .metadata


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not metadata"])
def test_damaged_metadata_is_one_line_error(saved, tmp_path, damage):
    ckpt = copy_dir(saved["model"][1], tmp_path / "model.dcp")
    data = (ckpt / ".metadata").read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"\x80\x04not a pickle at all" + os.urandom(64),
               "empty": b"", "not metadata": pickle.dumps({"a": [1, 2.0]})}[damage]
    (ckpt / ".metadata").write_bytes(damaged)
    with pytest.raises(CheckpointError) as excinfo:
        safe_reader(ckpt)
    one_line_error(excinfo, str(ckpt / ".metadata"))


def test_data_file_outside_the_directory_is_refused(saved, tmp_path):
    ckpt = copy_dir(saved["model"][1], tmp_path / "model.dcp")
    md = FileSystemReader(ckpt).read_metadata()
    index = next(iter(md.storage_data))
    md.storage_data[index] = _StorageInfo("../elsewhere.distcp", 0, 8)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError) as excinfo:
        safe_reader(ckpt)
    one_line_error(excinfo, str(ckpt / ".metadata"), "elsewhere.distcp")


# ---- data files: non-tensor entries are plain data, tensors are read as weights only


def with_entry_replaced(src: Path, dst: Path, fqn: str, blob: bytes) -> Path:
    """A copy of the DCP directory `src` whose entry `fqn` is read from a new data file holding `blob`."""
    ckpt = copy_dir(src, dst)
    (ckpt / "replaced.distcp").write_bytes(blob)
    md = FileSystemReader(ckpt).read_metadata()
    (index,) = [i for i in md.storage_data if i.fqn == fqn]
    md.storage_data[index] = _StorageInfo("replaced.distcp", 0, len(blob))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    return ckpt


def failure_of(excinfo) -> BaseException:
    e = excinfo.value
    return next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e


def test_pickled_entry_that_runs_code_is_refused(saved, tmp_path):
    marker = tmp_path / "ran"
    payload, global_name = payloads(marker)["os.system"]
    blob = io.BytesIO()
    torch.save(payload, blob)
    state, path = saved["optim"]
    ckpt = with_entry_replaced(path, tmp_path / "optim.dcp", "optimizer.param_groups.0.lr", blob.getvalue())
    model = behemoth.build_model("debug", seed=1)
    target = optimizer_state(model, optimizer_after_a_step(model, lr=1.0))
    with pytest.raises((CheckpointError, CheckpointException)) as excinfo:
        dcp.load(target, storage_reader=safe_reader(ckpt), no_dist=True)
    cause = failure_of(excinfo)
    assert isinstance(cause, CheckpointError)
    msg = str(cause)
    assert "\n" not in msg and str(ckpt / "replaced.distcp") in msg and "optimizer.param_groups.0.lr" in msg
    assert global_name in msg
    assert not marker.exists()


def test_tensor_entry_that_runs_code_is_refused(saved, tmp_path):
    marker = tmp_path / "ran"
    payload, _ = payloads(marker)["os.system"]
    blob = io.BytesIO()
    torch.save(payload, blob)
    state, path = saved["model"]
    ckpt = with_entry_replaced(path, tmp_path / "model.dcp", "norm.weight", blob.getvalue())
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises((CheckpointException, Exception)):
        dcp.load(target, storage_reader=safe_reader(ckpt), no_dist=True)
    assert not marker.exists()


def test_hand_written_opcodes_are_valid_pickles():
    """The opcodes the tests above write by hand do what they say when pickle itself reads them."""
    assert pickle.loads(b"\x80\x04" + stack_global("collections", "OrderedDict") + b".") is OrderedDict

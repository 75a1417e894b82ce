"""torch.distributed.checkpoint (DCP) files: what a model or optimizer saved by several processes is.

One read and one write, used by model directories (`model.dcp/`), training checkpoints (`optim.dcp/`) and
the sharded loading of a parallelized model. Reading never runs code from the files: the `.metadata`
pickle goes through a restricted unpickler (`safe_dcp`). DCP warns on every read or write in one process
(here the intent: a sharded checkpoint read whole, a distributed run resumed alone) and logs a traceback
for each file it cannot read before raising; both are silenced, and a failure is one `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from torch import nn

from behemoth import ranks
from behemoth.checkpoint.convert import CheckpointError

METADATA = ".metadata"  # written last by DCP: its presence marks the files complete


def dcp_files(path: Path) -> Path | None:
    """`path` when it holds DCP files, else None."""
    return path if (path / METADATA).is_file() else None


def read_dcp(state: dict, path: Path, alone: bool = False) -> None:
    """DCP's `load` of the files in `path` into `state` (by every rank of the process group, or with `alone`
    by this process by itself). Missing or corrupt files, or tensors that do not fit `state`, raise one
    `CheckpointError` naming `path` and the first cause."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from behemoth.checkpoint.safe_dcp import safe_reader

    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=safe_reader(path), no_dist=alone or not ranks.joined())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's error (a BaseException)
        cause = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        if isinstance(cause, CheckpointError):
            raise cause from None
        first = str(cause).splitlines()[0][:200] if str(cause) else ""
        raise CheckpointError(f"{path}: cannot be read into this config ({type(cause).__name__}: {first})") from None


def write_dcp(state: dict, path: Path) -> None:
    """DCP's `save` of `state` into `path` (every rank its part, or this process alone without a group)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(path), no_dist=not ranks.joined())


def load_sharded_state(model: nn.Module, path: Path) -> None:
    """Every rank reads its own shards of a parallelized `model` from the DCP files in `path` (a model
    directory's `model.dcp`): no rank ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    read_dcp(state, Path(path))
    set_model_state_dict(model, state)


def _not_from_dcp(record: logging.LogRecord) -> bool:
    return "torch/distributed/checkpoint" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_dcp():
    root = logging.getLogger()
    root.addFilter(_not_from_dcp)
    alone = r"torch\.distributed is (disabled, )?unavailable or uninitialized"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=alone)
            yield
    finally:
        root.removeFilter(_not_from_dcp)

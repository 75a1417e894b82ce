"""Where models lie on disk: a run directory's checkpoints and the one resolver every command uses.

A training run directory holds `checkpoints/step_NNNNNNN/` (each a model directory plus the trainer's
state) and a `latest` pointer, moved only once the checkpoint it names is complete. Anything that names a
model (a model directory or a run directory) goes through `resolve_model_dir`.
"""

from __future__ import annotations

from pathlib import Path

from behemoth.checkpoint.convert import CheckpointError

CHECKPOINTS = "checkpoints"  # a run directory's checkpoint folder
LATEST = "latest"  # the pointer file in it: the name of the newest complete checkpoint
TRAIN_STATE = "train_state.json"  # in every training checkpoint: plain values (its tensors: train_state.safetensors)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The directory `checkpoints/latest` points to, or None when the run has no checkpoint."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    if not (target / TRAIN_STATE).is_file():
        raise CheckpointError(f"{pointer}: points to {target.name}, which is missing or incomplete")
    return target


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory `path` names: `path` itself when it holds config.json (a native, sharded or
    transformers directory, or one training checkpoint), else a run directory's latest checkpoint; anything
    else is a `CheckpointError` that says which."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such directory")
    if (p / "config.json").is_file():
        return p
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a directory")
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: neither a model directory ({p / 'config.json'} is missing) nor a run with "
                              "checkpoints")
    return latest

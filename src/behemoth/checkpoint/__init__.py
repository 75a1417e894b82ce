"""Checkpoints: format conversion (`convert`) and model directories on disk (`io`)."""

from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.io import export_hf, load_checkpoint, save_model

__all__ = ["CheckpointError", "export_hf", "load_checkpoint", "save_model"]

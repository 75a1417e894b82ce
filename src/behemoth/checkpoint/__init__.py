"""Checkpoints: format conversion (`convert`), model directories (`model_dir`), training checkpoints
(`training`), torch.distributed.checkpoint files (`dcp`), and the resolver of model paths (`locate`)."""

from behemoth.checkpoint.convert import CheckpointError
from behemoth.checkpoint.locate import latest_checkpoint, resolve_model_dir
from behemoth.checkpoint.model_dir import export_hf, load_model, save_model

__all__ = ["CheckpointError", "export_hf", "latest_checkpoint", "load_model", "resolve_model_dir", "save_model"]

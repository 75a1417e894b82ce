"""behemoth: the Llama 4 model family (Behemoth teacher, Maverick and Scout students) in PyTorch.

The package face: it only re-exports what users reach for first.
"""

from behemoth.checkpoint.model_dir import load_model
from behemoth.config import PRESETS, ModelConfig, MoEConfig, RopeScaling, get_preset
from behemoth.model import Transformer, build_model
from behemoth.version import __version__

__all__ = ["PRESETS", "ModelConfig", "MoEConfig", "RopeScaling", "Transformer", "build_model",
           "get_preset", "load_model", "__version__"]

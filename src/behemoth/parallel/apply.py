"""Wrap a model's blocks after construction; parameter names (and so checkpoints) do not change.

Order: activation checkpointing first, then compile (the compiled function includes the
checkpointed region's recomputation).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (memory for compute).

    Routing counters are then counted twice per step (forward and recomputation); the bias update
    uses only their signs relative to the mean and the health stats only shares, so both are
    unaffected.
    """
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block in place (same module tree, same state-dict keys)."""
    for block in model.layers:
        block.compile()
    return model

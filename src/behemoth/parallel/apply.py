"""Wrap a model's blocks after construction; parameter names (and so checkpoints) do not change.

Order: activation checkpointing first, then compile, so that torch.compile sees each block's
checkpoint call. Where it can trace the whole block (a dense block) the compiler plans the
recomputation itself; an MoE layer's routing records are writes to module attributes, which it does not
trace inside a checkpointed region, so there the checkpoint call runs eagerly, recomputation included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from behemoth.model.moe import MoE, prepare_expert_kernels


@contextmanager
def _routing_not_recorded(block: nn.Module) -> Iterator[None]:
    """Turn off `record_routing` on the block's MoE layers while inside; the previous values come back on
    exit, also when checkpoint's early stop ends the recomputation with an exception."""
    moes = [m for m in block.modules() if isinstance(m, MoE)]
    saved = [m.record_routing for m in moes]
    for m in moes:
        m.record_routing = False
    try:
        yield
    finally:
        for m, on in zip(moes, saved, strict=True):
            m.record_routing = on


def _recompute(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy that recomputes every op: plain activation checkpointing."""
    return CheckpointPolicy.PREFER_RECOMPUTE


def _moe_checkpoint_contexts(block: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    """`context_fn` for a block holding MoE layers: (around the forward, around the recomputation).

    Eager: nothing around the forward, routing records off in the recomputation, which would otherwise
    count every routed token a second time. While torch.compile traces the block (it then runs the
    attribute writes once, in the forward), checkpoint accepts only dispatch-mode contexts: those of
    recompute-everything selective checkpointing, what torch.compile uses for a checkpoint without
    `context_fn`.
    """
    if torch.compiler.is_compiling():
        return create_selective_checkpoint_contexts(_recompute)
    return nullcontext(), _routing_not_recorded(block)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (memory for compute).

    The recomputation is a second forward of the block; in a block with MoE layers it runs with their
    `record_routing` off, so `tokens_per_expert` counts each routed token once per forward and
    `last_router_logits` / `last_expert_ids` keep the forward's routing, as without checkpointing.
    """
    for block in model.layers:
        if any(isinstance(m, MoE) for m in block.modules()):
            contexts = partial(_moe_checkpoint_contexts, block)

            def forward(*args, _inner=block.forward, _contexts=contexts, **kwargs):
                return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, context_fn=_contexts,
                                                         **kwargs)
        else:
            def forward(*args, _inner=block.forward, **kwargs):
                return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


def apply_compile(model: nn.Module, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """torch.compile each block in place (same module tree, same state-dict keys).

    The experts' kernel for `dtype` (the run's autocast dtype; default the weights') on `device` (default the
    weights') is decided first, eagerly (`model.moe.prepare_expert_kernels`): a compiled block only reads the
    decision. The per-expert loop reads its counts as unbacked sizes, which needs dynamo's
    `capture_scalar_outputs` (as torchtitan sets for its MoE); without it every MoE layer would break the graph.
    """
    p = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    if device.type != "meta":
        prepare_expert_kernels(device, dtype or (p.dtype if p is not None else torch.float32))
    torch._dynamo.config.capture_scalar_outputs = True
    for block in model.layers:
        block.compile()
    return model

"""Activation checkpointing and compile applied to a built model: a training forward + backward gives the
same gradients and the same routing records as the plain model (the recomputation in backward records
nothing)."""

from __future__ import annotations

import pytest
import torch

from behemoth import build_model
from behemoth.config import MoEConfig, get_preset
from behemoth.model.moe import MoE
from behemoth.parallel import apply_activation_checkpointing, apply_compile

# the debug preset with top-2 routing over 8 experts, so that every layer's counts are spread out
CONFIG = get_preset("debug").replace(moe=MoEConfig(num_experts=8, top_k=2, expert_dim=64, interleave_step=2))
IDS = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))


def train_step(checkpointing: bool = False, compile: bool = False) -> tuple[list[torch.Tensor], dict]:
    """One forward + backward on `IDS`; the MoE layers' `tokens_per_expert` [E] each and the gradients."""
    model = build_model(CONFIG, seed=0).train()
    if checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    model(IDS).square().mean().backward()
    assert all(m.last_router_logits is not None for m in moes)
    return [m.tokens_per_expert.clone() for m in moes], {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def plain():
    return train_step()


def test_plain_counts_are_each_routed_slot_once(plain):
    counts, _ = plain
    assert len(counts) == 2
    for c in counts:
        assert c.sum().item() == IDS.numel() * CONFIG.moe.top_k
        assert (c > 0).sum().item() > 1


def test_checkpointing_keeps_routing_counts_and_gradients(plain):
    counts, grads = train_step(checkpointing=True)
    for got, want in zip(counts, plain[0], strict=True):
        assert torch.equal(got, want)
    for name, g in grads.items():
        assert torch.equal(g, plain[1][name]), name


def test_checkpointing_recomputation_leaves_last_routing_alone():
    """The router losses read `last_router_logits` after forward and clear it; backward's recomputation
    must not set it again (it would hold a recomputed [T, E] tensor and its graph until the next step)."""
    model = apply_activation_checkpointing(build_model(CONFIG, seed=0).train())
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    out = model(IDS)
    for m in moes:
        m.last_router_logits = m.last_expert_ids = None
    out.square().mean().backward()
    assert all(m.last_router_logits is None and m.last_expert_ids is None for m in moes)
    assert all(m.record_routing for m in moes)  # restored after the recomputation


def check_compiled(plain) -> None:
    torch._dynamo.reset()
    try:
        counts, grads = train_step(checkpointing=True, compile=True)
    finally:
        torch._dynamo.reset()
    for got, want in zip(counts, plain[0], strict=True):
        assert torch.equal(got, want)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointing_then_compile_keeps_routing_counts(plain, monkeypatch):
    """`apply_compile` after `apply_activation_checkpointing`, as in training, with the aot_eager backend:
    TorchDynamo and AOTAutograd, which handle the checkpoint call, without Inductor's code generation."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    check_compiled(plain)


@pytest.mark.slow
def test_checkpointing_then_inductor_compile_keeps_routing_counts(plain):
    """The same with the default Inductor backend (about 50 s on 2 CPU cores with a cold compile cache)."""
    check_compiled(plain)

"""FSDP2 under bf16: parameters gathered in bf16 for the forward, gradients reduced in fp32 into fp32 master weights
(`parallel.distributed.mixed_precision`). One gloo process in this test process (a world of one still all-gathers
and reduce-scatters through FSDP's code path)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from behemoth import build_model
from behemoth.config import MoEConfig, get_preset
from behemoth.parallel.distributed import mixed_precision, parallelize

CONFIG = get_preset("debug").replace(moe=MoEConfig(num_experts=4, top_k=1, expert_dim=32, interleave_step=2))


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_policy_follows_the_run_precision():
    bf16 = mixed_precision(torch.bfloat16)
    assert (bf16.param_dtype, bf16.reduce_dtype, bf16.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
    fp32 = mixed_precision(None)
    assert fp32.param_dtype is None and fp32.reduce_dtype is None


def test_bf16_run_gathers_bf16_and_keeps_fp32_masters(one_process_group):
    model = parallelize(build_model(CONFIG, seed=0).train(), world=1, compute_dtype=torch.bfloat16)
    seen = {}

    def record(name):
        def hook(mod, args):
            seen.setdefault(name, mod.weight.dtype)

        return hook

    block = model.layers[0]
    block.attention.wq.register_forward_pre_hook(record("wq"))
    model.tok_embeddings.register_forward_pre_hook(record("embeddings"))
    model.layers[1].feed_forward.router.register_forward_pre_hook(record("router"))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    out.float().square().mean().backward()
    # the blocks gathered in bf16; the root (embeddings, norm, head) in fp32, so the residual stream starts in fp32
    assert seen == {"wq": torch.bfloat16, "router": torch.bfloat16, "embeddings": torch.float32}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name  # the sharded master weights
        assert p.grad is not None and p.grad.dtype == torch.float32, name
    # nor is it cast to bf16 between blocks (cast_forward_inputs=False): a block's input stays fp32
    dtypes = []
    model.layers[1].register_forward_pre_hook(lambda mod, args: dtypes.append(args[0].dtype) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert dtypes == [torch.float32]

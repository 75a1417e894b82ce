"""CUDA paths (skipped without a GPU): the model and the grouped-GEMM MoE agree with the CPU / loop."""

from __future__ import annotations

import pytest
import torch

from behemoth import build_model
from behemoth.config import PRESETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_forward_matches_cpu_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model("debug").eval()
    ids = torch.randint(0, 256, (2, 80))
    with torch.no_grad():
        ref = model(ids)
        out = model.cuda()(ids.cuda()).cpu()
    assert (ref - out).abs().max().item() < 1e-4


def test_cuda_bf16_grouped_moe_matches_loop():
    cfg = PRESETS["debug"].replace(dim=256, head_dim=64, moe={"num_experts": 8, "expert_dim": 512})
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16)
    moe = model.layers[1].feed_forward
    x = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = moe(x)
    out.float().square().mean().backward()
    g = x.grad.clone()
    x.grad = None
    moe.use_loop = True
    ref = moe(x)
    ref.float().square().mean().backward()
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad, g, atol=2e-2, rtol=2e-2)


def test_cuda_cached_generation_eager_and_compiled():
    """Cached greedy decoding on CUDA (fp32) equals the CPU tokens; the compiled step (CUDA graphs)
    gives the same tokens as the eager one."""
    from behemoth.inference.generate import generate

    torch.backends.cuda.matmul.allow_tf32 = False
    model = build_model("debug").eval()
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 40)]
    ref = generate(model, prompts, max_new_tokens=30)
    model.cuda()
    assert generate(model, prompts, max_new_tokens=30) == ref
    assert generate(model, prompts, max_new_tokens=30, compile=True) == ref

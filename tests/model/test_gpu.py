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


def _packed(vocab: int, device: str):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 256), generator=gen)
    pos = torch.tensor([list(range(100)) + list(range(156)), list(range(250)) + [-1] * 6])
    seg = torch.tensor([[0] * 100 + [1] * 156, [0] * 250 + [1] * 6])
    return ids.to(device), pos.to(device), seg.to(device)


def test_cuda_flex_attention_matches_dense_mask_with_gradients():
    """Training's attention on a GPU (FlexAttention, compiled; causal + document + chunk block mask) against the
    dense-mask SDPA reference, fp32, forward and backward."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = PRESETS["debug"].replace(n_heads=8, n_kv_heads=2, attention_chunk_size=64)
    out, grads = {}, {}
    for impl in ("sdpa", "flex"):
        model = build_model(cfg, device="cuda", seed=0).train()
        model.attention_impl = impl
        ids, pos, seg = _packed(cfg.vocab_size, "cuda")
        logits = model(ids, pos, seg)
        logits.square().mean().backward()
        out[impl] = logits.detach()[pos >= 0]
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(out["flex"], out["sdpa"], rtol=1e-4, atol=1e-4)
    for name, g in grads["flex"].items():
        torch.testing.assert_close(g, grads["sdpa"][name], rtol=1e-3, atol=1e-5, msg=name)


def test_cuda_bf16_paths_take_fused_kernels():
    """A bf16-autocast training step and a bf16 cached generation run with SDPA's math kernel forbidden (flash and
    memory-efficient only), and the experts ran the grouped GEMM exactly where it is fast (sm90 / sm100)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from behemoth.inference.generate import generate
    from behemoth.model.moe import FAST_CAPABILITIES, prepare_expert_kernels

    cfg = PRESETS["debug"].replace(dim=256, head_dim=64, n_heads=8, n_kv_heads=2, attention_chunk_size=64,
                                   moe={"num_experts": 8, "expert_dim": 512})
    model = build_model(cfg, device="cuda", seed=0).train()  # fp32 master weights
    fast = prepare_expert_kernels("cuda", torch.bfloat16)
    assert fast == (torch.cuda.get_device_capability()[0] in FAST_CAPABILITIES)
    ids, pos, seg = _packed(cfg.vocab_size, "cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, pos, seg).float().square().mean().backward()
        kernels = {m.experts.kernel for m in model.modules() if hasattr(m, "experts")}
        assert kernels == {"grouped" if fast else "loop"}
        model = model.to(torch.bfloat16).eval()
        prompts = [list(range(5, 40)), list(range(7, 12))]
        assert len(generate(model, prompts, max_new_tokens=16)[0]) == 16


def test_cuda_training_micro_batch_barely_reads_the_device():
    """A bf16 training micro-batch (`PretrainStep.forward_backward`: forward, losses, backward) on a GPU reads the
    device at most twice where the grouped GEMM runs (sync debug mode counts each read); the trainer then reads a
    whole step's figures once.
    Before, every micro-batch read it for each loss, the labelled count and the non-finite check."""
    import warnings

    from behemoth.data.loader import Batch
    from behemoth.model.moe import prepare_expert_kernels
    from behemoth.train.config import RouterSection
    from behemoth.train.steps import PretrainStep

    cfg = PRESETS["debug"].replace(dim=256, head_dim=64, n_heads=8, n_kv_heads=2, attention_chunk_size=64,
                                   moe={"num_experts": 8, "expert_dim": 512})
    model = build_model(cfg, device="cuda", seed=0).train()
    fast = prepare_expert_kernels("cuda", torch.bfloat16)
    # where the grouped GEMM is not fast, the per-expert loop reads its counts once per MoE layer
    limit = 2 + (0 if fast else sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)))
    ids, pos, seg = _packed(cfg.vocab_size, "cpu")
    batch = Batch(ids, torch.roll(ids, -1, 1), pos, seg)
    step = PretrainStep(model, RouterSection(), torch.bfloat16)
    step.forward_backward(batch.to("cuda"), 1.0)  # warm-up: kernels compiled, caches filled
    on_device = batch.to("cuda")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step.forward_backward(on_device, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    reads = [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message)]
    assert len(reads) <= limit, reads

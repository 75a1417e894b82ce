"""The attention kernels `model.attention.attend` chooses, against the dense-mask SDPA reference (CPU, fp32):
FlexAttention's block mask (causal, same document, same chunk, padding), `is_causal` with no mask, and the query
groups folded into the length for a dense mask with fewer KV heads (decode)."""

from __future__ import annotations

import pytest
import torch

from behemoth import build_model
from behemoth.config import get_preset
from behemoth.inference.generate import generate
from behemoth.model import attention as attention_module
from behemoth.model.attention import AttnMask, attend, attention_mask, flex_available

# GQA (4 query heads per KV head) and chunks of 8 tokens, so that chunk boundaries fall inside documents
CONFIG = get_preset("debug").replace(n_heads=8, n_kv_heads=2, attention_chunk_size=8)
needs_flex = pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # CPU: unfused, exact


def packed_batch(seed: int = 0):
    """ids [2, 24]; positions restarting per document with 3 padding tokens (-1) at the end of row 1; segments."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CONFIG.vocab_size, (2, 24), generator=gen)
    pos = torch.tensor([list(range(10)) + list(range(14)), list(range(21)) + [-1] * 3])
    seg = torch.tensor([[0] * 10 + [1] * 14, [0] * 21 + [1] * 3])
    return ids, pos, seg


def logits(impl: str, *args, **kwargs) -> torch.Tensor:
    model = build_model(CONFIG, seed=0).eval()
    model.attention_impl = impl
    with torch.no_grad():
        return model(*args, **kwargs)


@needs_flex
def test_flex_block_mask_matches_dense_mask():
    """Forward only: torch's FlexAttention has no CPU backward (the GPU test compares gradients)."""
    ids, pos, seg = packed_batch()
    ref, out = logits("sdpa", ids, pos, seg), logits("flex", ids, pos, seg)
    valid = pos >= 0
    assert (out[valid] - ref[valid]).abs().max() < 2e-5
    # documents do not see each other: the second document of row 0 alone gives its logits
    alone = logits("flex", ids[:1, 10:], pos[:1, 10:], seg[:1, 10:])
    torch.testing.assert_close(out[0, 10:], alone[0], rtol=1e-5, atol=2e-5)


@needs_flex
def test_flex_is_what_a_gpu_forward_takes(monkeypatch):
    """On a GPU ("auto") a packed forward builds block masks, not dense ones; on the CPU the dense reference."""
    from behemoth.model import transformer

    made = []
    monkeypatch.setattr(transformer, "block_mask", lambda *a: made.append(a) or "block")
    model = build_model(CONFIG, seed=0)
    ids, pos, seg = packed_batch()
    cpu = model._masks(pos, seg, {True: 8, False: None}, plain=False)
    assert all(m.dense is not None for m in cpu.values()) and not made
    monkeypatch.setattr(attention_module, "flex_ok", lambda device, impl="auto": True)
    monkeypatch.setattr(transformer, "flex_ok", lambda device, impl="auto": True)
    gpu = model._masks(pos, seg, {True: 8, False: None}, plain=False)
    assert all(m.block == "block" for m in gpu.values()) and len(made) == 2


def test_plain_forward_is_causal_without_a_mask():
    """Default positions and one document: the global layers attend with `is_causal` (no mask) and the chunked
    ones too when the call is no longer than a chunk; the logits equal those of the dense masks."""
    model = build_model(CONFIG, seed=0).eval()
    ids = packed_batch()[0]
    masks = model._masks(torch.arange(24).expand(2, 24), None, {True: 8, False: None}, plain=True)
    assert masks[False] == AttnMask() and masks[True].dense is not None  # 24 tokens > one chunk of 8
    short = model._masks(torch.arange(8).expand(2, 8), None, {True: 8, False: None}, plain=True)
    assert short[True] == AttnMask() and short[False] == AttnMask()
    with torch.no_grad():
        for n in (8, 24):
            explicit = torch.arange(n).expand(2, n)  # 2-D positions: the dense-mask path
            torch.testing.assert_close(model(ids[:, :n]), model(ids[:, :n], explicit), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("S", [1, 5])
def test_folded_query_groups_match_enable_gqa(S):
    gen = torch.Generator().manual_seed(S)
    B, N, G, K, H = 2, 8, 2, 12, 16
    q, k, v = (torch.randn(B, n, s, H, generator=gen) for n, s in ((N, S), (G, K), (G, K)))
    q_pos = torch.tensor([[7 + s for s in range(S)], [3 + s for s in range(S)]])
    k_pos = torch.tensor([list(range(K)), list(range(6)) + [-1] * 6])
    mask = AttnMask(dense=attention_mask(q_pos, k_pos, 4, k_pos >= 0))
    ref = attend(q, k, v, mask, fold=False)
    torch.testing.assert_close(attend(q, k, v, mask, fold=True), ref, rtol=1e-6, atol=1e-6)


def test_decode_with_folded_groups_gives_the_same_tokens(monkeypatch):
    """Cached greedy decoding with the GPU layout (query groups folded into the length) on the CPU: same tokens."""
    model = build_model(CONFIG, seed=0).eval()
    prompts = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45], [7, 11, 15]]
    ref = generate(model, prompts, max_new_tokens=20)
    calls = []
    fold = attention_module.fold_groups
    monkeypatch.setattr(attention_module, "FOLD_DEVICES", ("cpu",))
    monkeypatch.setattr(attention_module, "fold_groups", lambda *a: calls.append(1) or fold(*a))
    assert generate(model, prompts, max_new_tokens=20) == ref
    assert calls

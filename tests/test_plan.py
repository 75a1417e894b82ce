"""`behemoth plan`: the seeds' and Meta's claims, and the arithmetic behind them checked by hand."""

from __future__ import annotations

import json

import pytest

from behemoth.cli import main
from behemoth.config import get_preset
from behemoth.inference.cache import cache_bytes
from behemoth.plan import USABLE, PlanRequest, forward_memory, memory_per_gpu, plan, step_peak, train_step_memory


def run_plan(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_maverick_serves_on_one_8x80_host_in_fp8_not_in_bf16(capsys):
    host = ["--preset", "maverick", "--mode", "serve", "--gpus", "8", "--gpu-mem-gb", "80"]
    fp8 = run_plan(capsys, *host, "--precision", "fp8")
    bf16 = run_plan(capsys, *host, "--precision", "bf16")
    assert fp8["fits"] and not bf16["fits"]
    # bf16: 2 bytes for each of 401,583,781,376 parameters over 8 GPUs
    assert bf16["memory_gb_per_gpu"]["weights"] == pytest.approx(2 * 401_583_781_376 / 8 / 1e9)
    # fp8: routed experts (24 MoE layers x 128 x 3 x 5120 x 8192) at one byte plus their scales, the rest bf16
    experts = 24 * 128 * 3 * 5120 * 8192
    scales = 24 * 128 * (2 * 8192 + 5120) * 4
    assert fp8["memory_gb_per_gpu"]["weights"] == pytest.approx(
        (experts + scales + 2 * (401_583_781_376 - experts)) / 8 / 1e9)
    assert bf16["min_gpus"] > 8 >= fp8["min_gpus"]


def test_behemoth_does_not_fit_one_host_even_in_fp8(capsys):
    p = run_plan(capsys, "--preset", "behemoth", "--mode", "serve", "--gpus", "8", "--gpu-mem-gb", "80",
                 "--precision", "fp8")
    assert not p["fits"] and p["min_gpus"] > 8
    assert p["memory_gb_per_gpu"]["weights"] > 1.9e12 / 8 / 1e9  # ~2T parameters, nearly all routed experts


def test_behemoth_pretraining_duration_by_hand(capsys):
    """Meta: FP8 on 32K GPUs at 390 TFLOP/s each, more than 30T tokens."""
    p = run_plan(capsys, "--preset", "behemoth", "--mode", "train", "--gpus", "32768", "--gpu-mem-gb", "80",
                 "--precision", "fp8", "--tflops", "390", "--tokens", "30e12", "--context", "8192")
    # 6 x 287,161,729,024 active + attention 12 x 88 layers x 128 heads x 128 dims x 8,192 keys (chunk 8,192)
    flops_per_token = 6 * 287_161_729_024 + 12 * 88 * 128 * 128 * 8192
    assert p["flops_per_token"] == flops_per_token
    seconds = 30e12 * flops_per_token / (32768 * 390e12)
    assert p["total_days"] == pytest.approx(seconds / 86400)
    assert 50.6 < p["total_days"] < 50.7  # 4.38 million seconds
    assert p["ep"] == 16 and p["fits"]
    print(f"Behemoth pre-training: {p['total_days']:.1f} days")


def test_kv_cache_of_chunked_layers_is_bounded_by_the_chunk(capsys):
    """Scout at a 1M context: 12 NoPE layers keep every token, the 36 chunked layers 8,192 each."""
    p = run_plan(capsys, "--preset", "scout", "--mode", "serve", "--gpus", "8", "--gpu-mem-gb", "80",
                 "--precision", "bf16", "--context", "1000000", "--batch", "2")
    per_token_layer = 2 * 8 * 128 * 2  # K and V, 8 KV heads of 128, bf16
    slots = 12 * 1_000_000 + 36 * 8192
    kv = 2 * (slots * per_token_layer + (1_000_000 + 8192) * 8)  # + the int64 position of each slot kind
    assert p["memory_gb_per_gpu"]["kv_cache"] == pytest.approx(kv / 8 / 1e9)


def test_training_memory_parts_and_the_minimum_gpu_count():
    cfg = get_preset("bench-1b")
    req = PlanRequest("train", gpus=4, gpu_mem_gb=24, precision="bf16", context=2048, batch=2, tflops=300)
    mem = memory_per_gpu(cfg, req, 4)
    n = cfg.num_params()
    assert mem["gradients"] == 4 * n / 4 and mem["optimizer"] == 8 * n / 4 and mem["kv_cache"] == 0
    assert mem["activations"] > cfg.n_layers * 2 * 2048 * cfg.dim * 2  # at least the blocks' checkpointed inputs
    p = plan(cfg, req, "bench-1b")
    k = p["min_gpus"]
    limit = USABLE * 24e9
    assert sum(memory_per_gpu(cfg, req, k).values()) <= limit < sum(memory_per_gpu(cfg, req, k - 1).values())
    assert p["seconds_per_step"] == pytest.approx(cfg.train_flops_per_token(2048) * 4 * 2 * 2048 / (4 * 300e12))
    # the largest frozen bf16 teacher beside it: the memory left over 2 bytes/param/GPU + two gathered 1/32 layers
    spare = limit - sum(mem.values())
    assert p["max_teacher_params"] == pytest.approx(spare / (2 / 4 + 2 * 2 / 32))
    assert plan(cfg, PlanRequest("train", gpus=1, gpu_mem_gb=1, precision="bf16", context=2048, batch=2,
                                 tflops=300))["max_teacher_params"] == 0  # nothing left


def test_text_output_and_bad_input(capsys):
    assert main(["plan", "--preset", "scout", "--mode", "serve", "--gpus", "1", "--gpu-mem-gb", "80",
                 "--precision", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "fewest GPUs that fit: 2" in out and "kv_cache" in out
    assert main(["plan", "--preset", "scout", "--mode", "serve", "--gpus", "0", "--gpu-mem-gb", "80",
                 "--precision", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "behemoth plan: error: --gpus=0: not a valid value"
    assert main(["plan", "--preset", "scout", "--mode", "fly", "--gpus", "1", "--gpu-mem-gb", "80",
                 "--precision", "fp8"]) == 2
    assert "--mode: invalid choice: 'fly'" in capsys.readouterr().err


def test_one_gpu_training_step_memory_by_hand():
    """bench-1b, 8 x 2048 tokens, fp32 master weights under bf16 autocast: parallel.py's plain process on a GPU."""
    cfg = get_preset("bench-1b")
    n, total = cfg.num_params(), cfg.param_breakdown()["total"]
    tokens, D, L = 8 * 2048, 2048, 16
    mem = train_step_memory(cfg, 8, 2048)
    assert (mem["weights"], mem["gradients"], mem["optimizer"], mem["gathered"]) == (4 * n, 4 * n, 8 * n, 0)
    assert mem["compute_copies"] == 2 * (n - total["embeddings"] - total["norms"])  # bf16 casts of every matrix
    # per token and block: residuals 2D in fp32; in bf16 norm outputs 2D, q + o (2 x 16 x 128), k + v (2 x 4 x 128),
    # and the MoE input twice (routed top-1 + shared) with gate/up/product of both experts (3 x 2 x 4096)
    block = 4 * 2 * D + 2 * (2 * D + 2 * 2048 + 2 * 512) + 2 * (2 * D + 3 * 2 * 4096)
    logits = 1024 * 32000 * 4
    assert mem["activations"] == L * tokens * block + logits
    ac = train_step_memory(cfg, 8, 2048, activation_checkpointing=True)
    assert ac["activations"] == L * tokens * D * 4 + tokens * block + logits  # fp32 block inputs + one block
    # gradients grow in the backward as the activations and casts of the same blocks go: never both whole
    assert step_peak(mem) == 12 * n + max(4 * n, mem["compute_copies"] + mem["activations"])
    assert round(step_peak(mem) / 1e9, 1) == 79.1 and round(step_peak(ac) / 1e9, 1) == 62.8
    assert step_peak(mem) < sum(mem.values())
    pure = train_step_memory(cfg, 8, 2048, weights="bf16", optimizer=False)
    assert (pure["weights"], pure["optimizer"], pure["compute_copies"]) == (2 * n, 0, 0)


def test_fsdp_step_memory_and_a_frozen_forward():
    cfg = get_preset("bench-1b")
    n = cfg.num_params()
    root = cfg.param_breakdown()["total"]["embeddings"] * 2 + cfg.dim  # untied head + final norm
    one = train_step_memory(cfg, 2, 2048, fsdp_gpus=1)
    # one rank: every block stays gathered in bf16 from its forward to its backward, the root in fp32 all step
    assert one["gathered"] == 4 * root and one["compute_copies"] == 2 * (n - root) and one["weights"] == 4 * n
    two = train_step_memory(cfg, 4, 2048, fsdp_gpus=2, ep=2)
    assert two["weights"] == 4 * n / 2 and two["optimizer"] == 8 * n / 2 and two["compute_copies"] == 0
    assert two["gathered"] > 4 * root  # + two blocks with this rank's half of the experts
    fwd = forward_memory(cfg, 8, 128, cache_len=192, logit_rows=8)
    assert fwd["weights"] == 2 * n and fwd["gradients"] == fwd["optimizer"] == 0
    assert fwd["kv_cache"] == cache_bytes(cfg, 8, 192)["total"] and step_peak(fwd) == sum(fwd.values())
    with pytest.raises(ValueError, match="weights='fp16'"):
        train_step_memory(cfg, 1, 16, weights="fp16")

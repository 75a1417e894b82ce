"""Serving time on the roofline: a decode or prefill step takes as long as the slowest of its compute, the bytes
it must read from GPU memory, and (with experts spread over GPUs) its all-to-all over the interconnect.

Decode at small batch is bound by memory: every step reads the weights it uses and the whole KV cache of every
sequence, however few tokens it makes. Per decode step of `batch` sequences at `context` tokens, spread evenly
over `gpus` GPUs (weights, cache and work; tensor and expert parallel):

  compute  = batch x forward FLOPs per token (2 x active parameters + attention over the window)
             / (gpus x sustained FLOP/s)
  memory   = (weights touched + KV cache read) / (gpus x HBM bandwidth), where the weights touched are every
             non-expert weight (attention, shared experts, dense layers, routers, norms, the output head; the
             input embedding's `batch` rows) and, per MoE layer, the routed experts the batch selects: with
             `batch x top_k` selections spread uniformly over E experts, E x (1 - (1 - k/E)^batch) of them in
             expectation (all E once the batch is large); the cache is K and V of every sequence (a chunked
             layer holds at most its chunk, a global layer all `context` tokens)
  all-to-all (gpus > 1, MoE): per MoE layer, each GPU sends the hidden states (bf16) of its share of the batch's
             `batch x top_k` expert slots to the GPUs holding those experts and receives them back, the
             (gpus - 1)/gpus of them that leave the GPU over its link: 2 x slots x D x 2 bytes x (gpus - 1) /
             gpus^2 / link bandwidth, plus the latency of the two collectives (`collective_us` each)
  step     = max(compute, memory, all-to-all); tokens/s per sequence = 1 / step, per GPU = batch / step / gpus.

Prefill of `batch` prompts of `context` tokens is the same sum with `batch x context` tokens: all experts
touched, the cache written once, and compute over the prompt (attention over half the window on average).

The bandwidths are the datasheets' peaks (a floor on the time; sustained HBM reads reach about 80-90% of it);
the FLOP rate is the caller's sustained figure (`plan --tflops`). Link bandwidth is one direction per GPU (NVLink
4: 900 GB/s bidirectional = 450 GB/s each way).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from behemoth.config import ModelConfig

BF16 = 2.0  # bytes


@dataclass(frozen=True)
class Hardware:
    """One GPU's memory bandwidth (TB/s, peak), dense peak TFLOP/s (bf16, fp8) and interconnect (GB/s each way)."""

    name: str
    hbm_tb_s: float
    bf16_tflops: float
    fp8_tflops: float
    link_gb_s: float
    collective_us: float = 10.0  # latency of one all-to-all at decode sizes (an assumption; NCCL on NVLink)


# NVIDIA's datasheets (SXM parts): H100 80 GB HBM3 3.35 TB/s, H200 141 GB HBM3e 4.8 TB/s; both 989 TFLOP/s dense
# bf16, 1,979 fp8, NVLink 4 at 900 GB/s per GPU
HARDWARE = {"h100": Hardware("H100 SXM", 3.35, 989.0, 1979.0, 450.0),
            "h200": Hardware("H200 SXM", 4.8, 989.0, 1979.0, 450.0)}


def experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts selected by `tokens` tokens of `top_k` distinct experts each, uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def _expert_bytes(cfg: ModelConfig, precision: str) -> float:
    """One routed expert's weights: bf16, or fp8 with an fp32 scale per output channel."""
    n = 3 * cfg.dim * cfg.moe.expert_dim
    return BF16 * n if precision == "bf16" else n + 4.0 * (2 * cfg.moe.expert_dim + cfg.dim)


def weight_bytes_touched(cfg: ModelConfig, tokens: float, precision: str) -> dict[str, float]:
    """Bytes of weights a forward of `tokens` tokens reads (text model only): the non-expert weights once, the
    input embedding's rows, and per MoE layer the routed experts those tokens select."""
    total = cfg.param_breakdown()["total"]
    dense = sum(v for k, v in total.items() if k not in ("routed_experts", "embeddings", "vision_tower", "projector"))
    if cfg.tie_word_embeddings:  # the head reads the embedding matrix every step (counted once, as "embeddings")
        dense += total["embeddings"]
    out = {"dense": BF16 * dense, "embedding_rows": BF16 * min(tokens, cfg.vocab_size) * cfg.dim, "experts": 0.0}
    if cfg.moe is not None and cfg.moe_layers:
        touched = experts_touched(cfg.moe.num_experts, cfg.moe.top_k, tokens)
        out["experts"] = len(cfg.moe_layers) * touched * _expert_bytes(cfg, precision)
    return out


def kv_bytes(cfg: ModelConfig, sequences: float, context: int) -> float:
    """Bytes of K and V (bf16) of `sequences` sequences at `context` tokens: a chunked layer keeps its chunk."""
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * BF16
    total = 0.0
    for rope in cfg.rope_layers:
        window = min(context, cfg.attention_chunk_size) if rope and cfg.attention_chunk_size else context
        total += per_token * window
    return sequences * total


def forward_flops(cfg: ModelConfig, tokens: float, window_tokens: float) -> float:
    """Forward FLOPs of `tokens` tokens, each attending over `window_tokens` keys (capped by the chunk on
    chunked layers): 2 x active parameters + 4 x heads x head_dim x window per layer."""
    attn = 0.0
    for rope in cfg.rope_layers:
        window = min(window_tokens, cfg.attention_chunk_size) if rope and cfg.attention_chunk_size else window_tokens
        attn += 4 * cfg.n_heads * cfg.head_dim * window
    return tokens * (2 * cfg.num_active_params() + attn)


def all_to_all_seconds(cfg: ModelConfig, tokens: float, gpus: int, hw: Hardware) -> float:
    """Dispatch and combine of `tokens` tokens' expert slots over `gpus` GPUs, every MoE layer (0 on one GPU)."""
    if gpus == 1 or cfg.moe is None or not cfg.moe_layers:
        return 0.0
    slots = tokens * cfg.moe.top_k
    per_gpu = 2 * slots * cfg.dim * BF16 * (gpus - 1) / gpus / gpus  # bytes each GPU sends (and receives)
    return len(cfg.moe_layers) * (per_gpu / (hw.link_gb_s * 1e9) + 2 * hw.collective_us * 1e-6)


def step(cfg: ModelConfig, hw: Hardware, *, gpus: int, tflops: float, precision: str, tokens: float,
         sequences: float, context: int, window: float, kv_read: bool) -> dict:
    """One step of `tokens` tokens over `gpus` GPUs: each bound's seconds, the step's, and which bound it is."""
    weights = weight_bytes_touched(cfg, tokens, precision)
    kv = kv_bytes(cfg, sequences, context)
    read = sum(weights.values()) + kv  # decode reads the cache; prefill writes it once (as many bytes)
    bounds = {"compute": forward_flops(cfg, tokens, window) / (gpus * tflops * 1e12),
              "memory": read / (gpus * hw.hbm_tb_s * 1e12),
              "all_to_all": all_to_all_seconds(cfg, tokens, gpus, hw)}
    seconds = max(bounds.values())
    return {"seconds": seconds, "bound": max(bounds, key=bounds.get), "bounds_seconds": bounds,
            "bytes": {**weights, "kv_cache_read" if kv_read else "kv_cache_written": kv}}


def decode(cfg: ModelConfig, hw: Hardware, batch: int, context: int, gpus: int, tflops: float,
           precision: str) -> dict:
    """One decode step of `batch` sequences at `context` tokens (the roofline of the module docstring)."""
    s = step(cfg, hw, gpus=gpus, tflops=tflops, precision=precision, tokens=batch, sequences=batch, context=context,
             window=context, kv_read=True)
    return s | {"tokens_per_s_per_sequence": 1 / s["seconds"], "tokens_per_s_per_gpu": batch / s["seconds"] / gpus}


def prefill(cfg: ModelConfig, hw: Hardware, batch: int, context: int, gpus: int, tflops: float,
            precision: str) -> dict:
    """Prefill of `batch` prompts of `context` tokens (attention over half the window on average)."""
    s = step(cfg, hw, gpus=gpus, tflops=tflops, precision=precision, tokens=batch * context, sequences=batch,
             context=context, window=context / 2, kv_read=False)
    return s | {"tokens_per_s_per_gpu": batch * context / s["seconds"] / gpus}


def compute_bound_batch(cfg: ModelConfig, hw: Hardware, context: int, gpus: int, tflops: float,
                        precision: str, limit: int = 1 << 22) -> int | None:
    """The smallest batch whose decode step is compute-bound (compute >= memory and all-to-all), or None below
    `limit` (a long context's cache grows with the batch as fast as the compute does)."""
    def bound(b: int) -> str:
        return decode(cfg, hw, b, context, gpus, tflops, precision)["bound"]

    if bound(limit) != "compute":
        return None
    lo, hi = 1, limit
    while lo < hi:  # compute's share only grows with the batch: the first compute-bound batch, by bisection
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if bound(mid) != "compute" else (lo, mid)
    return lo


def hardware(name: str, hbm_tb_s: float | None = None, link_gb_s: float | None = None) -> Hardware:
    """A built-in GPU, with its memory bandwidth or link overridden where given."""
    if name not in HARDWARE:
        raise ValueError(f"--gpu {name!r}: expected one of {', '.join(HARDWARE)}")
    hw = HARDWARE[name]
    return replace(hw, hbm_tb_s=hbm_tb_s or hw.hbm_tb_s, link_gb_s=link_gb_s or hw.link_gb_s)

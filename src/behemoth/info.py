"""`behemoth info`: what a model is, from its config alone (nothing is allocated): parameters by component,
total and active per token, its layer pattern and, for a context length, the bf16 KV cache."""

from __future__ import annotations

import torch

from behemoth.config import PRESET_NOTES, PRESETS, ModelConfig
from behemoth.inference.cache import cache_bytes, slots_per_kind

COMPONENTS = ("embeddings", "output", "attention", "routers", "routed_experts", "shared_experts", "dense_ffn",
              "norms", "vision_tower", "projector")


def info_report(cfg: ModelConfig, name: str, context: int | None = None, batch: int = 1) -> dict:
    """Parameter counts by component; with `context`, the bf16 KV cache for `batch` sequences of that many
    tokens. JSON keys include `total_params` and `active_params`."""
    b = cfg.param_breakdown()
    report = {
        "name": name, "note": PRESET_NOTES.get(name, ""),
        "total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "components": {c: {"total": b["total"][c], "active": b["active"][c]} for c in COMPONENTS
                       if c in b["total"]},
        "layers": cfg.n_layers, "moe_layers": list(cfg.moe_layers),
        "nope_layers": [i for i, r in enumerate(cfg.rope_layers) if not r],
        "config": cfg.to_dict(),
    }
    if context:
        report["kv_cache"] = {"context": context, "batch": batch, "dtype": "bfloat16",
                              "slots": {"chunked" if k and cfg.attention_chunk_size else "global": n
                                        for k, n in slots_per_kind(cfg, context).items()},
                              "bytes": cache_bytes(cfg, batch, context, torch.bfloat16)}
    return report


def format_info(r: dict) -> str:
    """`info_report` as the table `behemoth info` prints."""
    def n(x: int) -> str:
        return f"{x:,}"

    lines = [f"{r['name']}: {r['note']}" if r["note"] else r["name"]]
    cfg = r["config"]
    moe = cfg["moe"]
    lines.append(f"  dim {cfg['dim']}, {r['layers']} layers ({len(r['moe_layers'])} MoE, "
                 f"{len(r['nope_layers'])} NoPE), heads {cfg['n_heads']}/{cfg['n_kv_heads']} x {cfg['head_dim']}, "
                 f"vocab {cfg['vocab_size']}"
                 + (f", {moe['num_experts']} experts top-{moe['top_k']} x {moe['expert_dim']}"
                    f" + {moe['num_shared_experts']} shared" if moe else ", dense"))
    lines.append(f"  {'component':<16}{'total':>22}{'active/token':>22}")
    for c, v in r["components"].items():
        lines.append(f"  {c:<16}{n(v['total']):>22}{n(v['active']):>22}")
    lines.append(f"  {'TOTAL':<16}{n(r['total_params']):>22}{n(r['active_params']):>22}")
    if "kv_cache" in r:
        kv, gib = r["kv_cache"], 2**30
        by = kv["bytes"]
        lines.append(f"  KV cache, bf16, {kv['batch']} x {kv['context']:,} tokens: {by['total'] / gib:,.3f} GiB "
                     f"(chunked layers {by['chunked'] / gib:,.3f} GiB, {kv['slots'].get('chunked', 0):,} slots each; "
                     f"global layers {by['global'] / gib:,.3f} GiB)")
    return "\n".join(lines)


def preset_table() -> str:
    """One line per preset: total and active parameters, and what it is."""
    rows = [f"{'preset':<15}{'total params':>24}{'active/token':>22}  note"]
    for name, cfg in PRESETS.items():
        rows.append(f"{name:<15}{cfg.num_params():>24,}{cfg.num_active_params():>22,}  {PRESET_NOTES.get(name, '')}")
    return "\n".join(rows)

"""config.json <-> `ModelConfig`: transformers' Llama 4 configs read and written as tables of keys, and
`load_config_file` for a config.json in either format (native: {"format": "behemoth", "model": {...}}).

Reading accepts both the 5.x `rope_parameters` and the 4.x `rope_theta` + `rope_scaling` spellings, an int
`attn_temperature_tuning` (early Hub configs) and the `no_rope_layers` list (1 = RoPE). A missing key takes
transformers' default, which for the vision tower is not the released models' values (real configs spell
them out).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from behemoth.config import ModelConfig, MoEConfig, RopeScaling, VisionConfig

# (ModelConfig field, transformers key, cast or None to keep the value as it is, transformers' default)
TEXT_KEYS: tuple[tuple[str, str, type | None, Any], ...] = (
    ("dim", "hidden_size", int, 5120),
    ("n_layers", "num_hidden_layers", int, 48),
    ("n_heads", "num_attention_heads", int, 40),
    ("vocab_size", "vocab_size", int, 202048),
    ("ffn_dim", "intermediate_size_mlp", int, 16384),
    ("norm_eps", "rms_norm_eps", float, 1e-5),
    ("use_qk_norm", "use_qk_norm", bool, True),
    ("nope_layer_interval", "no_rope_layer_interval", int, 4),
    ("attention_chunk_size", "attention_chunk_size", None, 8192),
    ("attn_temperature_tuning", "attn_temperature_tuning", bool, True),
    ("floor_scale", "floor_scale", float, 8192),
    ("attn_scale", "attn_scale", float, 0.1),
    ("tie_word_embeddings", "tie_word_embeddings", bool, False),
    ("max_seq_len", "max_position_embeddings", int, 131072),
    ("bos_token_id", "bos_token_id", None, None),
    ("pad_token_id", "pad_token_id", None, None),
)
# (VisionConfig field, transformers key in vision_config, cast, default)
VISION_KEYS: tuple[tuple[str, str, type | None, Any], ...] = (
    ("dim", "hidden_size", int, 768),
    ("n_layers", "num_hidden_layers", int, 34),
    ("n_heads", "num_attention_heads", int, 16),
    ("ffn_dim", "intermediate_size", int, 5632),
    ("image_size", "image_size", int, 448),
    ("patch_size", "patch_size", int, 14),
    ("num_channels", "num_channels", int, 3),
    ("pixel_shuffle_ratio", "pixel_shuffle_ratio", float, 0.5),
    ("norm_eps", "norm_eps", float, 1e-5),
)
# Keys whose presence (when true) or other value would describe another architecture.
REFUSED = {"attention_bias": "attention_bias=true is not part of the Llama 4 architecture"}


def _read(d: dict[str, Any], table) -> dict[str, Any]:
    return {name: (cast(d.get(key, default)) if cast is not None else d.get(key, default))
            for name, key, cast, default in table}


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """A transformers Llama 4 config dict: `llama4_text`, or `llama4` with a `text_config` (and a vision
    tower when it has a `vision_config`)."""
    top = hf
    if hf.get("model_type") == "llama4" or "text_config" in hf:
        hf = hf.get("text_config") or {}
    vision = _vision_from_hf(top["vision_config"]) if top is not hf and top.get("vision_config") else None
    mt = hf.get("model_type", "llama4_text")
    if mt != "llama4_text":
        raise ValueError(f"model_type={mt!r}: expected 'llama4_text' or 'llama4'")
    for key, why in REFUSED.items():
        if hf.get(key):
            raise ValueError(why)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: Llama 4 uses 'silu'")
    fields = _read(hf, TEXT_KEYS)
    eos = hf.get("eos_token_id")
    return ModelConfig(
        **fields, **_rope_from_hf(hf), moe=_moe_from_hf(hf), nope_layers=_nope_layers_from_hf(hf),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf.get("num_attention_heads", 40)),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
        eos_token_id=() if eos is None else (eos,) if isinstance(eos, int) else tuple(eos),
        vision=vision, image_token_id=int(top.get("image_token_index", 200092)) if vision is not None else None)


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and llama3 rope_scaling, from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
        rope.setdefault("rope_theta", hf.get("rope_theta", 500000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope_parameters.rope_type={rope_type!r}: only 'default' and 'llama3' are supported")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    return {"rope_theta": float(rope.get("rope_theta", 500000.0)), "rope_scaling": scaling}


def _nope_layers_from_hf(hf: dict[str, Any]) -> tuple[int, ...] | None:
    """Explicit NoPE layers from `no_rope_layers` (1 = RoPE), or None where they follow the interval."""
    L = int(hf.get("num_hidden_layers", 48))
    no_rope = hf.get("no_rope_layers") or None  # transformers: an empty list falls back to the interval
    if no_rope is None:
        return None
    interval = int(hf.get("no_rope_layer_interval", 4))
    nope = tuple(i for i in range(L) if not no_rope[i])
    return None if nope == tuple(i for i in range(L) if interval and (i + 1) % interval == 0) else nope


def _moe_from_hf(hf: dict[str, Any]) -> MoEConfig | None:
    """The MoE block; explicit `moe_layers` kept only where they differ from the interleave step's."""
    L, step = int(hf.get("num_hidden_layers", 48)), int(hf.get("interleave_moe_layer_step", 1))
    moe_layers = hf.get("moe_layers")
    if moe_layers == []:
        return None
    explicit = None if moe_layers is None or list(moe_layers) == list(range(step - 1, L, step)) else tuple(moe_layers)
    return MoEConfig(num_experts=int(hf.get("num_local_experts", 16)), top_k=int(hf.get("num_experts_per_tok", 1)),
                     expert_dim=int(hf.get("intermediate_size", 8192)), num_shared_experts=1,
                     interleave_step=step, layers=explicit)


def _vision_from_hf(v: dict[str, Any]) -> VisionConfig:
    """A transformers `Llama4VisionConfig` dict."""
    widths = {int(v.get(k, d)) for k, d in (("projector_input_dim", 4096), ("projector_output_dim", 4096),
                                              ("vision_output_dim", 7680))}
    if len(widths) != 1:
        raise ValueError("vision_config: projector_input_dim, projector_output_dim and vision_output_dim must be "
                         "equal (the adapter MLP and the projector share one width)")
    if v.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"vision_config.hidden_act={v.get('hidden_act')!r}: Llama 4 uses 'gelu'")
    if v.get("multi_modal_projector_bias"):
        raise ValueError("vision_config.multi_modal_projector_bias=true is not part of the Llama 4 architecture")
    for key in ("image_size", "patch_size"):
        if not isinstance(v.get(key, 0), int):
            raise ValueError(f"vision_config.{key}={v.get(key)!r}: only square sizes (one integer) are supported")
    rope = v.get("rope_parameters") or {}
    return VisionConfig(**_read(v, VISION_KEYS), adapter_dim=widths.pop(),
                        rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))))


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers `Llama4TextConfig` dict, or for a model with a vision tower a `Llama4Config`
    (`Llama4ForConditionalGeneration`). Raises `ValueError` for what transformers cannot express."""
    if cfg.moe is not None and cfg.moe.num_shared_experts != 1:
        raise ValueError("moe.num_shared_experts=0: transformers' Llama 4 always has one shared expert")
    moe = cfg.moe
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
    eos = list(cfg.eos_token_id)
    text = {
        "model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"],
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "intermediate_size": moe.expert_dim if moe else cfg.ffn_dim, "intermediate_size_mlp": cfg.ffn_dim,
        "num_local_experts": moe.num_experts if moe else 1, "num_experts_per_tok": moe.top_k if moe else 1,
        "interleave_moe_layer_step": moe.interleave_step if moe else 1, "moe_layers": list(cfg.moe_layers),
        "no_rope_layers": [int(r) for r in cfg.rope_layers], "no_rope_layer_interval": cfg.nope_layer_interval,
        "attention_chunk_size": cfg.attention_chunk_size, "use_qk_norm": cfg.use_qk_norm,
        "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": _num(cfg.floor_scale),
        "attn_scale": cfg.attn_scale, "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id,
    }
    v = cfg.vision
    if v is None:
        return text
    vision = {
        "model_type": "llama4_vision_model", "hidden_size": v.dim, "num_hidden_layers": v.n_layers,
        "num_attention_heads": v.n_heads, "intermediate_size": v.ffn_dim, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": v.num_channels, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        "projector_input_dim": v.adapter_dim, "projector_output_dim": v.adapter_dim,
        "vision_output_dim": v.adapter_dim, "norm_eps": v.norm_eps, "hidden_act": "gelu",
        "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
        "multi_modal_projector_bias": False, "vision_feature_select_strategy": "default",
    }
    return {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
            "text_config": {**text, "architectures": None}, "vision_config": vision,
            "boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": cfg.image_token_id,
            "tie_word_embeddings": cfg.tie_word_embeddings}


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def load_config_file(path: str | Path) -> ModelConfig:
    """A config.json in either format: native (has "format": "behemoth") or transformers'."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory; give its config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        if d.get("format") == "behemoth":
            return ModelConfig.from_dict(d["model"])
        return from_hf_config(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None

"""Model configuration: frozen dataclasses, presets, validation, parameter counts (config.json I/O: `config_io`).

A `ModelConfig` holds *resolved* sizes (the expert width is 8192, not the recipe that produced it).
Every derived value (which layers are MoE, which use RoPE, parameter counts) is a property or a
method, so a config can never disagree with itself. Invalid values raise `ValueError` naming the
field. Field names follow Meta's `ModelArgs`; transformers' names are mapped in `config_io`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style RoPE frequency scaling. Scout: factor 16, low 1, high 1, L0 8192."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _check(self.factor >= 1.0, "rope_scaling.factor", self.factor, "must be >= 1")
        _check(self.low_freq_factor > 0, "rope_scaling.low_freq_factor", self.low_freq_factor, "must be > 0")
        _check(self.high_freq_factor >= self.low_freq_factor, "rope_scaling.high_freq_factor",
               self.high_freq_factor, "must be >= low_freq_factor")
        _check(self.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
               self.original_max_position_embeddings, "must be > 0")


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts block: routed experts (sigmoid top-k) plus an always-on shared expert.

    `layers` lists the MoE layer indices explicitly; when None they are derived from
    `interleave_step` exactly as HF does: `range(step - 1, n_layers, step)` (Scout 1, Maverick 2).
    """

    num_experts: int = 16
    top_k: int = 1
    expert_dim: int = 8192
    num_shared_experts: int = 1
    interleave_step: int = 1
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, "moe.num_experts", self.num_experts, "must be >= 1")
        _check(1 <= self.top_k <= self.num_experts, "moe.top_k", self.top_k, "must be in [1, num_experts]")
        _check(self.expert_dim >= 1, "moe.expert_dim", self.expert_dim, "must be >= 1")
        _check(self.num_shared_experts in (0, 1), "moe.num_shared_experts", self.num_shared_experts,
               "must be 0 or 1")
        _check(self.interleave_step >= 1, "moe.interleave_step", self.interleave_step, "must be >= 1")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))


@dataclass(frozen=True)
class VisionConfig:
    """The Llama 4 vision encoder: a ViT over square tiles, a pixel-shuffle adapter, and the projector
    into the text model. Scout and Maverick share these values (transformers' `Llama4VisionConfig`).

    Per tile: (image_size / patch_size)^2 patches (576) plus a class token; after the encoder the
    class token is dropped and pixel shuffle merges each 2x2 neighbourhood (ratio 0.5), giving
    `tokens_per_tile` (144) vectors of width dim / ratio^2, which the adapter MLP maps to
    `adapter_dim` and the projector to the text model's width.
    """

    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    ffn_dim: int = 5632
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    pixel_shuffle_ratio: float = 0.5
    adapter_dim: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "image_size", "patch_size", "num_channels",
                     "adapter_dim"):
            _check(getattr(self, name) >= 1, f"vision.{name}", getattr(self, name), "must be >= 1")
        _check(self.dim % self.n_heads == 0, "vision.dim", self.dim, f"must be divisible by n_heads ({self.n_heads})")
        _check(self.head_dim % 4 == 0, "vision.n_heads", self.n_heads,
               f"gives head_dim {self.head_dim}; the 2D RoPE needs a multiple of 4")
        _check(self.image_size % self.patch_size == 0, "vision.image_size", self.image_size,
               f"must be a multiple of patch_size ({self.patch_size})")
        k = 1 / self.pixel_shuffle_ratio if self.pixel_shuffle_ratio > 0 else 0.0
        _check(k >= 1 and k == round(k) and self.patches_per_side % round(k) == 0, "vision.pixel_shuffle_ratio",
               self.pixel_shuffle_ratio, f"must be 1/k, k an integer dividing the grid side {self.patches_per_side}")
        _check(self.ffn_dim == self.shuffled_dim, "vision.ffn_dim", self.ffn_dim,
               f"must equal dim / pixel_shuffle_ratio^2 = {self.shuffled_dim} (it is also the adapter's input width)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.patches_per_side * self.pixel_shuffle_ratio) ** 2

    @property
    def shuffled_dim(self) -> int:
        return int(round(self.dim / self.pixel_shuffle_ratio ** 2))

    def encoder_params(self) -> int:
        """Vision tower parameters: patch embedding, class and position embeddings, LayerNorms, the
        encoder layers and the pixel-shuffle adapter MLP (not the projector)."""
        D, F = self.dim, self.ffn_dim
        layer = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 2 * 2 * D
        embed = D * self.num_channels * self.patch_size ** 2 + D + (self.patches_per_side ** 2 + 1) * D
        adapter = self.shuffled_dim * self.adapter_dim + self.adapter_dim * self.adapter_dim
        return embed + 2 * 2 * D + self.n_layers * layer + adapter

    def projector_params(self, text_dim: int) -> int:
        return self.adapter_dim * text_dim


@dataclass(frozen=True)
class ModelConfig:
    """The Llama 4 text model. Names follow Meta's `ModelArgs` (dim, n_layers, n_heads, ...).

    NoPE layers: `nope_layers` lists them explicitly; otherwise every `nope_layer_interval`-th layer
    (index i with (i+1) % interval == 0) is NoPE; interval 0 means none. RoPE layers use chunked
    causal attention with `attention_chunk_size` (None: plain causal) and QK-norm when `use_qk_norm`;
    NoPE layers use full causal attention and, when `attn_temperature_tuning`, query scaling.
    """

    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 202048
    ffn_dim: int = 16384
    moe: MoEConfig | None = field(default_factory=MoEConfig)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    use_qk_norm: bool = True
    nope_layer_interval: int = 4
    nope_layers: tuple[int, ...] | None = None
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    tie_word_embeddings: bool = False
    max_seq_len: int = 262144
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    vision: VisionConfig | None = None
    image_token_id: int | None = None  # `<|patch|>`: the positions image features replace

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_dim",
                     "max_seq_len"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.n_heads % self.n_kv_heads == 0, "n_heads", self.n_heads,
               f"must be divisible by n_kv_heads ({self.n_kv_heads})")
        _check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
        _check(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        _check(self.nope_layer_interval >= 0, "nope_layer_interval", self.nope_layer_interval, "must be >= 0")
        _check(self.attention_chunk_size is None or self.attention_chunk_size >= 1, "attention_chunk_size",
               self.attention_chunk_size, "must be >= 1 or None")
        _check(self.floor_scale > 0, "floor_scale", self.floor_scale, "must be > 0")
        if self.nope_layers is not None:
            object.__setattr__(self, "nope_layers", tuple(int(i) for i in self.nope_layers))
            bad = [i for i in self.nope_layers if not 0 <= i < self.n_layers]
            _check(not bad, "nope_layers", bad, f"has indices outside [0, {self.n_layers})")
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.moe is not None and self.moe.layers is not None:
            bad = [i for i in self.moe.layers if not 0 <= i < self.n_layers]
            _check(not bad, "moe.layers", bad, f"has indices outside [0, {self.n_layers})")
        if self.vision is not None:
            ok = self.image_token_id is not None and 0 <= self.image_token_id < self.vocab_size
            _check(ok, "image_token_id", self.image_token_id, f"must be a token id in [0, {self.vocab_size}) "
                   "when the model has a vision tower")

    # ---- derived layer pattern -------------------------------------------------------------
    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of MoE layers (the rest are dense SwiGLU)."""
        if self.moe is None:
            return ()
        if self.moe.layers is not None:
            return tuple(sorted(set(self.moe.layers)))
        step = self.moe.interleave_step
        return tuple(range(step - 1, self.n_layers, step))

    @property
    def rope_layers(self) -> tuple[bool, ...]:
        """Per layer: True for RoPE (+ chunked mask, QK-norm), False for NoPE (global, temperature)."""
        if self.nope_layers is not None:
            nope = set(self.nope_layers)
            return tuple(i not in nope for i in range(self.n_layers))
        k = self.nope_layer_interval
        return tuple(k == 0 or (i + 1) % k != 0 for i in range(self.n_layers))

    def is_moe_layer(self, i: int) -> bool:
        return i in set(self.moe_layers)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again). `moe` may be given as a dict of changes."""
        if isinstance(changes.get("moe"), dict):
            base = self.moe or MoEConfig()
            changes["moe"] = dataclasses.replace(base, **changes["moe"])
        if isinstance(changes.get("vision"), dict):
            changes["vision"] = dataclasses.replace(self.vision or VisionConfig(), **changes["vision"])
        return dataclasses.replace(self, **changes)

    # ---- parameter counts (no weights allocated) ---------------------------------------------
    def param_breakdown(self) -> dict[str, dict[str, int]]:
        """Parameters by component: {"total": {...}, "active": {...}}.

        Active means per text token (Meta's "17B active"); the vision tower and projector run once per
        image tile instead, so they count in the total only (components present only with a vision tower).
        """
        D, L = self.dim, self.n_layers
        attn = D * self.n_heads * self.head_dim * 2 + D * self.n_kv_heads * self.head_dim * 2
        n_moe = len(self.moe_layers)
        n_dense = L - n_moe
        embed = self.vocab_size * D
        total = {
            "embeddings": embed,
            "output": 0 if self.tie_word_embeddings else embed,
            "attention": L * attn,
            "routers": 0, "routed_experts": 0, "shared_experts": 0,
            "dense_ffn": n_dense * 3 * D * self.ffn_dim,
            "norms": (2 * L + 1) * D,
        }
        active = dict(total)
        if self.moe is not None and n_moe:
            m = self.moe
            expert = 3 * D * m.expert_dim
            total["routers"] = active["routers"] = n_moe * D * m.num_experts
            total["routed_experts"] = n_moe * m.num_experts * expert
            active["routed_experts"] = n_moe * m.top_k * expert
            total["shared_experts"] = active["shared_experts"] = n_moe * m.num_shared_experts * expert
        if self.vision is not None:
            total["vision_tower"] = self.vision.encoder_params()
            total["projector"] = self.vision.projector_params(D)
            active["vision_tower"] = active["projector"] = 0
        return {"total": total, "active": active}

    def num_params(self) -> int:
        """Total parameters, vision tower and projector included (a tied output head counted once)."""
        return sum(self.param_breakdown()["total"].values())

    def num_active_params(self) -> int:
        """Parameters used per token: top-k routed + shared experts, plus embedding and head."""
        return sum(self.param_breakdown()["active"].values())

    def train_flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs to train on one token (forward + backward), the PaLM convention that MFU figures
        use: 6 x active parameters (embedding and head included) plus 12 x layers x heads x head_dim x
        keys in the attention window (the whole sequence, or the chunk on chunked RoPE layers)."""
        attn = 0.0
        for rope in self.rope_layers:
            window = min(seq_len, self.attention_chunk_size or seq_len) if rope else seq_len
            attn += 12 * self.n_heads * self.head_dim * window
        return 6 * self.num_active_params() + attn

    # ---- native JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`. Unknown keys raise `ValueError` naming them."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        if d.get("moe") is not None:
            d["moe"] = _build(MoEConfig, d["moe"], "moe")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = _build(RopeScaling, d["rope_scaling"], "rope_scaling")
        if d.get("vision") is not None:
            d["vision"] = _build(VisionConfig, d["vision"], "vision")
        return cls(**d)


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(prefix + '.' + k for k in unknown)}")
    return cls(**d)


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {why}")


# ---- presets -----------------------------------------------------------------------------------

_LLAMA4_TOKENS = dict(bos_token_id=200000, eos_token_id=(200001, 200007, 200008), pad_token_id=200018)
_LLAMA4_VISION = dict(vision=VisionConfig(), image_token_id=200092)  # the same tower in Scout and Maverick

PRESETS: dict[str, ModelConfig] = {
    # Every feature at toy size: NoPE layer 3, dense + MoE layers, chunk 32 and floor_scale 64 so that
    # chunked masks and temperature tuning act on short test sequences. CPU, seconds.
    "debug": ModelConfig(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=256, ffn_dim=128,
        moe=MoEConfig(num_experts=4, top_k=1, expert_dim=64, interleave_step=2),
        rope_theta=10000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), attention_chunk_size=32,
        floor_scale=64, max_seq_len=1024),
    # A small Scout-shaped model for CPU experiments (minutes).
    "tiny": ModelConfig(
        dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=8192, ffn_dim=1024,
        moe=MoEConfig(num_experts=8, top_k=1, expert_dim=512), rope_theta=500000.0,
        attention_chunk_size=256, max_seq_len=4096),
    # Llama 4 Scout 17B-16E (Instruct config): MoE in every layer, QK-norm, llama3 RoPE scaling, vision tower.
    "scout": ModelConfig(
        moe=MoEConfig(num_experts=16, top_k=1, expert_dim=8192, interleave_step=1),
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), use_qk_norm=True, max_seq_len=10485760,
        **_LLAMA4_TOKENS, **_LLAMA4_VISION),
    # Llama 4 Maverick 17B-128E (Instruct config): dense / MoE alternating, no QK-norm, no scaling.
    "maverick": ModelConfig(
        moe=MoEConfig(num_experts=128, top_k=1, expert_dim=8192, interleave_step=2),
        rope_scaling=None, use_qk_norm=False, max_seq_len=1048576, **_LLAMA4_TOKENS, **_LLAMA4_VISION),
    # ESTIMATE, not an official config (none is public). Derived from Meta's public figures, 288B
    # active / ~2T total / 16 experts. With only 16 experts, total/active ~ 7 forces MoE in (nearly)
    # every layer, so: Scout-style blocks (top-1 + shared) scaled to D=16384 and 88 layers, 128/8 heads,
    # expert width 26624 from Meta's FFN-width formula at that D. Gives 2.01T total / 287.2B active.
    "behemoth": ModelConfig(
        dim=16384, n_layers=88, n_heads=128, n_kv_heads=8, head_dim=128, ffn_dim=53248,
        moe=MoEConfig(num_experts=16, top_k=1, expert_dim=26624, interleave_step=1),
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192), use_qk_norm=True, max_seq_len=262144,
        **_LLAMA4_TOKENS),
    # The standard GPU training benchmark: Scout-shaped (MoE in every layer, 8 experts top-1 + shared),
    # 1.10B active / 3.92B total.
    "bench-1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, vocab_size=32000, ffn_dim=8192,
        moe=MoEConfig(num_experts=8, top_k=1, expert_dim=4096, interleave_step=1), max_seq_len=8192),
    # CPU teacher with Behemoth's shape of sparsity: 16 experts + shared, MoE in every layer.
    "mini-behemoth": ModelConfig(
        dim=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=768,
        moe=MoEConfig(num_experts=16, top_k=1, expert_dim=384, interleave_step=1),
        rope_theta=500000.0, attention_chunk_size=128, floor_scale=512, max_seq_len=2048),
    # CPU student with Maverick's shape: more, smaller experts, MoE every other layer, dense width = 2x
    # expert width, no QK-norm, far fewer active parameters than mini-behemoth. Same vocabulary.
    "mini-maverick": ModelConfig(
        dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=2048, ffn_dim=256,
        moe=MoEConfig(num_experts=32, top_k=1, expert_dim=128, interleave_step=2), use_qk_norm=False,
        rope_theta=500000.0, attention_chunk_size=128, floor_scale=512, max_seq_len=2048),
}
# The CPU student with a small vision tower (64-pixel tiles of 8-pixel patches: 16 tokens per tile) for the
# built-in visual tasks. Its image token is `<|patch|>` of the character tokenizer with image tokens
# (`Tokenizer.from_chars(data.tasks.ALPHABET, data.images.IMAGE_SPECIAL_TOKENS)`).
PRESETS["mini-maverick-vl"] = PRESETS["mini-maverick"].replace(
    vision=VisionConfig(dim=96, n_layers=2, n_heads=4, ffn_dim=384, image_size=64, patch_size=8, adapter_dim=128),
    image_token_id=57)

PRESET_NOTES: dict[str, str] = {
    "debug": "toy model exercising every feature; CPU, seconds",
    "tiny": "small Scout-shaped model for CPU experiments",
    "scout": "Llama 4 Scout 17B-16E (official config): text model + vision tower",
    "maverick": "Llama 4 Maverick 17B-128E (official config): text model + vision tower",
    "behemoth": ("ESTIMATE, not an official config: derived from Meta's public 288B active / ~2T total / "
                 "16 experts; Scout-style blocks at D=16384, 88 layers, expert width 26624"),
    "bench-1b": "standard GPU training benchmark: 8 experts top-1 + shared in every layer",
    "mini-behemoth": "CPU teacher: 16 experts + shared, MoE in every layer",
    "mini-maverick": "CPU student: 32 small experts, MoE every other layer, ~4x fewer active params",
    "mini-maverick-vl": "mini-maverick + a small vision tower (64-pixel tiles) for the built-in visual tasks",
}


def get_preset(name: str) -> ModelConfig:
    """The preset `name`; an unknown name raises `ValueError` listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None

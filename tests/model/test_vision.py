"""The vision tower against transformers' `Llama4VisionModel` (+ `Llama4MultiModalProjector`) on tiny
random models in fp32, and its pieces against their closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from behemoth.checkpoint.convert import hf_to_native_vision_key
from behemoth.config import VisionConfig
from behemoth.model.vision import VisionEmbeddings, pixel_shuffle, vision_rope_cos_sin

transformers = pytest.importorskip("transformers")

TINY = VisionConfig(dim=32, n_layers=2, n_heads=2, ffn_dim=128, image_size=56, patch_size=14, adapter_dim=48)


def hf_vision_pair(cfg: VisionConfig, text_dim: int = 40, seed: int = 0):
    """transformers' vision model and projector, and ours with the same (randomised) weights."""
    hf_cfg = transformers.Llama4VisionConfig(
        hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ffn_dim, image_size=cfg.image_size, patch_size=cfg.patch_size,
        num_channels=cfg.num_channels, pixel_shuffle_ratio=cfg.pixel_shuffle_ratio,
        projector_input_dim=cfg.adapter_dim, projector_output_dim=cfg.adapter_dim, vision_output_dim=cfg.adapter_dim,
        norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    torch.manual_seed(seed)
    hf = transformers.models.llama4.modeling_llama4.Llama4VisionModel(hf_cfg).eval()
    proj = nn.Linear(cfg.adapter_dim, text_dim, bias=False)
    with torch.no_grad():  # randomise everything, LayerNorm affine parameters included
        for p in [*hf.parameters(), *proj.parameters()]:
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    ours = VisionEmbeddings(cfg).eval()
    projection = nn.Linear(cfg.adapter_dim, text_dim, bias=False)
    state = {hf_to_native_vision_key("vision_model." + k): v for k, v in hf.state_dict().items()
             if not k.startswith("rotary_embedding")}
    assert None not in state, "an HF vision key has no native name"
    ours.load_state_dict({k.removeprefix("vision_embeddings."): v for k, v in state.items()}, strict=True)
    assert hf_to_native_vision_key("multi_modal_projector.linear_1.weight") == "vision_projection.weight"
    projection.load_state_dict(proj.state_dict())
    return (hf, proj), (ours, projection)


WIDER = VisionConfig(dim=48, n_layers=3, n_heads=4, ffn_dim=192, image_size=112, patch_size=14, adapter_dim=32)


@pytest.mark.parametrize("cfg", [TINY, WIDER], ids=["4x4-patches", "8x8-patches"])
def test_vision_tower_matches_transformers_fp32(cfg):
    (hf, hf_proj), (ours, proj) = hf_vision_pair(cfg)
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_proj(hf(pixels).last_hidden_state)
        out = proj(ours(pixels))
    assert out.shape == (3, cfg.tokens_per_tile, 40)
    err = (ref - out).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"max |diff| {err:.2e} (outputs up to {ref.abs().max():.1f})"


def test_parity_is_sensitive_to_the_rope_axis_order():
    """Swapping the column and row halves of the 2D RoPE (pitfall P7) must break the comparison."""
    (hf, _), (ours, _) = hf_vision_pair(TINY)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    import behemoth.model.vision as vision

    real = vision.vision_rope_cos_sin

    def swapped(cfg, device=None):
        cos, sin = real(cfg, device)
        h = cos.shape[-1] // 2
        return (torch.cat([cos[..., h:], cos[..., :h]], -1), torch.cat([sin[..., h:], sin[..., :h]], -1))

    with torch.no_grad():
        ref = hf(pixels).last_hidden_state
        vision.vision_rope_cos_sin = swapped
        try:
            out = ours(pixels)
        finally:
            vision.vision_rope_cos_sin = real
    assert (ref - out).abs().max() > 1e-3


def test_pixel_shuffle_closed_form():
    """out[t = i*g' + j, (2*dy + dx)*D + c] = X[2i + dy, 2j + dx, c] on a g x g grid."""
    g, D = 6, 5
    x = torch.randn(2, g * g, D)
    out = pixel_shuffle(x, 0.5)
    grid = x.view(2, g, g, D)
    for i in range(g // 2):
        for j in range(g // 2):
            for dy in (0, 1):
                for dx in (0, 1):
                    torch.testing.assert_close(out[:, i * (g // 2) + j, (2 * dy + dx) * D:(2 * dy + dx + 1) * D],
                                               grid[:, 2 * i + dy, 2 * j + dx])


def test_vision_rope_table():
    """Column first, 1-based, class token unrotated (Scout's values)."""
    cfg = VisionConfig()
    cos, sin = vision_rope_cos_sin(cfg)
    assert cos.shape == (1, 577, 1, 44)
    cos, sin = cos[0, :, 0], sin[0, :, 0]
    f = 10000.0 ** (-torch.arange(22) * 2 / 44)
    n = 24 * 3 + 5  # row 3, column 5
    expect = torch.cat([(5 + 1) * f, (3 + 1) * f])
    torch.testing.assert_close(cos[n], expect.cos())
    torch.testing.assert_close(sin[n], expect.sin())
    assert torch.equal(cos[576], torch.ones(44)) and torch.equal(sin[576], torch.zeros(44))


def test_vision_config_validation_and_counts():
    v = VisionConfig()
    assert (v.encoder_params(), v.projector_params(5120)) == (850_960_896, 20_971_520)
    assert v.tokens_per_tile == 144 and v.head_dim == 88
    assert sum(p.numel() for p in VisionEmbeddings(TINY).parameters()) == TINY.encoder_params()
    with pytest.raises(ValueError, match="vision.ffn_dim"):
        VisionConfig(ffn_dim=4096)  # pitfall P14: the MLP width is also the adapter's input width
    with pytest.raises(ValueError, match="vision.image_size"):
        VisionConfig(image_size=330)

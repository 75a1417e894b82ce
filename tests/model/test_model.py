"""Model building blocks against closed forms and the properties the architecture promises."""

from __future__ import annotations

import math

import pytest
import torch

from behemoth import build_model
from behemoth.config import PRESETS
from behemoth.model.attention import attention_mask, temperature_scale
from behemoth.model.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


def test_chunked_mask_is_fixed_chunks_not_sliding():
    pos = torch.arange(8)[None]
    m = attention_mask(pos, pos, chunk_size=3)[0, 0]
    for q in range(8):
        for k in range(8):
            assert bool(m[q, k]) == (k <= q and k // 3 == q // 3)
    assert m[3].tolist() == [False, False, False, True, False, False, False, False]  # chunk start sees itself
    assert torch.equal(attention_mask(pos, pos, None)[0, 0], torch.ones(8, 8).tril().bool())


def test_temperature_scale_values():
    pos = torch.tensor([[0, 8190, 8191, 16382, 16383, 65535, 131071, 1048575, 10485759]])
    s = temperature_scale(pos, 8192, 0.1)[0].tolist()
    # 1 + 0.1 * log(1 + floor((p + 1) / 8192)): floors 0, 0, 1, 1, 2, 8, 16, 128, 1280; fp32 (measured 6e-8 off)
    expect = [1.0, 1.0, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3), 1 + 0.1 * math.log(9),
              1 + 0.1 * math.log(17), 1 + 0.1 * math.log(129), 1 + 0.1 * math.log(1281)]
    assert s == pytest.approx(expect, abs=2e-7)


def test_scout_rope_scaling_divides_low_frequencies_by_16():
    cfg = PRESETS["scout"]
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    assert torch.equal(scaled[:35], plain[:35])
    torch.testing.assert_close(scaled[35:], plain[35:] / 16)


def test_llama3_smooth_band():
    from behemoth.config import RopeScaling

    cfg = PRESETS["scout"].replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
    plain = rope_inv_freq(cfg.replace(rope_scaling=None))
    scaled = rope_inv_freq(cfg)
    assert torch.equal(scaled[:29], plain[:29])
    torch.testing.assert_close(scaled[35:], plain[35:] / 8)
    band = scaled[29:35] / plain[29:35]
    assert bool(((band > 1 / 8) & (band < 1)).all())


def test_rope_is_the_interleaved_complex_rotation():
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5)[None].expand(2, 5)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    cos, sin = rope_cos_sin(inv, pos)
    angles = pos[..., None].float() * inv
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) *
                             torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref)


def test_rmsnorm_casts_before_weight():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    norm = RMSNorm(16).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), ref)


def test_causal():
    model = build_model("debug").eval()
    ids = torch.randint(0, 256, (1, 70))
    ids2 = ids.clone()
    ids2[0, 50:] = (ids2[0, 50:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, :50], b[:, :50])
    assert not torch.allclose(a[:, 50:], b[:, 50:])


def test_chunked_layers_do_not_see_earlier_chunks():
    """With only RoPE (chunked) layers, positions in chunk 1 ignore every token of chunk 0."""
    cfg = PRESETS["debug"].replace(nope_layer_interval=0, attention_chunk_size=16)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 256, (1, 40))
    ids2 = ids.clone()
    ids2[0, :16] = (ids2[0, :16] + 7) % 256
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    torch.testing.assert_close(a[:, 16:], b[:, 16:])
    assert not torch.allclose(a[:, :16], b[:, :16])


def test_positions_are_absolute():
    """Passing explicit positions equals the default arange; shifting them changes RoPE and the chunks."""
    model = build_model("debug").eval()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids, positions=torch.arange(20)))
        assert not torch.allclose(model(ids), model(ids, positions=torch.arange(20) + 5))


def test_build_on_meta_and_dtype():
    m = build_model("scout", device="meta")
    assert all(p.is_meta for p in m.parameters())
    m = build_model("debug", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    with torch.no_grad():
        assert m(torch.zeros(1, 4, dtype=torch.long)).dtype == torch.bfloat16


def test_build_is_seeded():
    a, b = build_model("debug", seed=3), build_model("debug", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_segments_behave_like_separate_documents():
    """Two packed documents with restarting positions and segment ids == each document run alone."""
    model = build_model("debug").eval()
    a, b = torch.randint(0, 256, (1, 45)), torch.randint(0, 256, (1, 30))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(45), torch.arange(30)])[None]
    segments = torch.cat([torch.zeros(45), torch.ones(30)]).long()[None]
    with torch.no_grad():
        out = model(packed, positions=positions, segment_ids=segments)
        torch.testing.assert_close(out[:, :45], model(a))
        torch.testing.assert_close(out[:, 45:], model(b))


def test_expert_bias_moves_selection_not_scores():
    from behemoth.model.moe import Router

    router = Router(4, 3, 1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3, 4))
    x = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    scores, ids, _ = router(x)
    assert ids.item() == 0 and scores.item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    router.expert_bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    scores, ids, _ = router(x)
    assert ids.item() == 1 and scores.item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item())

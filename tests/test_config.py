"""Config: presets, validation, parameter counts (config == built model), HF config.json I/O."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from behemoth import build_model
from behemoth.config import PRESETS, ModelConfig, MoEConfig, RopeScaling
from behemoth.config_io import from_hf_config, load_config_file, to_hf_config
from behemoth.model.moe import MoE


def test_scout_and_maverick_parameter_counts_are_exact():
    """Text model + vision tower (850,960,896) + projector (20,971,520); active per text token."""
    assert PRESETS["scout"].num_params() == 108_641_793_536
    assert PRESETS["scout"].replace(vision=None, image_token_id=None).num_params() == 107_769_861_120
    assert PRESETS["scout"].num_active_params() == 17_172_894_720
    assert PRESETS["maverick"].num_params() == 401_583_781_376
    assert PRESETS["maverick"].replace(vision=None, image_token_id=None).num_params() == 400_711_848_960
    assert PRESETS["maverick"].num_active_params() == 17_184_691_200
    b = PRESETS["scout"].param_breakdown()
    assert (b["total"]["vision_tower"], b["total"]["projector"]) == (850_960_896, 20_971_520)
    assert b["active"]["vision_tower"] == b["active"]["projector"] == 0


def test_behemoth_estimate_matches_public_figures():
    cfg = PRESETS["behemoth"]
    assert cfg.moe.num_experts == 16 and len(cfg.moe_layers) == cfg.n_layers
    assert abs(cfg.num_active_params() / 288e9 - 1) < 0.01
    assert abs(cfg.num_params() / 2e12 - 1) < 0.02


def test_mini_pair_keeps_the_shapes_of_sparsity():
    teacher, student = PRESETS["mini-behemoth"], PRESETS["mini-maverick"]
    assert teacher.moe.num_experts == 16 and teacher.moe_layers == tuple(range(teacher.n_layers))
    assert student.moe.num_experts > teacher.moe.num_experts
    assert student.moe.expert_dim < teacher.moe.expert_dim
    assert student.moe_layers == tuple(range(1, student.n_layers, 2))
    assert student.vocab_size == teacher.vocab_size
    assert student.num_active_params() * 3 < teacher.num_active_params()


def _active_from_modules(model: nn.Module) -> int:
    """Active parameters counted from the built modules: routed experts scaled by top_k / E; the vision
    tower and projector are not per-token."""
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision_"))
    for m in model.modules():
        if isinstance(m, MoE):
            routed = sum(p.numel() for p in m.experts.parameters())
            total -= routed - routed * m.top_k // m.num_experts
    return total


@pytest.mark.parametrize("name", ["debug", "tiny", "mini-behemoth", "mini-maverick"])
def test_param_counts_equal_built_model(name):
    model = build_model(name)
    assert PRESETS[name].num_params() == sum(p.numel() for p in model.parameters())
    assert PRESETS[name].num_active_params() == _active_from_modules(model)


@pytest.mark.parametrize("name", ["scout", "maverick", "behemoth"])
def test_param_counts_equal_meta_model(name):
    model = build_model(name, device="meta")
    assert PRESETS[name].num_params() == sum(p.numel() for p in model.parameters())
    assert PRESETS[name].num_active_params() == _active_from_modules(model)


def test_breakdown_components_match_modules():
    cfg = PRESETS["debug"]
    model = build_model(cfg, device="meta")
    b = cfg.param_breakdown()["total"]

    def count(pred):
        return sum(p.numel() for n, p in model.named_parameters() if pred(n))

    assert b["embeddings"] == count(lambda n: n.startswith("tok_embeddings"))
    assert b["output"] == count(lambda n: n.startswith("output"))
    assert b["attention"] == count(lambda n: ".attention." in n)
    assert b["routers"] == count(lambda n: ".router." in n)
    assert b["routed_experts"] == count(lambda n: ".experts." in n)
    assert b["shared_experts"] == count(lambda n: ".shared_expert." in n)
    assert b["norms"] == count(lambda n: "norm" in n)
    assert b["dense_ffn"] == count(lambda n: ".feed_forward.w" in n)


def test_tied_embeddings_counted_once():
    cfg = PRESETS["debug"].replace(tie_word_embeddings=True)
    model = build_model(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_layer_patterns():
    scout, mav = PRESETS["scout"], PRESETS["maverick"]
    assert scout.moe_layers == tuple(range(48))
    assert mav.moe_layers == tuple(range(1, 48, 2))
    nope = [i for i, r in enumerate(scout.rope_layers) if not r]
    assert nope == list(range(3, 48, 4))
    cfg = PRESETS["debug"].replace(nope_layers=(0, 2), moe={"layers": (3,)})
    assert cfg.rope_layers == (False, True, False, True) and cfg.moe_layers == (3,)
    assert PRESETS["debug"].replace(nope_layer_interval=0).rope_layers == (True,) * 4


@pytest.mark.parametrize("field,value", [
    ("n_heads", 5), ("dim", 0), ("head_dim", 7), ("attention_chunk_size", 0), ("floor_scale", 0),
    ("nope_layers", (9,)), ("norm_eps", -1.0),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PRESETS["debug"].replace(**{field: value})


@pytest.mark.parametrize("field,value", [("top_k", 5), ("num_experts", 0), ("num_shared_experts", 2),
                                         ("interleave_step", 0)])
def test_invalid_moe_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"moe.{field}"):
        MoEConfig(**{**{"num_experts": 4}, field: value})


def test_invalid_rope_scaling_names_the_field():
    with pytest.raises(ValueError, match="rope_scaling.high_freq_factor"):
        RopeScaling(8.0, 4.0, 1.0, 8192)


def test_native_dict_round_trip_and_unknown_keys():
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_dict({**PRESETS["debug"].to_dict(), "n_layer": 3})


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_config_round_trip(name):
    cfg = PRESETS[name]
    d = to_hf_config(cfg)
    assert from_hf_config(json.loads(json.dumps(d))) == cfg
    assert d["model_type"] == ("llama4" if cfg.vision else "llama4_text")


def test_reads_hub_style_scout_config():
    """The 4.51-era Scout config spelling: rope_theta + rope_scaling, int temperature tuning."""
    hub = {
        "model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {
            "model_type": "llama4_text", "hidden_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
            "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
            "no_rope_layers": [1, 1, 1, 0] * 12, "attention_chunk_size": 8192, "use_qk_norm": True,
            "attn_temperature_tuning": 4, "floor_scale": 8192, "attn_scale": 0.1, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
            "rms_norm_eps": 1e-5, "vocab_size": 202048, "max_position_embeddings": 10485760,
            "tie_word_embeddings": False, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
            "pad_token_id": 200018,
        },
        "vision_config": {
            "model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34,
            "num_attention_heads": 16, "intermediate_size": 5632, "image_size": 336, "patch_size": 14,
            "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096, "projector_output_dim": 4096,
            "vision_output_dim": 4096, "rope_theta": 10000, "norm_eps": 1e-5, "hidden_act": "gelu",
            "multi_modal_projector_bias": False, "vision_feature_layer": -1,
        },
        "image_token_index": 200092, "boi_token_index": 200080, "eoi_token_index": 200081,
    }
    assert from_hf_config(hub) == PRESETS["scout"]
    with pytest.raises(ValueError, match="vision_output_dim"):
        from_hf_config({**hub, "vision_config": {**hub["vision_config"], "vision_output_dim": 7680}})


def test_matches_transformers_config_derivation():
    from hf_reference import hf_text_config

    for name in ("debug", "maverick", "scout"):
        cfg = PRESETS[name]
        hf = hf_text_config(cfg)
        assert list(hf.moe_layers) == list(cfg.moe_layers)
        assert [bool(x) for x in hf.no_rope_layers] == list(cfg.rope_layers)


def test_transformers_model_has_same_parameter_count():
    from hf_reference import hf_text_config, transformers

    for name in ("debug", "mini-maverick"):
        cfg = PRESETS[name]
        with torch.device("meta"):
            hf = transformers.Llama4ForCausalLM(hf_text_config(cfg))
        assert sum(p.numel() for p in hf.parameters()) == cfg.num_params()
    d = to_hf_config(PRESETS["scout"])  # the whole multimodal model: 108,641,793,536
    del d["model_type"], d["architectures"]
    with torch.device("meta"):
        hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(**d))
    assert sum(p.numel() for p in hf.parameters()) == PRESETS["scout"].num_params() == 108_641_793_536


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_config_file(tmp_path / "missing.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_config_file(bad)
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type"):
        load_config_file(bad)

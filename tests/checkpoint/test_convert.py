"""HF <-> native conversion: key maps, loading transformers directories (single file, sharded, multimodal,
per-expert layout), export to transformers, lossless round trips, and errors in malformed HF checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import behemoth
from behemoth.checkpoint import CheckpointError, export_hf, save_model
from behemoth.checkpoint.convert import hf_to_native_key, is_native_only, native_to_hf_key, write_safetensors
from behemoth.model import Transformer

# fp32 logits against transformers. Measured on CPU (torch 2.13, transformers 5.23.0), every comparison in this
# file, text and images, run three times: max |diff| 1.9e-7 to 2.4e-7 with logits up to ~1.2 (a few fp32 ulps).
# The tolerance leaves a margin of about 8x and still sees small slips that a 1e-4 bound would pass: the vision
# tower's GELU on its tanh approximation moves the image logits by 1.6e-5 to 2.7e-5.
TOL = 2e-6


def run(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids) if not isinstance(model, Transformer) else model(ids)
    return getattr(out, "logits", out)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors directory (single file or shards), read with safetensors only."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---- key maps ------------------------------------------------------------------------------------

def test_every_native_key_maps_to_hf_and_back(cfg):
    assert cfg.moe_layers and len(cfg.moe_layers) < cfg.n_layers  # dense and MoE layers both present
    with torch.device("meta"):
        keys = [k for k in Transformer(cfg).state_dict() if not is_native_only(k)]
    assert any(k.endswith("experts.w13") for k in keys) and any(k.endswith("feed_forward.w1.weight") for k in keys)
    for prefix in ("", "language_model."):
        hf_keys = [native_to_hf_key(k, prefix) for k in keys]
        assert len(set(hf_keys)) == len(keys)  # injective
        for k, hk in zip(keys, hf_keys, strict=True):
            assert hk.startswith(prefix + "model.") or hk == prefix + "lm_head.weight"
            assert hf_to_native_key(hk, prefix) == k


def test_native_keys_are_exactly_transformers_keys(hf_causal):
    hf, ours = hf_causal
    assert {native_to_hf_key(k) for k in ours.state_dict() if not is_native_only(k)} == set(hf.state_dict())


def test_key_map_unknown_names():
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wqkv\.weight"):
        native_to_hf_key("layers.0.attention.wqkv.weight")
    assert hf_to_native_key("model.layers.0.self_attn.qkv_proj.weight") is None
    assert hf_to_native_key("model.norm.weight", "language_model.") is None  # prefix required
    assert hf_to_native_key("language_model.model.norm.weight", "language_model.") == "norm.weight"
    assert hf_to_native_key("model.layers.12.feed_forward.shared_expert.up_proj.weight") == (
        "layers.12.feed_forward.shared_expert.w3.weight")
    assert hf_to_native_key("model.layers.12.feed_forward.up_proj.weight") == "layers.12.feed_forward.w3.weight"


# ---- loading transformers directories --------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_transformers_causal_lm(layout, hf_causal, hf_dir, hf_sharded_dir, ids):
    hf, ours = hf_causal
    d = hf_dir if layout == "single" else hf_sharded_dir
    if layout == "sharded":
        assert (d / "model.safetensors.index.json").is_file()
        assert len(list(d.glob("model-*-of-*.safetensors"))) > 5
    else:
        assert (d / "model.safetensors").is_file()
    model = behemoth.load_model(str(d))
    assert max_diff(run(model, ids), run(hf, ids)) <= TOL
    assert_bitwise_equal(model.state_dict(), ours.state_dict())


def hf_multimodal(cfg):
    pytest.importorskip("transformers")
    from hf_reference import hf_multimodal as build

    return build(cfg)


def image_prompt(cfg, tiles: int, seed: int = 0):
    """Token ids with `tiles` blocks of <|patch|> tokens among text, and matching random tiles."""
    g = torch.Generator().manual_seed(seed)
    T, patch = cfg.vision.tokens_per_tile, cfg.image_token_id
    parts = [torch.randint(3, 200, (5,), generator=g)]
    for _ in range(tiles):
        parts += [torch.full((T,), patch), torch.randint(3, 200, (3,), generator=g)]
    pixels = torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return torch.cat(parts)[None], pixels


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_transformers_conditional_generation(shard, mm_cfg, ids, tmp_path):
    """Text model, vision tower and projector load from a (sharded) multimodal directory; logits match
    for text alone and with images of one and of several tiles."""
    hf = hf_multimodal(mm_cfg)
    out = tmp_path / "mm"
    hf.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    stored = all_tensors(out)
    assert any(k.startswith("vision_model.model.layers.1.") for k in stored)
    assert any(k.startswith("language_model.model.layers.1.feed_forward.experts.") for k in stored)
    model = behemoth.load_model(str(out))
    assert model.config == mm_cfg
    assert max_diff(run(model, ids), run(hf, ids)) <= TOL
    for tiles in (1, 3):
        prompt, pixels = image_prompt(mm_cfg, tiles, seed=tiles)
        with torch.no_grad():
            ref = hf(input_ids=prompt, pixel_values=pixels).logits
            got = model(prompt, pixel_values=pixels)
        assert max_diff(got, ref) <= TOL, f"{tiles} tile(s)"


def test_multimodal_export_round_trip(mm_cfg, make_model, tmp_path):
    """native -> transformers (`Llama4ForConditionalGeneration`, loadable by `from_pretrained`) -> native."""
    transformers = pytest.importorskip("transformers")
    model = make_model(mm_cfg)
    export_hf(model, tmp_path / "hf")
    hf = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    prompt, pixels = image_prompt(mm_cfg, 2)
    with torch.no_grad():
        assert max_diff(model(prompt, pixel_values=pixels), hf(input_ids=prompt, pixel_values=pixels).logits) <= TOL
    back = behemoth.load_model(str(tmp_path / "hf"))
    assert_bitwise_equal(back.state_dict(), model.state_dict())


def test_patch_count_mismatch_is_a_clear_error(mm_cfg, make_model):
    model = make_model(mm_cfg)
    prompt, pixels = image_prompt(mm_cfg, 2)
    with pytest.raises(ValueError, match="8 <\\|patch\\|> tokens .* 3 image tiles give 3 x 4 = 12 features"):
        model(prompt, pixel_values=torch.cat([pixels, pixels[:1]]))
    with pytest.raises(ValueError, match="no vision tower"):
        make_model()(prompt, pixel_values=pixels)


def test_load_transformers_tied_embeddings(cfg, make_model, ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model(cfg.replace(tie_word_embeddings=True))
    export_hf(model, tmp_path / "ours")
    assert "lm_head.weight" not in all_tensors(tmp_path / "ours")
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(run(hf, ids), run(model, ids)) <= TOL
    hf.save_pretrained(tmp_path / "theirs")
    back = behemoth.load_model(str(tmp_path / "theirs"))
    assert back.output is None
    assert torch.equal(run(back, ids), run(model, ids))


# ---- per-expert layout -----------------------------------------------------------------------------

def to_per_expert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split fused `experts.gate_up_proj` [E, D, 2F] / `experts.down_proj` [E, F, D] into per-expert
    `experts.{e}.{gate,up,down}_proj.weight` in the [out, in] layout of nn.Linear."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".experts.gate_up_proj"):
            base, F = k.removesuffix("gate_up_proj"), v.shape[-1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :, :F].T.contiguous()
                out[f"{base}{e}.up_proj.weight"] = v[e, :, F:].T.contiguous()
        elif k.endswith(".experts.down_proj"):
            base = k.removesuffix("down_proj")
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].T.contiguous()
        else:
            out[k] = v
    return out


def write_hf_dir(src: Path, dst: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    write_safetensors(tensors, dst, max_shard_bytes)
    return dst


@pytest.mark.parametrize("max_shard_bytes", [None, 6_000])
def test_per_expert_layout_is_stacked(max_shard_bytes, hf_causal, hf_dir, ids, tmp_path):
    hf, ours = hf_causal
    split = to_per_expert(load_file(hf_dir / "model.safetensors"))
    assert "model.layers.1.feed_forward.experts.3.down_proj.weight" in split
    assert not any(k.endswith("gate_up_proj") for k in split)
    d = write_hf_dir(hf_dir, tmp_path / "per_expert", split, max_shard_bytes)
    if max_shard_bytes:  # one expert tensor's parts spread over several shards
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        assert len({index[f"model.layers.1.feed_forward.experts.{e}.gate_proj.weight"] for e in range(4)}) > 1
    model = behemoth.load_model(str(d))
    assert_bitwise_equal(model.state_dict(), ours.state_dict())
    assert max_diff(run(model, ids), run(hf, ids)) <= TOL


# ---- export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_export_hf_loads_in_transformers(max_shard_bytes, make_model, ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model()
    d = export_hf(model, tmp_path / "hf", max_shard_bytes=max_shard_bytes)
    assert (d / "model.safetensors.index.json").is_file() == bool(max_shard_bytes)
    hf = transformers.Llama4ForCausalLM.from_pretrained(d).eval()
    hf_state = hf.state_dict()
    for k, v in model.state_dict().items():  # every weight was loaded, none freshly initialised
        if not is_native_only(k):
            assert torch.equal(hf_state[native_to_hf_key(k)], v), k
    assert max_diff(run(hf, ids), run(model, ids)) <= TOL


def test_export_dense_only_model(cfg, make_model, ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model(cfg.replace(moe=None))
    hf = transformers.Llama4ForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf")).eval()
    assert max_diff(run(hf, ids), run(model, ids)) <= TOL
    assert behemoth.load_model(str(tmp_path / "hf")).config == model.config


def test_export_refuses_what_transformers_cannot_express(cfg, tmp_path):
    with torch.device("meta"):
        model = Transformer(cfg.replace(moe={"num_shared_experts": 0}))
    with pytest.raises(ValueError, match="num_shared_experts"):
        export_hf(model, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_hf_native_hf_native_is_lossless(hf_dir, tmp_path):
    n1 = save_model(behemoth.load_model(str(hf_dir)), tmp_path / "n1")
    h2 = export_hf(behemoth.load_model(str(n1)), tmp_path / "h2")
    n3 = save_model(behemoth.load_model(str(h2)), tmp_path / "n3")
    assert_bitwise_equal(all_tensors(h2), all_tensors(hf_dir))
    assert_bitwise_equal(all_tensors(n3), all_tensors(n1))
    assert json.loads((n3 / "config.json").read_text()) == json.loads((n1 / "config.json").read_text())


# ---- malformed transformers directories ---------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A transformers-format directory written by `export_hf` (single file) and a sharded one."""
    model = behemoth.build_model(behemoth.PRESETS["debug"])
    base = tmp_path_factory.mktemp("exported")
    return export_hf(model, base / "single"), export_hf(model, base / "sharded", max_shard_bytes=20_000)


@pytest.fixture
def single(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported[0], tmp_path / "single"))


@pytest.fixture
def sharded(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported[1], tmp_path / "sharded"))


def edit_single(d: Path, edit) -> Path:
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return f


def load_error(d: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        behemoth.load_model(str(d))
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_tensor(single):
    f = edit_single(single, lambda t: t.pop("model.layers.2.post_attention_layernorm.weight"))
    msg = load_error(single)
    assert str(f) in msg and "missing" in msg and "model.layers.2.post_attention_layernorm.weight" in msg


def test_unexpected_tensor(single):
    f = edit_single(single, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    msg = load_error(single)
    assert str(f) in msg and "unexpected" in msg and "model.layers.0.self_attn.q_norm.weight" in msg


def test_tensor_of_a_layer_beyond_the_config_is_unexpected(single):
    f = edit_single(single, lambda t: t.update({"model.layers.4.input_layernorm.weight": torch.ones(64)}))
    msg = load_error(single)
    assert str(f) in msg and "model.layers.4.input_layernorm.weight" in msg


def test_misshaped_tensor(single):
    f = edit_single(single, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(31, 64)}))
    msg = load_error(single)
    assert str(f) in msg and "model.layers.1.self_attn.k_proj.weight" in msg
    assert "[31, 64]" in msg and "[32, 64]" in msg


def test_truncated_file(single):
    f = single / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    msg = load_error(single)
    assert str(f) in msg


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-10])
    msg = load_error(sharded)
    assert str(shard) in msg


def test_not_a_safetensors_file(single):
    f = single / "model.safetensors"
    f.write_bytes(b"\x80\x04garbage that is not a safetensors header")
    assert str(f) in load_error(single)


def _index(d: Path) -> tuple[Path, dict]:
    f = d / "model.safetensors.index.json"
    return f, json.loads(f.read_text())


def test_index_entry_points_to_missing_file(sharded):
    index_file, index = _index(sharded)
    key = "model.layers.3.feed_forward.router.weight"
    (sharded / index["weight_map"][key]).unlink()
    msg = load_error(sharded)
    assert str(index_file) in msg and "missing file" in msg and index["weight_map"][key] in msg


def test_key_in_index_but_not_in_its_shard(sharded):
    index_file, index = _index(sharded)
    key = "model.norm.weight"
    other = next(f for f in index["weight_map"].values() if f != index["weight_map"][key])
    index["weight_map"][key] = other
    index_file.write_text(json.dumps(index))
    msg = load_error(sharded)
    assert str(sharded / other) in msg and key in msg and "not in the file" in msg


def test_key_missing_from_index(sharded):
    index_file, index = _index(sharded)
    del index["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    index_file.write_text(json.dumps(index))
    msg = load_error(sharded)
    assert str(index_file) in msg and "missing" in msg and "model.layers.0.self_attn.o_proj.weight" in msg


@pytest.mark.parametrize("text", ["{not json", "[]", '{"metadata": {}}', '{"weight_map": ["a"]}'])
def test_invalid_index(sharded, text):
    index_file = sharded / "model.safetensors.index.json"
    index_file.write_text(text)
    msg = load_error(sharded)
    assert str(index_file) in msg and "index" in msg


def test_index_file_name_outside_the_directory(sharded, tmp_path):
    index_file, index = _index(sharded)
    key = "model.norm.weight"
    shutil.copy(sharded / index["weight_map"][key], tmp_path / "outside.safetensors")
    index["weight_map"][key] = "../outside.safetensors"
    index_file.write_text(json.dumps(index))
    msg = load_error(sharded)
    assert str(index_file) in msg and key in msg and "../outside.safetensors" in msg


def split_experts(t: dict[str, torch.Tensor]) -> None:
    """In place: the fused expert tensors replaced by the per-expert layout."""
    split = to_per_expert(t)
    t.clear()
    t.update(split)


def test_per_expert_missing_expert(single):
    key = "model.layers.3.feed_forward.experts.2.up_proj.weight"
    f = edit_single(single, lambda t: (split_experts(t), t.pop(key)))
    msg = load_error(single)
    assert str(f) in msg and "missing" in msg and key in msg


def test_per_expert_wrong_number_of_experts(single):
    def drop_last_expert(t):
        split_experts(t)
        for k in [k for k in t if ".layers.1.feed_forward.experts.3." in k]:
            del t[k]

    f = edit_single(single, drop_last_expert)
    msg = load_error(single)
    assert str(f) in msg and "model.layers.1.feed_forward.experts.N" in msg and "expected 4" in msg


def test_per_expert_misshaped_part(single):
    key = "model.layers.1.feed_forward.experts.0.down_proj.weight"

    def edit(t):
        split_experts(t)
        t[key] = t[key][:, :63].contiguous()

    f = edit_single(single, edit)
    msg = load_error(single)
    assert str(f) in msg and key in msg and "[64, 63]" in msg and "expected [64, 64]" in msg


def test_fused_and_per_expert_together_is_an_error(single):
    f = edit_single(single, lambda t: t.update(
        {k: v for k, v in to_per_expert(t).items() if ".layers.3.feed_forward.experts." in k}))
    msg = load_error(single)
    assert str(f) in msg and "per-expert" in msg and "model.layers.3.feed_forward.experts" in msg


def test_not_a_llama4_config(single):
    cfg_file = single / "config.json"
    d = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**d, "model_type": "llama"}))
    msg = load_error(single)
    assert str(cfg_file) in msg and "llama" in msg

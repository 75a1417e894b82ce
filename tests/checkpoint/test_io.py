"""Native checkpoint directories: save/load round trips, dtype, loaded-model state, streaming, atomic writes,
directory and config errors, and no pickle anywhere."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import behemoth
from behemoth.checkpoint import CheckpointError, export_hf, save_model
from behemoth.checkpoint import model_dir as ckpt_io
from behemoth.model.moe import MoE


def run(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        behemoth.load_model(str(path))
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ---- round trips -----------------------------------------------------------------------------------

def test_native_round_trip(native_dir, ids):
    model, d = native_dir
    loaded = behemoth.load_model(str(d))
    assert loaded.config == model.config
    assert_same_state(loaded, model)
    assert torch.equal(run(loaded, ids), run(model, ids))


def test_native_directory_contents(native_dir):
    model, d = native_dir
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    config = json.loads((d / "config.json").read_text())
    assert config["format"] == "behemoth"
    assert behemoth.ModelConfig.from_dict(config["model"]) == model.config
    meta = json.loads((d / "meta.json").read_text())
    assert meta["format"] == "behemoth" and meta["format_version"] == 1
    assert meta["dtypes"] == ["float32"]
    assert meta["total_params"] == model.config.num_params() == sum(p.numel() for p in model.parameters())
    assert meta["active_params"] == model.config.num_active_params()
    assert set(load_file(d / "model.safetensors")) == set(model.state_dict())  # Meta-style names


def test_native_sharded_round_trip(make_model, ids, tmp_path):
    model = make_model()
    d = save_model(model, tmp_path / "ckpt", max_shard_bytes=20_000, step=7)
    shards = sorted(d.glob("model-*-of-*.safetensors"))
    assert len(shards) > 5 and not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 20_000 + 1_000 or len(load_file(s)) == 1 for s in shards)
    assert json.loads((d / "meta.json").read_text())["step"] == 7
    loaded = behemoth.load_model(str(d))
    assert_same_state(loaded, model)
    assert torch.equal(run(loaded, ids), run(model, ids))


def test_tied_embeddings_round_trip(cfg, make_model, ids, tmp_path):
    model = make_model(cfg.replace(tie_word_embeddings=True))
    loaded = behemoth.load_model(str(save_model(model, tmp_path / "ckpt")))
    assert loaded.output is None
    assert_same_state(loaded, model)
    assert torch.equal(run(loaded, ids), run(model, ids))


def test_load_with_dtype(native_dir, ids):
    model, d = native_dir
    loaded = behemoth.load_model(str(d), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k
    assert run(loaded, ids).dtype == torch.bfloat16


def test_bf16_checkpoint_keeps_its_dtype(make_model, tmp_path):
    model = make_model().to(torch.bfloat16)
    d = save_model(model, tmp_path / "ckpt")
    assert json.loads((d / "meta.json").read_text())["dtypes"] == ["bfloat16"]
    loaded = behemoth.load_model(str(d))
    assert_same_state(loaded, model)
    export_hf(loaded, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_same_state(behemoth.load_model(str(tmp_path / "hf")), model)


# ---- the loaded model --------------------------------------------------------------------------------

def test_loaded_model_is_materialised_and_in_eval_mode(native_dir, hf_dir):
    for d in (native_dir[1], hf_dir):
        model = behemoth.load_model(str(d))
        assert not any(p.is_meta for p in model.parameters())
        assert not any(b.is_meta for b in model.buffers())
        assert all(p.device.type == "cpu" for p in model.parameters())
        moes = [m for m in model.modules() if isinstance(m, MoE)]
        assert len(moes) == len(model.config.moe_layers) > 0
        for m in moes:
            assert m.tokens_per_expert.device.type == "cpu" and m.tokens_per_expert.dtype == torch.float32
            assert torch.equal(m.tokens_per_expert, torch.zeros(model.config.moe.num_experts))
            assert "tokens_per_expert" not in m.state_dict()  # still non-persistent
        assert not model.training and not any(m.training for m in model.modules())
        storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
        assert len(set(storages)) == len(storages)  # every weight has its own storage


def test_routing_counters_work_after_load(native_dir, ids):
    model = behemoth.load_model(str(native_dir[1])).train()
    with torch.no_grad():
        model(ids)
    for m in model.modules():
        if isinstance(m, MoE):
            assert m.tokens_per_expert.sum().item() == ids.numel() * m.top_k


def test_loading_streams_tensors(native_dir, monkeypatch):
    """Each stored tensor is released once converted: while reading, at most a couple of earlier raw
    tensors are alive (never the whole checkpoint next to the converted model)."""
    real = ckpt_io.read_tensors
    refs: list[weakref.ref] = []
    most_alive = []

    def tracking(files, keys):
        for k, t in real(files, keys):
            most_alive.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(t))
            yield k, t
            del t

    monkeypatch.setattr(ckpt_io, "read_tensors", tracking)
    model = behemoth.load_model(str(native_dir[1]), dtype=torch.bfloat16)
    n = len(model.state_dict())
    assert len(refs) == n > 20
    assert max(most_alive) <= 2
    assert all(r() is None for r in refs)


# ---- atomic writes -----------------------------------------------------------------------------------

def test_save_refuses_non_empty_directory(make_model, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty") as info:
        save_model(make_model(), d)
    assert str(d) in str(info.value)
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(make_model(), d)
    assert [p.name for p in d.iterdir()] == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_refuses_a_file_in_the_way(make_model, tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_model(make_model(), f)
    assert f.read_text() == "x"


def test_save_into_empty_directory(make_model, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_model(make_model(), d)
    assert (d / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_nothing(make_model, tmp_path, monkeypatch):
    real = ckpt_io.write_safetensors

    def fail_midway(tensors, directory, *args, **kwargs):
        real(dict(list(tensors.items())[:3]), directory)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io, "write_safetensors", fail_midway)
    for save in (save_model, export_hf):
        with pytest.raises(OSError, match="disk full"):
            save(make_model(), tmp_path / "out" / "ckpt")
        assert list((tmp_path / "out").iterdir()) == []  # no final directory, no temporary one


def test_failed_save_keeps_an_empty_target(make_model, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    with pytest.raises(TypeError):
        save_model(make_model(), d, note=object())  # meta.json cannot encode it: fails after the weights
    assert d.is_dir() and list(d.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ---- directory, config and tensor errors ---------------------------------------------------------------

def test_path_errors(native_dir, tmp_path):
    missing = tmp_path / "nope"
    assert str(missing) in load_error(missing) and "no such directory" in load_error(missing)
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in load_error(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = load_error(empty)
    assert str(empty / "config.json") in msg and "missing" in msg
    nocfg = Path(shutil.copytree(native_dir[1], tmp_path / "nocfg"))
    (nocfg / "config.json").unlink()
    assert str(nocfg / "config.json") in load_error(nocfg)


@pytest.mark.parametrize("text,why", [
    ("{\"format\": \"behemoth\", ", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("{\"model_type\": \"mistral\"}", "not a Llama 4 checkpoint"),
    ("{\"format\": \"behemoth\", \"model\": {\"dim\": 64, \"bogus\": 1}}", "bogus"),
    ("{\"format\": \"behemoth\", \"model\": {\"dim\": -1}}", "dim"),
    ("{\"format\": \"behemoth\"}", "model"),
])
def test_config_errors(native_dir, tmp_path, text, why):
    d = Path(shutil.copytree(native_dir[1], tmp_path / "ckpt"))
    (d / "config.json").write_text(text)
    msg = load_error(d)
    assert str(d / "config.json") in msg and why in msg


def test_no_weights(native_dir, tmp_path):
    d = Path(shutil.copytree(native_dir[1], tmp_path / "ckpt"))
    (d / "model.safetensors").unlink()
    msg = load_error(d)
    assert str(d) in msg and "model.safetensors" in msg


def _edit_native(native_dir, tmp_path, edit) -> Path:
    d = Path(shutil.copytree(native_dir[1], tmp_path / "ckpt"))
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)
    return f


def test_native_missing_tensor(native_dir, tmp_path):
    f = _edit_native(native_dir, tmp_path, lambda t: t.pop("layers.3.feed_forward.experts.w2"))
    msg = load_error(f.parent)
    assert str(f) in msg and "missing" in msg and "layers.3.feed_forward.experts.w2" in msg


def test_native_unexpected_tensor(native_dir, tmp_path):
    f = _edit_native(native_dir, tmp_path, lambda t: t.update({"layers.0.attention.wqkv.weight": torch.zeros(2)}))
    msg = load_error(f.parent)
    assert str(f) in msg and "unexpected" in msg and "layers.0.attention.wqkv.weight" in msg


def test_native_misshaped_tensor(native_dir, tmp_path):
    bad = {"layers.1.feed_forward.experts.w13": torch.zeros(4, 64, 64)}
    f = _edit_native(native_dir, tmp_path, lambda t: t.update(bad))
    msg = load_error(f.parent)
    assert str(f) in msg and "layers.1.feed_forward.experts.w13" in msg and "[4, 64, 64]" in msg
    assert "[4, 64, 128]" in msg


def test_native_truncated_file(native_dir, tmp_path):
    d = Path(shutil.copytree(native_dir[1], tmp_path / "ckpt"))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert str(f) in load_error(d)


# ---- no pickle -------------------------------------------------------------------------------------------

def test_pickle_is_never_loaded(native_dir, hf_sharded_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle must not be used")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, refuse)
    behemoth.load_model(str(native_dir[1]))
    behemoth.load_model(str(hf_sharded_dir))
    # a directory with only a PyTorch pickle is refused, not unpickled
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_sharded_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    msg = load_error(d)
    assert str(d) in msg and "safetensors" in msg


def test_checkpoint_code_has_no_pickle_loading():
    """Only the restricted DCP reader (`safe_dcp`) touches pickle: through its own allow-list unpickler, and
    torch.load only with weights_only=True; nothing else in checkpoint/ unpickles anything."""
    src = Path(ckpt_io.__file__).parent
    for f in src.glob("*.py"):
        text = f.read_text()
        if f.name == "safe_dcp.py":
            calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Call)]
            names = [ast.unparse(c.func) for c in calls]
            assert not {"pickle.load", "pickle.loads"} & set(names), f
            loads = [c for c, name in zip(calls, names, strict=True) if name == "torch.load"]
            assert loads and all(any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in c.keywords)
                                 for c in loads), f
            continue
        assert "torch.load(" not in text and "import pickle" not in text and "pickle.load" not in text, f


def test_router_bias_round_trips_natively_and_blocks_a_lossy_export(make_model, tmp_path):
    model = make_model()
    router = model.layers[1].feed_forward.router
    router.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.25, -0.25]))
    d = save_model(model, tmp_path / "native")
    assert torch.equal(behemoth.load_model(str(d)).layers[1].feed_forward.router.expert_bias, router.expert_bias)
    with pytest.raises(CheckpointError, match="expert_bias is non-zero"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(model, tmp_path / "hf", drop_router_bias=True)
    assert not behemoth.load_model(str(tmp_path / "hf")).layers[1].feed_forward.router.expert_bias.any()


def test_sharded_model_directory_in_one_process(tmp_path):
    """`save_sharded_model` (torch.distributed.checkpoint files) round-trips bitwise through `load_model`;
    a config that does not fit the files, or an existing target, is a one-line error naming the directory."""
    import json

    import behemoth
    from behemoth.checkpoint.model_dir import CheckpointError, save_sharded_model

    model = behemoth.build_model("debug", seed=3)
    save_sharded_model(model, tmp_path / "m")
    back = behemoth.load_model(str(tmp_path / "m"))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["sharded"] is True
    with pytest.raises(CheckpointError, match="already exists"):
        save_sharded_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["ffn_dim"] = 96
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"m/model.dcp: cannot be read into this config"):
        behemoth.load_model(str(tmp_path / "m"))


def test_a_process_alone_writes_its_sharded_model_whatever_its_rank_variable_says(tmp_path, monkeypatch):
    """Outside a process group this process is the whole run: a RANK left in its environment (a launcher's)
    does not stop it from publishing what it wrote."""
    from behemoth.checkpoint.model_dir import save_sharded_model

    monkeypatch.setenv("RANK", "1")
    model = behemoth.build_model("debug", seed=3)
    save_sharded_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file() and not list(tmp_path.glob(".m.*"))
    back = behemoth.load_model(str(tmp_path / "m"))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))

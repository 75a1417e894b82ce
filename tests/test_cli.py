"""The CLI as a user runs it: real subprocesses for the entry point, `main()` for the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from behemoth import build_model
from behemoth.checkpoint import save_model
from behemoth.cli import main
from behemoth.data.tokenizer import Tokenizer


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "behemoth", *args], capture_output=True, text=True, timeout=300)


def test_info_json_as_subprocess():
    r = run("info", "--preset", "scout", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["total_params"] == 108_641_793_536 and d["active_params"] == 17_172_894_720
    assert d["components"]["vision_tower"]["total"] == 850_960_896
    assert set(d["components"]) >= {"embeddings", "attention", "routed_experts", "shared_experts", "dense_ffn",
                                    "norms"}


def test_info_table_marks_behemoth_as_estimate(capsys):
    assert main(["info", "--preset", "behemoth"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE" in out and "2,014,543,888,384" in out


@pytest.mark.parametrize("sub", ["info", "convert", "train", "distill", "codistill", "eval", "demo", "generate",
                                 "chat", "serve"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["info", "--preset", "nope"],
    ["info", "--config", "/no/such/config.json"],
    ["info"],
    ["frobnicate"],
    ["convert", "hf-to-native", "/no/such/dir", "/tmp/x"],
    ["convert", "sideways", "a", "b"],
    ["info", "--preset", "debug", "--context", "0"],
    ["info", "--config", "/tmp"],  # a directory that is neither a model nor a run
    ["train", "--model.config_file=/tmp"],  # a directory where a config.json is meant
])
def test_bad_input_is_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err


def test_bad_input_subprocess_has_no_traceback():
    r = run("info", "--preset", "nope")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_info_reports_the_kv_cache(capsys):
    assert main(["info", "--preset", "scout", "--context", "1000000", "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv_cache"]
    per_token_layer = 2 * 8 * 128 * 2  # K and V, 8 KV heads of 128, bf16
    assert kv["slots"] == {"chunked": 8192, "global": 1_000_000}
    assert kv["bytes"]["chunked"] == 36 * 8192 * per_token_layer  # 36 chunked layers keep one chunk
    assert kv["bytes"]["global"] == 12 * 1_000_000 * per_token_layer  # 12 NoPE layers keep everything


def test_convert_round_trip_and_refuses_to_overwrite(tmp_path, capsys):
    model = build_model("debug")
    save_model(model, tmp_path / "native")
    Tokenizer.from_chars("abc").save(tmp_path / "native")
    assert main(["convert", "native-to-hf", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert Tokenizer.load(tmp_path / "hf").fingerprint == Tokenizer.load(tmp_path / "native").fingerprint
    assert main(["convert", "hf-to-native", str(tmp_path / "hf"), str(tmp_path / "native2")]) == 0
    before = sorted(p.name for p in (tmp_path / "native2").iterdir())
    assert main(["convert", "hf-to-native", str(tmp_path / "hf"), str(tmp_path / "native2")]) == 2
    assert sorted(p.name for p in (tmp_path / "native2").iterdir()) == before
    assert main(["convert", "hf-to-native", str(tmp_path / "native"), str(tmp_path / "x")]) == 2
    assert "not hf" in capsys.readouterr().err


def test_runtime_does_not_import_transformers():
    code = ("import sys, torch, behemoth; from behemoth.cli import main; "
            "behemoth.build_model('debug')(torch.zeros(1, 4, dtype=torch.long)); main(['info', '--preset', 'debug']); "
            "assert 'transformers' not in sys.modules, 'transformers imported at run time'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_info_and_plan_take_a_run_directory(tmp_path, capsys):
    """`--config` names a config.json, a model directory or a run directory (its latest checkpoint's)."""
    step = tmp_path / "run" / "checkpoints" / "step_0000003"
    save_model(build_model("debug"), step)
    (step / "train_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text(step.name)
    assert main(["info", "--config", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 255_040
    assert main(["plan", "--config", str(tmp_path / "run"), "--mode", "serve", "--gpus", "1", "--gpu-mem-gb", "1",
                 "--precision", "bf16"]) == 0

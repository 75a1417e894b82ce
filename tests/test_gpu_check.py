"""benchmarks/gpu_check.py: the dry run executes every planned item on the CPU at toy sizes and leaves its JSON
with device and versions, so that the one GPU run cannot die of a typo; a failing item is recorded, not fatal."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


gpu_check = _load()

# What each item's own result holds once the benchmark's measuring code has run (not only its parser).
RAN = {
    "pytest_gpu": lambda r: {t["test"].split("::")[-1] for t in r["tests_run"]} >= {
        "test_cuda_forward_matches_cpu_fp32", "test_cuda_bf16_grouped_moe_matches_loop"},
    "moe_scout": lambda r: r["results"]["ours"]["fwd_bwd"]["median_ms"] > 0
    and "median_ms" in r["results"]["hf"]["fwd_bwd"],
    "moe_maverick": lambda r: r["results"]["ours"]["fwd"]["median_ms"] > 0 and r["config"]["experts"] == 8,
    "train_bench1b": lambda r: all("tokens_per_s" in r["results"]["debug"][k] for k in ("ours", "ours_bf16", "hf")),
    "distill": lambda r: (set(r["median_ms"]) == {"distill", "teacher", "student", "hf_distill", "hf_teacher"}
                          and r["config"]["bf16"] and r["config"]["hf_teacher"] == "qwen2"),
    "decode_b1": lambda r: r["models"][0]["runs"][0]["batch"] == 1 and "ours_compile" in r["models"][0]["runs"][0],
    "decode_b8": lambda r: r["models"][0]["runs"][0]["batch"] == 8 and "hf" in r["models"][0]["runs"][0],
    "parallel_fsdp1": lambda r: [x.get("parallel") for x in r["results"]] == [None, "fsdp"],
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_dry")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--jobs", "2", "--out", str(out)], cwd=ROOT,
                          env=NO_GPU, capture_output=True, text=True, timeout=600)
    return out, proc


def test_dry_run_runs_every_item_through_its_measuring_code(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert set(RAN) == set(gpu_check.PLAN)
    summary = json.loads((out / "summary.json").read_text())
    assert [i["item"] for i in summary["items"]] == list(gpu_check.PLAN)
    for name, item in gpu_check.PLAN.items():
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["status"] == "ok", (name, rec["error"])
        assert rec["device"]["type"] == "cpu" and rec["device"]["name"]
        assert {"python", "torch", "transformers", "cuda", "gpu"} <= set(rec["versions"])
        assert rec["versions"]["torch"] and rec["versions"]["python"]
        assert rec["command"][1:1 + len(item.argv)] == list(item.argv)  # the GPU command line, then toy sizes
        assert rec["headline"] and not rec["headline"].startswith("?"), (name, rec["headline"])
        assert RAN[name](rec["result"]), name


def test_dry_run_prints_the_table(dry_run):
    _, proc = dry_run
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:4] == ["item", "status", "seconds", "headline"])
    rows = [ln.split()[:2] for ln in lines[header + 1:header + 1 + len(gpu_check.PLAN)]]
    assert rows == [[name, "ok"] for name in gpu_check.PLAN]


def test_a_crash_or_timeout_is_that_items_error(tmp_path):
    args = argparse.Namespace(out=tmp_path, dry_run=False)
    for sub in ("raw", "logs"):
        (tmp_path / sub).mkdir()
    info = {"device": {"type": "cpu"}, "versions": {"pytest": None}}
    env = gpu_check.child_env(dry=False)
    crash = gpu_check.Item("crash", "", 5, ("-c", "raise SystemExit('out of luck')"), (), str)
    sleepy = gpu_check.Item("sleepy", "", 5, ("-c", "import time; time.sleep(60)"), (), str)
    tests = gpu_check.Item("tests", "", 5, ("-m", "pytest", "-q"), (), str)
    assert gpu_check.run_item(crash, args, env, info, 20).error == "exit 1: out of luck"
    assert gpu_check.run_item(sleepy, args, env, info, 1).status == "timeout"
    assert gpu_check.run_item(tests, args, env, info, 20).status == "skipped"  # pytest not importable there
    late = gpu_check.run_planned(1, crash, args, env, info, time.perf_counter() + 3, [0.0])
    assert late.status == "not_run"  # under 5 s left of the total: not started
    rec = json.loads((tmp_path / "sleepy.json").read_text())
    assert rec["status"] == "timeout" and rec["error"] == "timed out after 1 s" and rec["device"] == {"type": "cpu"}


@pytest.mark.parametrize("argv, message", [
    (["--only", "nosuch"], "unknown item(s) nosuch"),
    (["--jobs", "2"], "only --dry-run runs items side by side"),
    (["--dry-run", "--jobs", "x"], "invalid int value"),
    ([], "sees no CUDA device"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o"), *argv], cwd=ROOT, env=NO_GPU,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr


def test_without_transformers_the_hf_side_is_left_out(tmp_path):
    with_hf = {n: i.command(False, tmp_path / "r", transformers=True) for n, i in gpu_check.PLAN.items()}
    without = {n: i.command(False, tmp_path / "r", transformers=False) for n, i in gpu_check.PLAN.items()}
    assert not any("--skip-hf" in c for c in with_hf.values())
    assert {n for n, c in without.items() if "--skip-hf" in c} == {
        "moe_scout", "moe_maverick", "distill", "train_bench1b", "decode_b1", "decode_b8"}

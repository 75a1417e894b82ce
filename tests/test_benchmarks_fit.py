"""The GPU benchmarks' memory checks (benchmarks/common.py), on the CPU: each benchmark's configurations by the
planner's figures on an 80 GB and a 141 GB GPU, the configuration a benchmark chooses, and the reason a skip
records, down to the results JSON of every script gpu_check.py runs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from behemoth.config import get_preset
from behemoth.plan import step_peak, train_step_memory

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
H100 = 79.1 * 2**30  # what torch reports as an 80 GB H100's total memory (GPU memory makers count GiB)
H200 = 139 * 2**30  # a 141 GB H200
GB = 1e9


@pytest.fixture(scope="module")
def bench():
    """benchmarks/<name>.py as modules (each imports `common` from its own folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        mods = {}
        for name in ("common", "parallel", "train_throughput", "moe_layer", "distill_step", "decode", "gpu_check"):
            spec = importlib.util.spec_from_file_location(name if name == "common" else f"bench_{name}",
                                                          BENCHMARKS / f"{name}.py")
            mods[name] = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mods[name]  # dataclasses resolve annotations through sys.modules
            spec.loader.exec_module(mods[name])
        yield argparse.Namespace(**mods)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_fits_and_the_recorded_reason(bench):
    c = bench.common
    assert c.fits(90 * GB, 100 * GB) and not c.fits(90 * GB + 1, 100 * GB)  # 10% of the device kept free
    assert c.fits(50 * GB, 100 * GB, margin=0.5) and not c.fits(51 * GB, 100 * GB, margin=0.5)
    assert c.fits(1e15, None)  # a CPU run: nothing to check
    rec = c.fit_record(c.Need("x", 79.1 * GB, {"weights": 79.1 * GB}), 80 * GB)
    assert rec["fits"] is False and rec["needs_gb"] == 79.1 and rec["device_gb"] == 80.0
    assert rec["skipped"] == "needs ~79 GB by the planner's model, device has 80 GB (72 GB usable with a 10% margin)"
    assert "skipped" not in c.fit_record(c.Need("x", 1 * GB), 80 * GB)
    assert c.fit_record(c.Need("x", 1 * GB), None)["fits"] is None
    assert c.device_bytes(torch.device("cpu")) is None
    assert c.device_bytes(torch.device("cpu"), assume_gb=80) == 80 * GB


def test_parallel_bench1b_at_8x2048_checkpoints_activations_on_80gb_only(bench):
    p, c = bench.parallel, bench.common
    cfg = get_preset("bench-1b")
    configs = p.configurations("cuda", 1, 2)
    assert configs == [(1, None), (1, 1)]  # one GPU: the plain process and FSDP over one rank
    plain = c.parallel_need(cfg, 8, 2048, 1, None, False, "cuda")
    assert plain.bytes == step_peak(train_step_memory(cfg, 8, 2048, weights="fp32", compute="bf16"))
    assert round(plain.bytes / GB, 1) == 79.1  # ~63 GB of fp32 weights, gradients and AdamW state + activations
    with_ac = c.parallel_need(cfg, 8, 2048, 1, None, True, "cuda")
    assert round(with_ac.bytes / GB, 1) == 62.8
    assert not c.fits(plain.bytes, H100) and not c.fits(plain.bytes, 80 * GB) and c.fits(with_ac.bytes, 80 * GB)

    runs = p.plan_runs(cfg, 8, 2048, configs, "cuda", H100)
    assert [r["activation_checkpointing"] for r in runs] == [True, True]  # all alike
    assert all(r["memory"]["fits"] for r in runs)
    assert [r["memory"]["needs_gb"] for r in runs] == [62.77, 63.29]
    off = p.plan_runs(cfg, 8, 2048, configs, "cuda", H100, checkpointing="off")
    assert [r["memory"]["skipped"][:14] for r in off] == ["needs ~79 GB b", "needs ~79 GB b"]
    roomy = p.plan_runs(cfg, 8, 2048, configs, "cuda", H200)
    assert [r["activation_checkpointing"] for r in roomy] == [False, False] and all(r["memory"]["fits"] for r in roomy)
    # gpu_check's item (2 x 2048) fits an 80 GB GPU as it is
    assert [r["activation_checkpointing"] for r in p.plan_runs(cfg, 2, 2048, configs, "cuda", H100)] == [False, False]
    # the two-GPU configurations: half the batch and a shard of the state on each
    two = p.plan_runs(cfg, 8, 2048, p.configurations("cuda", 2, 2), "cuda", H100)
    assert [(r["processes"], r["ep"]) for r in two] == [(1, None), (1, 1), (2, 1), (2, 2)]
    assert all(r["memory"]["fits"] for r in two) and two[2]["memory"]["needs_gb"] < 40
    # a debug model fits a 1 GB device without checkpointing; on the CPU nothing is checked
    tiny = p.plan_runs(get_preset("debug"), 2, 32, configs, "cuda", 1 * GB)
    assert all(r["memory"]["fits"] and not r["activation_checkpointing"] for r in tiny)
    cpu = p.plan_runs(get_preset("mini-maverick"), 8, 256, p.configurations("cpu", 0, 2), "cpu", None)
    assert len(cpu) == 4 and all(r["memory"]["fits"] is None and not r["activation_checkpointing"] for r in cpu)


def test_train_throughput_skips_what_does_not_fit(bench):
    t = bench.train_throughput
    args = t.parse_args(["--preset", "h100"])  # bench-1b, 2 x 4096, bf16, one implementation on the GPU at a time
    names = ["ours", "ours_bf16", "hf"]
    cfg = get_preset("bench-1b")
    on_h100 = t.check_memory(cfg, args, names, H100)
    assert all(r["fits"] for r in on_h100.values())
    assert {k: round(r["needs_gb"]) for k, r in on_h100.items()} == {"ours": 67, "ours_bf16": 35, "hf": 62}
    # transformers runs every expert on every token: its activations are the biggest part
    assert max(on_h100["hf"]["parts_gb"], key=on_h100["hf"]["parts_gb"].get) == "activations"
    on_40gb = t.check_memory(cfg, args, names, 40 * GB)
    assert [k for k, r in on_40gb.items() if "skipped" in r] == ["ours", "hf"]
    assert on_40gb["ours"]["skipped"].startswith("needs ~67 GB by the planner's model, device has 40 GB")
    args.resident = "all"  # held together, the needs add up
    together = t.check_memory(cfg, args, names, H200)
    assert all("every implementation at once" in r["skipped"] for r in together.values())
    assert t.check_memory(get_preset("debug"), t.parse_args(["--models", "debug"]), names, 1 * GB)["hf"]["fits"]


def test_moe_layer_builds_transformers_only_where_it_fits(bench):
    m = bench.moe_layer
    cpu = m.parse_args(["--preset", "cpu"])
    checks = m.check_memory(cpu, torch.device("cpu"))  # nothing to check on the CPU
    assert all(rec["fits"] is None for by_mode in checks.values() for rec in by_mode.values())
    scout = m.parse_args(["--preset", "scout-h100", "--assume-device-gb", str(H100 / GB)])
    checks = m.check_memory(scout, torch.device("cuda"))
    assert set(checks) == {"ours", "hf", "dense"} and not scout.skip_hf
    assert all(rec["fits"] for by_mode in checks.values() for rec in by_mode.values())
    assert round(checks["hf"]["fwd_bwd"]["needs_gb"]) == 52  # every expert on all 32k tokens
    mav = m.parse_args(["--preset", "maverick-h100", "--assume-device-gb", str(H100 / GB)])
    mav.skip_hf = False  # what the preset leaves out by default: its repeated input alone is 86 GB
    checks = m.check_memory(mav, torch.device("cuda"))
    assert mav.skip_hf and checks["hf"]["fwd"]["skipped"].startswith("needs ~569 GB by the planner's model")
    assert checks["ours"]["fwd"]["fits"] and round(checks["ours"]["fwd"]["needs_gb"]) == 42


def test_distill_and_decode_fit_one_gpu(bench):
    c, d = bench.common, bench.distill_step
    teacher, student = get_preset("mini-behemoth"), get_preset("mini-maverick")
    args = argparse.Namespace(teacher="mini-behemoth", student="mini-maverick", batch=8, seq_len=2048, bf16=True,
                              hf_teacher="qwen2", assume_device_gb=H100 / GB, memory_margin=c.MARGIN)
    rec = d.check_memory(args, torch.device("cuda"))
    assert rec["fits"] and rec["needs_gb"] < 2 and "hf_teacher_skipped" not in rec
    # held in bf16 as training holds a frozen teacher: half the bytes of fp32
    assert rec["parts_gb"]["teacher_weights"] == round(2 * teacher.num_params() / GB, 3)
    with_hf = c.distill_need(teacher, student, 8, 2048, True, True).bytes
    alone = c.distill_need(teacher, student, 8, 2048, True, False).bytes
    args.assume_device_gb = (with_hf + alone) / 2 / 0.9 / GB  # room for all but the transformers teacher
    rec = d.check_memory(args, torch.device("cuda"))
    assert rec["fits"] and rec["hf_teacher_skipped"].startswith("needs ~")
    args.assume_device_gb = 0.1
    assert d.check_memory(args, torch.device("cuda"))["skipped"].startswith("needs ~")
    bench1b = get_preset("bench-1b")
    for batch in (1, 8):
        need = c.decode_need(bench1b, batch, 128, 64, "bfloat16", True)
        assert c.fits(need.bytes, H100) and 15 < need.bytes / GB < 17  # two bf16 copies of 3.9B parameters
    assert "skipped" in c.fit_record(c.decode_need(bench1b, 8, 128, 64, "bfloat16", True), 16 * GB)


SKIPPED_ITEMS = ["moe_scout", "distill", "train_bench1b", "parallel_fsdp1", "decode_b1"]


@pytest.mark.parametrize("name", SKIPPED_ITEMS)
def test_a_skip_is_recorded_in_the_results_json(bench, name, tmp_path):
    """gpu_check's own command line (toy sizes) on a pretended device too small for anything: the script ends
    normally, its JSON says why, and gpu_check's headline shows it."""
    g = bench.gpu_check
    item, raw = g.PLAN[name], tmp_path / "r.json"
    cmd = [sys.executable, *item.command(True, raw), "--assume-device-gb", "1e-6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=g.child_env(dry=True), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "by the planner's model" in proc.stderr  # stated up front
    result = json.loads(raw.read_text())
    reasons = [v for v in _walk(result) if isinstance(v, str) and v.startswith("needs ~")]
    assert reasons and all("by the planner's model, device has 1e-06 GB" in r for r in reasons), reasons
    headline = item.headline(result)
    assert "skipped" in headline and not headline.startswith("?"), headline


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj

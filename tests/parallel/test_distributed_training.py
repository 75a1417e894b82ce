"""Training on 2 processes (torchrun, gloo) follows the one-process loss curve: FSDP over both ranks, and
expert parallelism (EP=2) composed with FSDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_common import train  # noqa: E402

WORKER = Path(__file__).parent / "train_worker.py"
STEPS = 20


@pytest.fixture(scope="module")
def reference():
    return train(STEPS, rank=0, world=1)


@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp2", "ep2-with-fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(tmp_path, reference, ep):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(tmp_path), str(ep), str(STEPS)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.5  # it trains
    for i, (a, b) in enumerate(zip(got, reference, strict=True)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (i, a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"], (i, a, b)

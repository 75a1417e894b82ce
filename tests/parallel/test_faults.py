"""Faults on loopback: two torchrun "nodes" on 127.0.0.1 (c10d rendezvous, one process each, gloo). One node is
killed with SIGKILL mid-run: the survivor stops within seconds with one line that names the step and the last
complete checkpoint, and one process resumes that checkpoint with the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from parallel.test_cli_distributed import RUN, assert_same_curve, records

from behemoth.cli import main

STEPS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(port: int, out: Path, log: Path, *args: str) -> subprocess.Popen:
    """One torchrun "node" of two (its own session, so that killing it kills its worker too)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--max-restarts=0",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=faults", "-m", "behemoth",
           "train", *RUN, f"--train.out_dir={out}", *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def tree(pid: int) -> list[int]:
    """The process and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_node(p: subprocess.Popen) -> None:
    """SIGKILL a node: its launcher and every process under it, at once."""
    for pid in tree(p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()
                if line.strip() and '"train"' in line), default=0)


def two_nodes(tmp_path: Path, steps: int, *args: str) -> tuple[Path, list[Path], subprocess.Popen, subprocess.Popen]:
    """Nodes a (rank 0, hosting the rendezvous store) and b training into one run directory, once `steps` steps are
    logged: (run directory, their logs, a, b). Long runs (100,000 steps): the test stops them."""
    run, port = tmp_path / "run", free_port()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = node(port, run, logs[0], "--train.steps=100000", "--parallel.ep=2", *args)
    time.sleep(1.0)  # a starts the rendezvous first and hosts its store
    b = node(port, run, logs[1], "--train.steps=100000", "--parallel.ep=2", *args)
    deadline = time.monotonic() + 180
    while steps_logged(run) < steps:
        if time.monotonic() > deadline or a.poll() is not None or b.poll() is not None:
            kill_node(a)
            kill_node(b)
            raise AssertionError(logs[0].read_text()[-2000:])
        time.sleep(0.2)
    return run, logs, a, b


def after(event, *nodes: subprocess.Popen) -> float:
    """Seconds from `event()` until every one of `nodes` has exited (at most 90 s; whatever still runs is killed)."""
    t0 = time.monotonic()
    try:
        event()
        for p in nodes:
            p.wait(timeout=90)
        return time.monotonic() - t0
    finally:
        for p in nodes:
            kill_node(p)


def test_a_lost_node_is_reported_in_one_line_and_the_run_resumes(tmp_path):
    run, logs, a, b = two_nodes(tmp_path, 12, "--checkpoint.every=5")
    took = after(lambda: kill_node(b), a)
    out = logs[0].read_text()
    assert a.returncode != 0
    said = [line for line in out.splitlines() if "lost contact with rank" in line]
    assert len(said) == 1, out[-3000:]
    line = said[0]
    assert "rank 0 stopped at step" in line and "lost contact with rank 1 (" in line
    assert "Connection closed" in line or "Connection reset" in line
    assert "last complete checkpoint is" in line and "--resume" in line and ".cc:" not in line
    assert took < 30, took
    assert list(run.glob("failure.rank*.log"))
    # one process resumes the last complete checkpoint; its losses are those of a run never interrupted
    ref = tmp_path / "ref"
    assert main(["train", *RUN, f"--train.steps={STEPS}", f"--train.out_dir={ref}"]) == 0
    assert main(["train", *RUN, f"--train.steps={STEPS}", f"--train.out_dir={run}", "--resume"]) == 0
    assert_same_curve(run, ref, STEPS)
    print(f"survivor exited {took:.1f} s after its peer was killed ({line.split(': lost')[0]}); one process resumed "
          f"and matched the uninterrupted run to step {records(run, 'train')[-1]['step']}")


def test_timeouts_are_set_and_checked(tmp_path):
    """The start-up timeout goes to the process group; `set_timeout` changes every group's afterwards; a setting of 0
    is refused by name."""
    code = f"""
import datetime, torch.distributed as dist
from behemoth.parallel.distributed import set_timeout, is_peer_failure
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://{tmp_path / 'store'}",
                        timeout=datetime.timedelta(seconds=300))
assert set_timeout(7.5)
assert is_peer_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
assert not is_peer_failure(ValueError("bad data"))
dist.destroy_process_group()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert main(["train", *RUN, "--train.steps=1", f"--train.out_dir={tmp_path / 'r'}", "--parallel.timeout_s=0"]) == 2


def test_sigterm_to_one_launcher_saves_on_every_rank_and_stops(tmp_path):
    """A scheduler's pre-emption: SIGTERM to one node's torchrun, which passes it to its worker; both ranks agree
    after the step, save one complete checkpoint there and stop."""
    run, logs, a, b = two_nodes(tmp_path, 6, "--checkpoint.every=100000")
    took = after(lambda: os.kill(b.pid, signal.SIGTERM), a, b)
    out = logs[0].read_text()
    assert "interrupted by signal 15" in out and "checkpoint saved" in out, out[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[-1])
    assert step >= 6 and (run / "checkpoints" / latest / "model.dcp").is_dir()
    assert took < 60, took
    print(f"both ranks saved step {step} and stopped {took:.1f} s after SIGTERM")

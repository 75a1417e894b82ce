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


def node(port: int, out: Path, log: Path, *args: str, nodes: int = 2) -> subprocess.Popen:
    """One torchrun "node" of `nodes` (its own session, so that killing it kills its worker too)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
           "--max-restarts=0", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=faults", "-m",
           "behemoth", "train", *RUN, f"--train.out_dir={out}", *args]
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


def start_nodes(tmp_path: Path, steps: int, *args: str, nodes: int = 2) -> tuple[Path, list[Path], list]:
    """Nodes (the first is rank 0 and hosts the rendezvous store) training into one run directory, once `steps` steps
    are logged: (run directory, their logs, their launchers). Long runs (100,000 steps): the test stops them."""
    run, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"{chr(97 + i)}.log" for i in range(nodes)]
    procs = []
    for i, log in enumerate(logs):
        procs.append(node(port, run, log, "--train.steps=100000", *args, nodes=nodes))
        if i == 0:
            time.sleep(1.0)  # the first starts the rendezvous and hosts its store
    deadline = time.monotonic() + 180
    while steps_logged(run) < steps:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                kill_node(p)
            raise AssertionError(logs[0].read_text()[-2000:])
        time.sleep(0.2)
    return run, logs, procs


def two_nodes(tmp_path: Path, steps: int, *args: str) -> tuple[Path, list[Path], subprocess.Popen, subprocess.Popen]:
    """Nodes a (rank 0) and b, EP=2, once `steps` steps are logged: (run directory, their logs, a, b)."""
    run, logs, (a, b) = start_nodes(tmp_path, steps, "--parallel.ep=2", *args)
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
    assert "rank 0 stopped at step" in line and f"lost contact with rank 1 (node {socket.gethostname()}): " in line
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


def test_a_lost_rank_is_named_among_three(tmp_path):
    """Three nodes (one rank each, plain FSDP): the two survivors name the killed node's rank, found by its
    heartbeat falling silent in the rendezvous store."""
    run, logs, procs = start_nodes(tmp_path, 4, "--train.batch_size=6", nodes=3)
    took = after(lambda: kill_node(procs[2]), *procs[:2])
    lines = [ln for log in logs[:2] for ln in log.read_text().splitlines() if "lost contact with" in ln]
    assert len(lines) == 2, "\n".join(log.read_text()[-2000:] for log in logs[:2])
    survivors = {int(ln.split("rank ", 1)[1].split()[0]) for ln in lines}
    (lost,) = {0, 1, 2} - survivors
    for ln in lines:
        assert f"lost contact with rank {lost} (node {socket.gethostname()}): " in ln, ln
    assert took < 40, took
    print(f"both survivors named rank {lost} and exited {took:.1f} s after it was killed")


LATE_RANK = """
import os, sys, time
from behemoth.cli import main
from behemoth.parallel import distributed

take, calls = distributed.ShardedBatches.__next__, [0]
def late(self):  # rank 1's batch number `calls[0]` arrives late when {when}
    calls[0] += 1
    if {when}:
        time.sleep({seconds})
    return take(self)
if os.environ["RANK"] == "1":
    distributed.ShardedBatches.__next__ = late
sys.exit(main(sys.argv[1:]))
"""


def late_rank(tmp_path: Path, when: str, seconds: float, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Two ranks (torchrun --standalone, EP=2) where rank 1's batches arrive `seconds` late when `when` (a Python
    condition on `calls[0]`, the batch's number from 1): the finished run and its directory."""
    script, out = tmp_path / "late_rank.py", tmp_path / "run"
    script.write_text(LATE_RANK.format(when=when, seconds=seconds))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "train",
           *RUN, "--log.eval_every=0", "--parallel.ep=2", f"--train.out_dir={out}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env), out


def test_a_slow_rank_is_named_as_a_straggler(tmp_path):
    """A slow disk on rank 1: every batch takes 0.3 s more to arrive."""
    r, out = late_rank(tmp_path, "True", 0.3, "--train.steps=9", "--log.plots=true")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [ln for ln in r.stdout.splitlines() if "WARNING straggler" in ln]
    assert len(said) == 3 and all(f"rank 1 (node {socket.gethostname()}) is a straggler" in ln for ln in said), said
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    warned = [w for w in logged if w.get("event") == "straggler"]
    assert [(w["step"], w["rank"]) for w in warned] == [(3, 1), (6, 1), (9, 1)]
    ranks = [rec for rec in logged if rec["type"] == "ranks"]
    assert len(ranks) == 9 and all(rec["input_s"][1] >= 0.3 > rec["input_s"][0] for rec in ranks)
    assert (out / "ranks.png").is_file()
    print(said[0])


def test_a_stuck_rank_is_named_with_where_it_is_stuck(tmp_path):
    """Rank 1's loader hangs at step 6: rank 0's collective times out (`parallel.timeout_s`=4) and its line names
    rank 1 as alive but waiting for its input, from rank 1's heartbeat. (It hangs for 12 s: long past the timeout.)"""
    t0 = time.monotonic()
    r, _ = late_rank(tmp_path, "calls[0] == 6", 12, "--train.steps=10", "--parallel.timeout_s=4")
    took = time.monotonic() - t0
    said = [ln for ln in r.stderr.splitlines() if "lost contact with" in ln]
    assert r.returncode != 0 and said, r.stderr[-3000:]
    assert said[0].startswith("behemoth train: rank 0 stopped at step 5: lost contact with rank 1 (node "), said
    assert "alive but waiting for its input at step 6: " in said[0] and "imed out" in said[0], said
    print(f"{said[0][:160]}... (whole run {took:.0f} s)")

"""Grids of benchmark runs over methods and seeds, one subprocess per run, each appending its record to a JSONL
file as it finishes (a recorded run is not repeated, so an interrupted grid continues where it stopped): what
the multi-seed benchmarks (`routing.py`, `teaching.py`) share."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def recorded(runs_file: Path) -> list[dict]:
    """The runs recorded so far, in the order they finished."""
    return [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.exists() else []


def record(runs_file: Path, rec: dict) -> None:
    """Append one finished run's record (one line, written whole)."""
    with runs_file.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def run_pool(keys: list[tuple], command: Callable[[tuple], list[str]], jobs: int) -> int:
    """Run `command(key)` for every key, `jobs` subprocesses at a time, printing progress with an ETA; the
    number that failed."""
    todo, running = list(keys), []
    t0, finished, failed = time.perf_counter(), 0, 0
    while todo or running:
        while todo and len(running) < jobs:
            key = todo.pop(0)
            running.append((subprocess.Popen(command(key)), key))
        time.sleep(2)
        for proc, key in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, key))
            finished += 1
            failed += proc.returncode != 0
            left = len(todo) + len(running)
            eta = (time.perf_counter() - t0) / finished * left / max(1, min(jobs, left or 1))
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"[{finished}/{finished + left}] {key}: {status}; ETA {eta / 60:.0f} min", flush=True)
    return failed


def report(runs_file: Path, write_summary: Callable[[list[dict]], Path], table: Callable[[list[dict]], str],
           failed: int, refresh: Callable[[list[dict]], list[dict]] | None = None) -> None:
    """Write the summary of the recorded runs (after `refresh`, which measures them again from their run
    directories), print its table, and exit non-zero when runs failed or none is recorded."""
    runs = recorded(runs_file)
    if not runs:
        sys.exit(f"no runs recorded in {runs_file}")
    if refresh is not None:
        runs = refresh(runs)
    path = write_summary(runs)
    print(table(runs))
    print(f"wrote {path}")
    if failed:
        sys.exit(f"{failed} run(s) failed; run the same command again to retry them")

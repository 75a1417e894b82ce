"""What a surviving rank says when a collective fails: one line naming the rank that stopped, the step, what was
lost (by name where the run can tell), the last complete checkpoint and how to go on; the traceback goes to a file.

Which peer is lost: the heartbeats of the rendezvous store decide (`parallel/watch.py`). The ranks whose counters
stopped are gone (unless they said they stopped after reporting a failure of their own, as this rank does after its
report); if every rank still beats, the one that is somewhere else (an earlier step, or waiting for its input while
this rank waited for it) is stuck. Without an answer from the store: in a run of two ranks, the other.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

from behemoth.parallel.watch import Heartbeat, ranks_text

STUCK = {"waiting for input": "waiting for its input at", "optimizer update": "in its optimizer update at",
         "": "behind, in"}  # where a stuck rank is (`RollCall.places`), as the line says it


class PeerLost(Exception):
    """A collective failed in a distributed run: another rank died, hung or lost its connection (or the collective
    timed out). Raised on every surviving rank with what the report needs; the traceback is in `log`."""

    def __init__(self, rank: int, step: int, who: str, reason: str, checkpoint: Path | None, log: Path):
        where = f"the last complete checkpoint is {checkpoint}" if checkpoint else "no checkpoint was completed"
        super().__init__(f"rank {rank} stopped at step {step}: lost contact with {who}: {reason}; {where}; "
                         f"run the same command with --resume (any number of processes) to continue; traceback "
                         f"in {log}")
        self.rank, self.step, self.checkpoint, self.log = rank, step, checkpoint, log


def lost_peer(rank: int, world: int, hosts: list[str] | None, heartbeat: Heartbeat | None) -> str:
    """Who this rank lost contact with, as the one line says it."""
    call = heartbeat.roll_call() if heartbeat is not None else None
    if call is None:
        return ranks_text([1 - rank], hosts) if world == 2 else "another rank"
    if call.silent:
        return ranks_text(call.silent, hosts)
    stuck = call.stuck(rank, heartbeat.place)
    if not stuck:
        return "another rank (every rank still answers its heartbeat: one is stuck, not gone)"
    return "; ".join(f"{ranks_text([r], hosts)}, alive but {STUCK[call.places[r][1]]} step {call.places[r][0]}"
                     for r in stuck)


def peer_lost(e: BaseException, run_dir: Path, step: int, world: int, hosts: list[str] | None,
              heartbeat: Heartbeat | None) -> PeerLost:
    """The report of a failed collective; the full traceback goes to `failure.rank<R>.log` in `run_dir`."""
    from behemoth.checkpoint.locate import latest_checkpoint
    from behemoth.ranks import launcher_rank

    rank = launcher_rank()
    log = run_dir / f"failure.rank{rank}.log"
    log.write_text("".join(traceback.format_exception(e)))
    try:
        checkpoint = latest_checkpoint(run_dir)
    except Exception:  # a pointer to a checkpoint that is not complete: none to name
        checkpoint = None
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    reason = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", reason).split(". ")[0][:160]  # not the C++ source line
    who = lost_peer(rank, world, hosts, heartbeat)
    if heartbeat is not None:
        heartbeat.leave()
    return PeerLost(rank, step, who, reason, checkpoint, log)

"""Watching the other ranks of a distributed run: which rank is slow (stragglers) and which is gone (heartbeats).

Stragglers. In a synchronous run every rank waits for the slowest at each collective, so every rank's step takes
the same wall time: step time alone cannot say who is slow. What differs between ranks is the work no collective
synchronises: waiting for the next batch (a slow disk, a stalled data loader) and applying the optimizer update to
the rank's own shards (a throttled or shared device). `LocalTime` times those parts on each rank; at every logging
window `gather_local` brings every rank's figures to every rank, and `StragglerWatch` names a rank whose local time
exceeds the median of the other ranks' by `factor`, for `windows` windows in a row. Slowness inside forward and
backward cannot be pinned on one rank this way: FSDP's gathers and the experts' all-to-alls make every rank wait
there, so it shows as every rank's step time rising at once.

Heartbeats. When a collective fails, the error names at most an address: in a run of more than two ranks a
survivor cannot tell which peer is gone, and after a timeout it cannot tell a dead peer from a stuck one. Each
rank's `Heartbeat` thread adds 1 to its own counter in the run's rendezvous store every `interval` seconds, beside
where the rank is (its step, and whether it is in work of its own: waiting for input, its optimizer update). After
a failure, `roll_call()` reads every counter, waits two intervals and reads them again: the ranks whose counters did
not move are gone. A rank that is stuck but alive still beats (from its thread), and its place names it: the rank
waiting for input while the others wait for it in a collective.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARTS = ("input", "update")  # what `LocalTime` times: waiting for the batch, the optimizer's update of the shards
WHAT = {"input": "waiting for input", "update": "optimizer update"}
MIN_SHARE = 0.05  # a rank's excess over the others' median counts only above this share of the window's wall time:
# a few milliseconds of a long window cost the run nothing and are mostly the noise of a shared machine
HOST_BYTES = 64  # a host name's length in the gather (longer names are cut)
FULL_RANKS = 64  # up to this many ranks a "ranks" record lists every rank's times; beyond, the median and slowest


class LocalTime:
    """Seconds this rank spent on each of `PARTS` since the last `take()`. Host work is timed on the host; device
    work (`on_device=True`) with CUDA events on a GPU when `events` is on (a distributed run, which reads them at
    every logging window), read only at `take()`, so timing adds no synchronisation."""

    def __init__(self, device: torch.device, heartbeat: Heartbeat | None = None, events: bool = True):
        """`heartbeat`: told the step (`begin`) and which part the rank is in, for the roll call after a failure."""
        self.cuda, self.heartbeat = device.type == "cuda" and events, heartbeat
        self.step = 0
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def begin(self, step: int) -> None:
        """Step `step` (counted from 1) starts."""
        self.step = step
        if self.heartbeat is not None:
            self.heartbeat.place = (step, "")

    @contextmanager
    def part(self, name: str, on_device: bool = False) -> Iterator[None]:
        if self.heartbeat is not None:
            self.heartbeat.place = (self.step, WHAT[name])
        try:
            yield from self._timed(name, on_device)
        finally:
            if self.heartbeat is not None:
                self.heartbeat.place = (self.step, "")

    def _timed(self, name: str, on_device: bool) -> Iterator[None]:
        if on_device and self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def take(self) -> list[float]:
        """The seconds per part, in `PARTS` order, since the last call (then reset)."""
        for name, start, end in self.pending:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000
        out = [self.seconds[p] for p in PARTS]
        self.seconds, self.pending = dict.fromkeys(PARTS, 0.0), []
        return out


def gather_local(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (the same length on each), on every rank: [world][len(values)]."""
    t = torch.tensor(values, dtype=torch.float64)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def gather_hosts() -> list[str]:
    """Every rank's host name, on every rank (a fixed-size byte tensor, so any backend's CPU path carries it)."""
    name = socket.gethostname().encode("utf-8")[:HOST_BYTES]
    t = torch.zeros(HOST_BYTES, dtype=torch.uint8)
    t[:len(name)] = torch.tensor(list(name), dtype=torch.uint8)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [bytes(o.tolist()).rstrip(b"\0").decode("utf-8", "replace") for o in out]


def ranks_text(ranks: list[int], hosts: list[str] | None) -> str:
    """"rank 3 (node gpu-07)", "ranks 8-15 (node gpu-02)", "ranks 2, 5 (nodes a, b)": the ranks and where they ran."""
    spans, start = [], None
    for i, r in enumerate(ranks):
        start = r if start is None else start
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    text = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(spans)}"
    if hosts:
        nodes = list(dict.fromkeys(hosts[r] for r in ranks))
        text += f" (node{'s' if len(nodes) > 1 else ''} {', '.join(nodes)})"
    return text


def medians_of_others(values: list[float]) -> list[float]:
    """For each rank r, the median of every other rank's value: one sort for all of them, so that a window of many
    thousand ranks costs O(n log n) rather than a sort per rank. Needs at least two values."""
    order = sorted(range(len(values)), key=values.__getitem__)
    s = [values[r] for r in order]
    m = len(s) - 1  # the others' count

    def at(k: int, i: int) -> float:  # element k of `s` without position i
        return s[k] if k < i else s[k + 1]

    out = [0.0] * len(values)
    for i, r in enumerate(order):
        out[r] = at(m // 2, i) if m % 2 else (at(m // 2 - 1, i) + at(m // 2, i)) / 2
    return out


def duration(seconds: float) -> str:
    """"1.25 s", "37.2 ms": a rank's time as a person reads it."""
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


class StragglerWatch:
    """Names a rank that is slow at its own work for `windows` logging windows in a row (see the module docstring).
    `factor` 0 turns the warning off; the per-rank figures are still recorded."""

    def __init__(self, world: int, factor: float, windows: int, hosts: list[str] | None = None):
        self.world, self.factor, self.windows, self.hosts = world, factor, windows, hosts
        self.streak = [0] * world

    def window(self, step: int, parts: list[list[float]], wall_s: float) -> tuple[dict, list[dict]]:
        """One logging window: `parts` [world][len(PARTS)] seconds per rank and part, `wall_s` the window's wall time.
        Returns the "ranks" record for metrics.jsonl and any "straggler" warnings."""
        local = [sum(p) for p in parts]
        slowest = max(range(self.world), key=local.__getitem__)
        record = {"type": "ranks", "step": step, "world": self.world, "window_s": wall_s,
                  "median_s": statistics.median(local), "slowest_rank": slowest, "slowest_s": local[slowest]}
        if self.world <= FULL_RANKS:
            record.update({"local_s": local, **{f"{name}_s": [p[i] for p in parts] for i, name in enumerate(PARTS)}})
        warnings = []
        for r, median in enumerate(medians_of_others(local)):
            slow = (self.factor > 0 and local[r] > self.factor * median
                    and local[r] - median >= MIN_SHARE * wall_s)
            self.streak[r] = self.streak[r] + 1 if slow else 0
            if slow and self.streak[r] % self.windows == 0:
                times = ", ".join(f"{WHAT[n]} {duration(parts[r][i])}" for i, n in enumerate(PARTS))
                ratio = f"{local[r] / median:.1f}x" if median > 0 else "more than"
                warnings.append({"type": "warning", "event": "straggler", "step": step, "rank": r,
                                 "host": self.hosts[r] if self.hosts else None, "local_s": local[r],
                                 "median_s": median,
                                 "message": f"{ranks_text([r], self.hosts)} is a straggler: {duration(local[r])} of "
                                            f"its own work in the last logging window ({times}), {ratio} the other "
                                            f"ranks' median of {duration(median)}, {self.streak[r]} windows in a "
                                            f"row; every rank waits for it"})
        return record, warnings


STOPPED = "stopped"  # the place of a rank that reported a failure of its own and left: not lost, not stuck


@dataclass
class RollCall:
    """What the heartbeats say after a failure: the other ranks whose counters stopped (gone), and where every rank
    that has beaten is: (step, what it does there: "" for the step's synchronised work, one of `WHAT`, or
    `STOPPED`)."""

    silent: list[int]
    places: dict[int, tuple[int, str]]

    def stuck(self, me: int, mine: tuple[int, str]) -> list[int]:
        """The live ranks that are somewhere else than rank `me` (at `mine`), whose collective failed: an earlier
        step, or in work of their own while `me` waited for them."""
        return sorted(r for r, place in self.places.items() if r != me and r not in self.silent and place != mine
                      and place[1] != STOPPED and (place[0] < mine[0] or place[1]))


class Heartbeat:
    """A daemon thread adding 1 to this rank's counter in the rendezvous store every `interval` seconds, with where
    the rank is (`place`: set by `LocalTime` in one assignment), and the roll call that reads them after a failure
    (see the module docstring)."""

    KEY, PLACE = "behemoth/heartbeat/{}", "behemoth/place/{}"

    def __init__(self, rank: int, world: int, interval: float, store: dist.Store | None = None):
        """`store`: where the counters live; by default the one every rank joined through (its ops are serialised,
        so the thread may share it)."""
        from torch.distributed import distributed_c10d as c10d

        self.rank, self.world, self.interval = rank, world, interval
        self.place: tuple[int, str] = (0, "")
        self.store = store if store is not None else c10d._get_default_store()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="behemoth-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        key, place_key = self.KEY.format(self.rank), self.PLACE.format(self.rank)
        while not self.stop.is_set():
            step, doing = self.place
            try:
                self.store.set(place_key, f"{step}|{doing}")  # first: a counter above 0 means a place is set
                self.store.add(key, 1)
            except Exception:  # a busy or lost store: try again next beat (if it is gone, the run is failing)
                pass
            self.stop.wait(self.interval)

    def _counts(self, keys: list[str]) -> list[int]:
        """Every rank's counter, in one request where the store can (`multi_get`), else one by one."""
        if hasattr(self.store, "multi_get"):
            return [int(v) for v in self.store.multi_get(keys)]
        return [self.store.add(k, 0) for k in keys]

    def roll_call(self) -> RollCall | None:
        """Which other ranks' counters stayed still for two intervals, and where every rank is; None when the store
        cannot say (its host is gone too, or it does not answer within the roll call's time)."""
        result: list[RollCall] = []

        def call() -> None:
            keys = [self.KEY.format(r) for r in range(self.world)]
            try:
                first = [self.store.add(k, 0) for k in keys]  # creates the counter of a rank that never beat
                deadline = time.monotonic() + 2 * self.interval
                moved = {self.rank}
                while time.monotonic() < deadline and len(moved) < self.world:
                    time.sleep(self.interval / 4)
                    moved |= {r for r, n in enumerate(self._counts(keys)) if n != first[r]}
                places = {r: self._place(r) for r in range(self.world) if r != self.rank and first[r] > 0}
            except Exception:  # the store's host is gone too: it cannot say
                return
            silent = [r for r in range(self.world) if r not in moved and places.get(r, (0, ""))[1] != STOPPED]
            result.append(RollCall(silent, places))

        thread = threading.Thread(target=call, name="behemoth-roll-call", daemon=True)
        thread.start()
        thread.join(2 * self.interval + 10)
        return result[0] if result else None

    def _place(self, rank: int) -> tuple[int, str]:
        step, doing = self.store.get(self.PLACE.format(rank)).decode().split("|", 1)
        return int(step), doing

    def leave(self) -> None:
        """This rank stops after reporting a failure of its own: its place says so (the ranks whose roll call comes
        later must not name it as lost), then the beats end."""
        self.place = (self.place[0], STOPPED)
        self.stop.set()
        self.thread.join(timeout=self.interval + 5)  # a beat under way would write the old place after this one
        try:
            self.store.set(self.PLACE.format(self.rank), f"{self.place[0]}|{STOPPED}")
        except Exception:  # the store is gone: nobody will ask
            pass

    def close(self) -> None:
        self.stop.set()

    @classmethod
    def start(cls, rank: int, world: int, interval: float) -> Heartbeat | None:
        """A heartbeat on the run's default store; None where this torch has no store to reach (the lost rank then
        goes unnamed beyond two ranks, and nothing else changes)."""
        try:
            return cls(rank, world, interval)
        except (AttributeError, RuntimeError, ValueError):
            return None

"""The straggler rule, the per-rank timing and the heartbeat roll call (`parallel/watch.py`), in one process."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from behemoth.parallel.watch import (
    MIN_SHARE,
    Heartbeat,
    LocalTime,
    StragglerWatch,
    medians_of_others,
    ranks_text,
)
from behemoth.train.faults import lost_peer


def windows(watch: StragglerWatch, local: list[float], n: int, wall: float = 1.0) -> list[list[dict]]:
    """`n` logging windows in which rank r spends local[r] seconds waiting for input (none on its update)."""
    return [watch.window(step, [[x, 0.0] for x in local], wall)[1] for step in range(1, n + 1)]


def test_a_slow_rank_is_named_after_the_set_number_of_windows_and_every_that_many_after():
    watch = StragglerWatch(4, factor=1.5, windows=3, hosts=["a", "a", "b", "b"])
    out = windows(watch, [0.10, 0.10, 0.31, 0.11], 7)
    assert [len(w) for w in out] == [0, 0, 1, 0, 0, 1, 0]
    w = out[2][0]
    assert (w["event"], w["rank"], w["host"], w["step"]) == ("straggler", 2, "b", 3)
    assert w["median_s"] == pytest.approx(0.10) and w["local_s"] == pytest.approx(0.31)  # the others' median
    assert w["message"].startswith("rank 2 (node b) is a straggler: 310.0 ms") and "3.1x" in w["message"]
    assert "3 windows in a row" in w["message"] and "6 windows in a row" in out[5][0]["message"]


def test_the_streak_restarts_when_the_rank_catches_up():
    watch = StragglerWatch(2, factor=1.5, windows=3)
    slow, even = [0.1, 0.5], [0.1, 0.1]
    seen = [watch.window(s, [[x, 0.0] for x in local], 1.0)[1]
            for s, local in enumerate([slow, slow, even, slow, slow, slow], 1)]
    assert [len(w) for w in seen] == [0, 0, 0, 0, 0, 1]


def test_balanced_ranks_small_differences_and_a_factor_of_zero_name_nobody():
    assert not any(windows(StragglerWatch(3, 1.5, 1), [0.2, 0.21, 0.19], 5))  # balanced
    # 10x the others, but the excess is under MIN_SHARE of the window's wall time: noise, not a straggler
    tiny = 0.5 * MIN_SHARE
    assert not any(windows(StragglerWatch(2, 1.5, 1), [tiny / 9, tiny + tiny / 9], 5))
    assert any(windows(StragglerWatch(2, 1.5, 1), [0.0, 2 * MIN_SHARE], 1))  # above it: named
    assert not any(windows(StragglerWatch(2, 0.0, 1), [0.1, 5.0], 5))  # off


def test_the_ranks_record_holds_every_rank_and_part_and_beyond_64_ranks_a_summary():
    rec, _ = StragglerWatch(2, 1.5, 3).window(10, [[0.5, 0.25], [1.0, 0.5]], 2.0)
    assert rec == {"type": "ranks", "step": 10, "world": 2, "window_s": 2.0, "median_s": 1.125, "slowest_rank": 1,
                   "slowest_s": 1.5, "local_s": [0.75, 1.5], "input_s": [0.5, 1.0], "update_s": [0.25, 0.5]}
    big, _ = StragglerWatch(100, 1.5, 3).window(1, [[0.125, 0.0]] * 99 + [[0.25, 0.125]], 1.0)
    assert "local_s" not in big and (big["slowest_rank"], big["slowest_s"], big["median_s"]) == (99, 0.375, 0.125)


def test_ranks_png_keeps_the_latest_world_size_of_a_resumed_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from behemoth.train.plots import plot_ranks

    two = [StragglerWatch(2, 1.5, 3).window(s, [[0.1, 0.0], [0.2, 0.0]], 1.0)[0] for s in (1, 2)]
    four = [StragglerWatch(4, 1.5, 3).window(s, [[0.1, 0.0]] * 4, 1.0)[0] for s in (3, 4)]
    assert plot_ranks(two + four, [], tmp_path / "ranks.png", plt).is_file()


def test_medians_of_others_equal_the_median_of_each_ranks_peers():
    import random
    import statistics

    rng = random.Random(0)
    for n in (2, 3, 4, 5, 8, 33):
        for values in ([rng.random() for _ in range(n)], [rng.choice([0.1, 0.2, 0.3]) for _ in range(n)]):
            expect = [statistics.median(values[:r] + values[r + 1:]) for r in range(n)]
            assert medians_of_others(values) == pytest.approx(expect)


def test_ranks_text_names_spans_and_nodes():
    hosts = ["n0"] * 4 + ["n1"] * 4
    assert ranks_text([3], hosts) == "rank 3 (node n0)"
    assert ranks_text([4, 5, 6, 7], hosts) == "ranks 4-7 (node n1)"
    assert ranks_text([1, 2, 5], hosts) == "ranks 1-2, 5 (nodes n0, n1)"
    assert ranks_text([2], None) == "rank 2"


def test_local_time_adds_up_per_part_and_resets():
    t = LocalTime(torch.device("cpu"))
    with t.part("input"):
        time.sleep(0.02)
    with t.part("update", on_device=True):  # on the CPU: host time
        time.sleep(0.01)
    with t.part("input"):
        time.sleep(0.02)
    first = t.take()
    assert first[0] >= 0.04 and first[1] >= 0.01
    assert t.take() == [0.0, 0.0]


BEAT = 0.2  # seconds between beats in these tests: a roll call waits two


def test_the_roll_call_names_the_ranks_whose_heartbeat_stopped():
    store = dist.HashStore()
    beats = [Heartbeat(r, 4, BEAT, store) for r in range(4)]
    time.sleep(2 * BEAT)
    beats[1].close()
    beats[3].close()
    time.sleep(BEAT)  # their last beats are in
    assert beats[0].roll_call().silent == [1, 3]
    assert beats[2].roll_call().silent == [1, 3]
    beats[1], beats[3] = Heartbeat(1, 4, BEAT, store), Heartbeat(3, 4, BEAT, store)
    assert beats[0].roll_call().silent == []  # every rank beats: nobody is gone
    for b in beats:
        b.close()


def test_a_survivor_that_reported_and_left_is_not_named_by_the_later_ones():
    """Rank 3 dies; rank 2 reports it and leaves; rank 0, whose collective fails later, still names rank 3 alone."""
    store = dist.HashStore()
    beats = [Heartbeat(r, 4, BEAT, store) for r in range(4)]
    time.sleep(2 * BEAT)
    beats[3].close()
    time.sleep(BEAT)
    assert lost_peer(2, 4, ["a", "a", "b", "b"], beats[2]) == "rank 3 (node b)"
    beats[2].leave()
    assert lost_peer(0, 4, ["a", "a", "b", "b"], beats[0]) == "rank 3 (node b)"
    for b in beats:
        b.close()


def test_the_roll_call_finds_a_stuck_rank_by_its_place():
    """Ranks 0 and 2 wait in step 7's collective; rank 1 waits for its input there, rank 3 is still in step 6."""
    store = dist.HashStore()
    beats = [Heartbeat(r, 4, BEAT, store) for r in range(4)]
    clocks = [LocalTime(torch.device("cpu"), b) for b in beats]
    for c in clocks:
        c.begin(7)
    clocks[3].begin(6)
    with clocks[1].part("input"):
        time.sleep(2 * BEAT)  # every place is written
        call = beats[0].roll_call()
        said = lost_peer(0, 4, ["a", "a", "b", "b"], beats[0])
    assert call.silent == [] and call.places == {1: (7, "waiting for input"), 2: (7, ""), 3: (6, "")}
    assert call.stuck(0, (7, "")) == [1, 3]
    assert said == ("rank 1 (node a), alive but waiting for its input at step 7; "
                    "rank 3 (node b), alive but behind, in step 6")
    assert beats[1].place == (7, "")  # the part is over
    for b in beats:
        b.close()


def test_without_heartbeats_two_ranks_name_the_other_and_more_say_another():
    assert lost_peer(1, 2, ["a", "b"], None) == "rank 0 (node a)"
    assert lost_peer(1, 3, None, None) == "another rank"

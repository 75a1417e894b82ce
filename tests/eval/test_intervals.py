"""Every accuracy carries its 95% Wilson score interval: the closed form against hand-computed values, its
symmetry, the empty case, and the intervals attached to a graded result and to the majority baseline."""

from __future__ import annotations

import pytest

from behemoth.data.tasks import Problem
from behemoth.eval.metrics import Z95, format_accuracy, majority_baseline, wilson_interval, with_intervals

# (k, n): (lo, hi), computed by hand (40-digit decimals) from the closed form with z = 1.959964:
# centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
HAND = {(0, 10): (0.0, 0.2775328030260577),
        (10, 10): (0.7224671969739423, 1.0),
        (5, 10): (0.2365930890114794, 0.7634069109885206),
        (35, 105): (0.2504591005360856, 0.4279722586193307),
        (1, 3): (0.0614919440209308, 0.7923404011921757)}


@pytest.mark.parametrize("k,n", list(HAND))
def test_wilson_matches_the_closed_form_by_hand(k, n):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(HAND[k, n][0], abs=1e-9) and hi == pytest.approx(HAND[k, n][1], abs=1e-9)
    assert Z95 == 1.959964


def test_wilson_is_symmetric_and_contains_the_share():
    for n in (1, 2, 7, 10, 56, 105, 300):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            assert lo == pytest.approx(1 - wilson_interval(n - k, n)[1], abs=1e-12)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # never outside [0, 1]
    assert wilson_interval(50, 100, z=1.0)[1] - 0.5 < wilson_interval(50, 100)[1] - 0.5  # narrower at lower z


def test_wilson_without_trials_and_bad_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no problems: no information
    for k, n in ((-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(k, n)


def _p(task: str, answer: str) -> Problem:
    return Problem(task, "Q", f" #### {answer}\n", answer)


def test_intervals_attached_per_task_and_overall():
    problems = [_p("add", "1"), _p("add", "2"), _p("add", "3"), _p("sort", "4")]
    result = with_intervals({"overall": 0.5, "per_task": {"add": 1 / 3, "sort": 1.0}, "n": 4}, problems)
    assert result["overall"] == 0.5 and result["n"] == 4  # the old keys are kept
    assert result["interval"] == list(wilson_interval(2, 4))
    assert result["per_task_n"] == {"add": 3, "sort": 1}
    assert result["per_task_interval"] == {"add": list(wilson_interval(1, 3)), "sort": list(wilson_interval(1, 1))}


def test_majority_baseline_has_intervals():
    train = [_p("add", "1"), _p("add", "1"), _p("add", "2")]
    test = [_p("add", "1"), _p("add", "2")]
    base = majority_baseline(train, test)
    assert base["overall"] == 0.5 and base["interval"] == list(wilson_interval(1, 2))
    assert base["per_task_interval"]["add"] == list(wilson_interval(1, 2)) and base["per_task_n"] == {"add": 2}


def test_format_accuracy():
    assert format_accuracy(35 / 105, wilson_interval(35, 105)) == "33.3% [25.0, 42.8]"
    assert format_accuracy(0.25) == "25.0%"  # a report from before intervals


def test_paired_comparison_by_hand():
    """Two models on the same problems: the difference of shares, its paired Wald interval and the exact
    McNemar p-value, against hand computations."""
    from behemoth.eval.metrics import paired_comparison

    a = [True, True, True, False, False, True]
    b = [True, False, False, False, True, True]
    p = paired_comparison(a, b)  # a alone right twice, b once: d = 1/6, half = z sqrt(3 - 1/6) / 6
    assert (p["n"], p["a_only"], p["b_only"]) == (6, 2, 1) and p["difference"] == pytest.approx(1 / 6)
    assert p["interval"] == pytest.approx([1 / 6 - 0.5498518360, 1 / 6 + 0.5498518360], abs=1e-9)
    assert p["p_value"] == 1.0  # 2 P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8, capped at 1
    ten = paired_comparison([True] * 10 + [False] * 10, [False] * 20)  # 10 against 0 of 20
    assert ten["difference"] == 0.5 and ten["p_value"] == pytest.approx(2 / 1024)
    assert ten["interval"] == pytest.approx([0.5 - 0.2191306369, 0.5 + 0.2191306369], abs=1e-9)
    seven = paired_comparison([True] * 7 + [False] * 3, [False] * 7 + [True] * 3)  # 7 against 3
    assert seven["p_value"] == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024) and seven["difference"] == 0.4
    assert paired_comparison([True, False], [False, True])["p_value"] == 1.0
    same = paired_comparison([True, False, True], [True, False, True])  # nothing separates them
    assert same["difference"] == 0.0 and same["interval"] == [0.0, 0.0] and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="same problems"):
        paired_comparison([True], [True, False])

"""Visual tasks: reproducible, held out by construction, and each answer readable from the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from behemoth.data.tasks import ALPHABET, check
from behemoth.data.vision_tasks import COLOURS, VISION_TASKS, make_visual_problems


def test_reproducible_and_held_out():
    a, b = make_visual_problems("train", 60, seed=3), make_visual_problems("train", 60, seed=3)
    assert [p.problem for p in a] == [p.problem for p in b]
    assert all(np.array_equal(np.asarray(x.image()), np.asarray(y.image())) for x, y in zip(a[:6], b[:6], strict=True))
    train = {p.problem.key for p in make_visual_problems("train", 600, seed=0)}
    test = {p.problem.key for p in make_visual_problems("test", 200, seed=0)}
    assert not train & test and len(test) >= 195  # a few scenes repeat within a split; none across splits
    assert {p.task for p in a} == set(VISION_TASKS)


def test_text_is_in_the_task_alphabet_and_graded_by_check():
    for p in make_visual_problems("test", 30):
        assert set(p.problem.text) <= set(ALPHABET)
        assert check(p.problem, p.problem.solution) and not check(p.problem, " #### wrong")


def _components(mask: np.ndarray) -> int:
    """4-connected components of a boolean image (a tiny flood fill)."""
    seen = np.zeros_like(mask)
    n = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            if 0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1] and mask[cy, cx] and not seen[cy, cx]:
                seen[cy, cx] = True
                stack += [(cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)]
    return n


def test_answers_can_be_read_from_the_pixels():
    for p in make_visual_problems("train", 90, seed=1):
        px = np.asarray(p.image()).astype(int)
        if p.task == "count":
            rgb = np.array(COLOURS[p.scene[0]])
            assert _components(np.abs(px - rgb).sum(-1) < 30) == int(p.problem.answer)
        elif p.task == "bigger":
            ink = (px.sum(-1) < 700)
            left, right = ink[:, :32].sum(), ink[:, 32:].sum()
            assert p.problem.answer == ("left" if left > right else "right")
        else:
            assert (px.sum(-1) < 100).sum() > 20  # the strokes are drawn


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="unknown visual task"):
        make_visual_problems("train", 3, tasks=["colour"])
    with pytest.raises(ValueError, match="split"):
        make_visual_problems("dev", 3)

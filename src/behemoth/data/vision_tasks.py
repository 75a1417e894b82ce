"""Built-in visual-reasoning tasks: small pictures drawn with Pillow, a question, an exact answer.

Three tasks, each answerable only by looking (the question names no answer):

* `count`: 1 to 6 shapes (squares, circles, triangles) in four colours; "how many red shapes?"
  (the answer may be 0);
* `digit`: one digit drawn as a seven-segment figure at a random place, size and stroke width;
  "which digit is this?";
* `bigger`: two shapes side by side, one clearly larger; "which shape is bigger, left or right?".

A problem is a scene (its parameters) plus a question; the picture is drawn from the parameters on
demand, so problems are cheap to keep and exactly reproducible. Held out by construction as in
`data.tasks`: the sha256 bucket of the scene's canonical key decides its split, so no test picture can
appear in training whatever the seeds. The text uses the task format ("Q: ...\\nA: #### answer\\n"),
so `data.tasks.check` grades generations, and only characters of `data.tasks.ALPHABET`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from behemoth.data.tasks import ANSWER_MARK, Problem, split_of

SIZE = 64  # pixels per side
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("square", "circle", "triangle")
# Seven segments a..g as line endpoints on a unit box (x right, y down): top, upper right, lower
# right, bottom, lower left, upper left, middle.
_SEGMENTS = {"a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 0.5)), "c": ((1, 0.5), (1, 1)), "d": ((0, 1), (1, 1)),
             "e": ((0, 0.5), (0, 1)), "f": ((0, 0), (0, 0.5)), "g": ((0, 0.5), (1, 0.5))}
_DIGIT_SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


@dataclass(frozen=True)
class VisualProblem:
    """A question about a picture: `scene` holds what is drawn; `problem` the text (prompt, solution,
    answer, canonical key), graded by `data.tasks.check`."""

    scene: tuple
    problem: Problem

    @property
    def task(self) -> str:
        return self.problem.task

    def image(self) -> Image.Image:
        return draw(self.problem.task, self.scene)


def _shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "square":
        d.rectangle(box, fill=colour)
    elif kind == "circle":
        d.ellipse(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)


def draw(task: str, scene: tuple) -> Image.Image:
    """The picture of a scene (64 x 64 RGB, white background)."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if task == "count":
        for kind, colour, cx, cy, r in scene[1]:
            _shape(d, kind, cx, cy, r, COLOURS[colour])
    elif task == "digit":
        digit, x0, y0, w, h, stroke = scene
        for seg in _DIGIT_SEGMENTS[digit]:
            (ax, ay), (bx, by) = _SEGMENTS[seg]
            d.line([(x0 + ax * w, y0 + ay * h), (x0 + bx * w, y0 + by * h)], fill=(0, 0, 0), width=stroke)
    elif task == "bigger":
        for (kind, colour, r, dx, dy), cx in zip(scene, (SIZE * 0.27, SIZE * 0.73), strict=True):
            _shape(d, kind, cx + dx, SIZE / 2 + dy, r, COLOURS[colour])
    else:
        raise ValueError(f"unknown visual task {task!r}")
    return img


def _count_scene(rng: random.Random) -> tuple:
    """Shapes on a 3 x 3 grid of cells (jittered inside their cell), so none overlap."""
    n = rng.randint(1, 6)
    cells = rng.sample(range(9), n)
    shapes = []
    for c in sorted(cells):
        r = rng.randint(5, 8)
        cx = (c % 3 + 0.5) * SIZE / 3 + rng.randint(-2, 2)
        cy = (c // 3 + 0.5) * SIZE / 3 + rng.randint(-2, 2)
        shapes.append((rng.choice(SHAPES), rng.choice(list(COLOURS)), cx, cy, r))
    return rng.choice(list(COLOURS)), tuple(shapes)


def _digit_scene(rng: random.Random) -> tuple:
    w, h = rng.randint(14, 26), rng.randint(26, 44)
    return rng.randrange(10), rng.randint(4, SIZE - 4 - w), rng.randint(4, SIZE - 4 - h), w, h, rng.randint(2, 4)


def _bigger_scene(rng: random.Random) -> tuple:
    small, large = rng.randint(4, 8), rng.randint(11, 14)
    sizes = (small, large) if rng.random() < 0.5 else (large, small)
    return tuple((rng.choice(SHAPES), rng.choice(list(COLOURS)), r, rng.randint(-2, 2), rng.randint(-12, 12))
                 for r in sizes)


def _text(task: str, scene: tuple) -> tuple[str, str]:
    """(question, answer)."""
    if task == "count":
        colour, shapes = scene
        return f"how many {colour} shapes?", str(sum(s[1] == colour for s in shapes))
    if task == "digit":
        return "which digit is this?", str(scene[0])
    (_, _, r1, _, _), (_, _, r2, _, _) = scene
    return "which shape is bigger, left or right?", "left" if r1 > r2 else "right"


SAMPLERS = {"count": _count_scene, "digit": _digit_scene, "bigger": _bigger_scene}
VISION_TASKS: tuple[str, ...] = tuple(SAMPLERS)


def build(task: str, scene: tuple) -> VisualProblem:
    question, answer = _text(task, scene)
    key = f"vision-{task}:{scene!r}"
    return VisualProblem(scene, Problem(task, f"Q: {question}\nA:", f" {ANSWER_MARK} {answer}\n", answer, key))


def make_visual_problems(split: str, n: int, seed: int = 0, tasks: Sequence[str] | None = None) -> list[VisualProblem]:
    """`n` problems of `split` ("train" or "test"), tasks in turn, reproducible from `seed`."""
    names = list(tasks or VISION_TASKS)
    unknown = [t for t in names if t not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown visual task(s) {', '.join(unknown)}; expected some of {', '.join(VISION_TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    rng = random.Random(f"vision:{split}:{seed}")
    out = []
    while len(out) < n:
        task = names[len(out) % len(names)]
        p = build(task, SAMPLERS[task](rng))
        if split_of(p.problem.key) == split:
            out.append(p)
    return out

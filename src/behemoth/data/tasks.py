"""Built-in training data: synthetic STEM reasoning tasks with worked steps and held-out test problems.

Every task is a small, exactly checkable problem written as one short document:

    Q: 47+85=?
    A: 7+5=12; 4+8+1=13; #### 132

The prompt ends with the answer cue "A:"; the solution is worked steps separated by "; ", then
"#### " and the final answer, then a newline. One fixed format per task and documents of mostly
under 60 characters (at difficulty 1) let a char-level model of a few million parameters learn them
on a CPU in minutes; `difficulty` scales operand sizes (digits, list and string lengths, conversion
hops) so that a harder setting separates small models from bigger ones.

The steps are the genuine computation, not decoration: column addition right to left with the carry
written as "+1" in the next column, long multiplication by one digit with the carry added, division
with remainder as quotient*divisor then a subtraction, a linear equation undone one operation at a
time, unit conversions one hop of the unit chain at a time, a running count of the matches.

Test problems are held out by construction. Each candidate problem has a canonical key (task name
and operands; commutative operands sorted, so "85+47" and "47+85" are one problem) whose sha256
picks a bucket; `TEST_FRACTION` of the buckets are test, the rest train, and `make_problems` draws each
split only from its own buckets. No test problem can appear in training data, whatever the seeds,
the sample sizes or the difficulties (the key does not depend on the difficulty).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

ALPHABET: str = "\n #%*+,-/0123456789:;=?AQabcdefghijklmnopqrstuvwxyz"
"""Every character any task can produce, in code-point order (the char-level vocabulary: only append)."""

SPLITS: tuple[str, ...] = ("train", "test")
TEST_FRACTION: float = 0.1
"""Share of canonical-key buckets (and so of all possible problems of a task) reserved for "test"."""

ANSWER_MARK = "####"
_BUCKETS = 10000
_MAX_TRIES = 100000  # candidates per accepted problem before giving up (a split with no problems)


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` (ends with the answer cue "A:"), `solution` (worked steps, then
    "#### answer" and a newline), `answer` (the final answer alone) and the canonical `key` that
    decided its split."""

    task: str
    prompt: str
    solution: str
    answer: str
    key: str = ""

    @property
    def text(self) -> str:
        """prompt + solution: one training document."""
        return self.prompt + self.solution


@dataclass(frozen=True)
class TaskSpec:
    """A task generator. `sample(rng, difficulty)` draws operands (a tuple); `key(operands)` is the
    canonical identity of the problem; `render(operands)` gives (question, steps, answer), which
    `build` wraps in the fixed "Q: ...\\nA: steps; #### answer\\n" format."""

    name: str
    description: str
    sample: Callable[[random.Random, int], tuple[Any, ...]]
    key: Callable[[tuple[Any, ...]], str]
    render: Callable[[tuple[Any, ...]], tuple[str, str, str]]

    def canonical_key(self, operands: tuple[Any, ...]) -> str:
        return f"{self.name}:{self.key(operands)}"

    def build(self, operands: tuple[Any, ...]) -> Problem:
        question, steps, answer = self.render(operands)
        return Problem(self.name, f"Q: {question}\nA:", f" {steps}; {ANSWER_MARK} {answer}\n", answer,
                       self.canonical_key(operands))


def split_of(key: str) -> str:
    """"test" or "train" for a canonical key: sha256 (stable across processes, unlike `hash`) into
    `_BUCKETS` buckets, the lowest `TEST_FRACTION` of which are test."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % _BUCKETS
    return "test" if bucket < round(TEST_FRACTION * _BUCKETS) else "train"


# ---- the tasks ---------------------------------------------------------------------------------
# Operand sizes at difficulty d: numbers of d+1 digits (add, mul, mod, sort, units), equation
# coefficients of d digits (lineq), strings of 4d..8d characters (count), lists of 3..4+d numbers
# (sort), up to d hops of a unit chain (units).

def _ndigits(d: int) -> int:
    return 10 ** (d + 1)


def _add_sample(rng: random.Random, d: int) -> tuple[int, int]:
    return rng.randrange(_ndigits(d)), rng.randrange(_ndigits(d))


def _add_render(ops: tuple[int, int]) -> tuple[str, str, str]:
    """Columns right to left, the shorter number padded with 0; a carry shows as "+1" in the next
    column: 47+85 -> "7+5=12; 4+8+1=13" -> 132 (the last carry is the leading digit)."""
    a, b = ops
    ra, rb = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(ra), len(rb))):
        x = int(ra[i]) if i < len(ra) else 0
        y = int(rb[i]) if i < len(rb) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return f"{a}+{b}=?", "; ".join(steps), str(a + b)


def _mul_sample(rng: random.Random, d: int) -> tuple[int, int]:
    return rng.randrange(_ndigits(d)), rng.randint(2, 9)


def _mul_render(ops: tuple[int, int]) -> tuple[str, str, str]:
    """Digits of the multi-digit factor right to left, each times the one-digit factor plus the carry
    (the tens of the previous product): 47*6 -> "7*6=42; 4*6+4=28" -> 282."""
    a, b = ops
    steps, carry = [], 0
    for ch in str(a)[::-1]:
        p = int(ch) * b + carry
        steps.append(f"{ch}*{b}{f'+{carry}' if carry else ''}={p}")
        carry = p // 10
    return f"{a}*{b}=?", "; ".join(steps), str(a * b)


def _mod_sample(rng: random.Random, d: int) -> tuple[int, int]:
    return rng.randrange(_ndigits(d)), rng.randint(2, 10 * d - 1)


def _mod_render(ops: tuple[int, int]) -> tuple[str, str, str]:
    """Division with remainder: the quotient times the modulus, then the subtraction:
    47%5 -> "9*5=45; 47-45=2" -> 2."""
    a, m = ops
    q = a // m
    return f"{a}%{m}=?", f"{q}*{m}={q * m}; {a}-{q * m}={a - q * m}", str(a % m)


def _lineq_sample(rng: random.Random, d: int) -> tuple[int, int, int]:
    bound = 10**d - 1
    a = rng.randint(2, 10 * d - 1)
    x = rng.randint(-bound, bound)
    b = rng.randint(1, bound) * rng.choice((-1, 1))
    return a, b, a * x + b


def _lineq_render(ops: tuple[int, int, int]) -> tuple[str, str, str]:
    """a*x+b=c undone one operation at a time: 3x+5=20 -> "3x=20-5=15; x=15/3=5" -> 5."""
    a, b, c = ops
    x = (c - b) // a
    return f"{a}x{b:+d}={c}, x=?", f"{a}x={c}{-b:+d}={c - b}; x={c - b}/{a}={x}", str(x)


# Chains of units, largest first, with the factor between neighbours. Unit names are unique.
_UNIT_CHAINS: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...] = (
    (("km", "m", "cm", "mm"), (1000, 100, 10)),
    (("t", "kg", "g", "mg"), (1000, 1000, 1000)),
    (("day", "h", "min", "s"), (24, 60, 60)),
    (("l", "ml"), (1000,)),
)
_UNIT_AT = {u: (c, i) for c, (units, _) in enumerate(_UNIT_CHAINS) for i, u in enumerate(units)}


def _units_sample(rng: random.Random, d: int) -> tuple[int, str, str]:
    units, factors = rng.choice(_UNIT_CHAINS)
    hops = rng.randint(1, min(d, len(units) - 1))
    i = rng.randrange(len(units) - hops)
    q = rng.randint(1, _ndigits(d) - 1)
    if rng.random() < 0.5:  # large unit -> small unit: multiply
        return q, units[i], units[i + hops]
    total = 1
    for f in factors[i:i + hops]:
        total *= f
    return q * total, units[i + hops], units[i]  # small -> large, chosen to divide exactly


def _units_render(ops: tuple[int, str, str]) -> tuple[str, str, str]:
    """One hop of the chain per step, multiplying towards smaller units and dividing towards larger:
    2 km to cm -> "2*1000=2000; 2000*100=200000" -> 200000."""
    v, frm, to = ops
    c, i = _UNIT_AT[frm]
    _, j = _UNIT_AT[to]
    factors = _UNIT_CHAINS[c][1]
    steps = []
    if i < j:
        for f in factors[i:j]:
            steps.append(f"{v}*{f}={v * f}")
            v *= f
    else:
        for f in reversed(factors[j:i]):
            steps.append(f"{v}/{f}={v // f}")
            v //= f
    return f"{ops[0]} {frm} to {to}=?", "; ".join(steps), str(v)


def _sort_sample(rng: random.Random, d: int) -> tuple[int, ...]:
    return tuple(rng.randrange(_ndigits(d)) for _ in range(rng.randint(3, 4 + d)))


def _sort_render(ops: tuple[int, ...]) -> tuple[str, str, str]:
    """Ascending, duplicates kept; the step states how many numbers to write: "n=4"."""
    return f"sort {','.join(map(str, ops))}", f"n={len(ops)}", ",".join(map(str, sorted(ops)))


_COUNT_POOL = "abc123"


def _count_sample(rng: random.Random, d: int) -> tuple[str, str]:
    s = "".join(rng.choice(_COUNT_POOL) for _ in range(rng.randint(4 * d, 8 * d)))
    return rng.choice(_COUNT_POOL), s


def _count_render(ops: tuple[str, str]) -> tuple[str, str, str]:
    """A running count from 0, one number per match left to right: b in a1bb3c -> "0 1 2" -> 2."""
    target, s = ops
    n = s.count(target)
    return f"count {target} in {s}", " ".join(str(k) for k in range(n + 1)), str(n)


def _key_join(ops: Sequence[Any]) -> str:
    return ",".join(map(str, ops))


TASKS: dict[str, TaskSpec] = {
    "add": TaskSpec("add", "multi-digit addition, column by column with carries", _add_sample,
                    lambda ops: _key_join(sorted(ops)), _add_render),
    "mul": TaskSpec("mul", "multi-digit times one-digit, digit by digit with carries", _mul_sample,
                    _key_join, _mul_render),
    "mod": TaskSpec("mod", "remainder of a division (a mod m) via quotient and subtraction", _mod_sample,
                    _key_join, _mod_render),
    "lineq": TaskSpec("lineq", "solve a*x+b=c for integer x, one inverse operation per step", _lineq_sample,
                      _key_join, _lineq_render),
    "units": TaskSpec("units", "unit conversion (length, mass, time, volume) along a unit chain",
                      _units_sample, _key_join, _units_render),
    "sort": TaskSpec("sort", "sort a short list of numbers ascending", _sort_sample,
                     lambda ops: _key_join(sorted(ops)), _sort_render),
    "count": TaskSpec("count", "count occurrences of a letter or digit in a string", _count_sample,
                      _key_join, _count_render),
}


# ---- generation ----------------------------------------------------------------------------------

def make_problems(split: str, n: int, seed: int = 0, tasks: Sequence[str] | str | None = None,
             difficulty: int = 1) -> list[Problem]:
    """`n` problems of `split` ("train" or "test"), deterministic in (split, n, seed, tasks, difficulty).

    Tasks (all of `TASKS` when None; a string is a comma-separated list) take turns round-robin, so
    each gets n/len(tasks) problems; a name listed twice gets twice the share. Problems are drawn
    with replacement from the split's own buckets, so a split may repeat a problem (most often for
    small operand spaces, e.g. "mul" at difficulty 1 has 800 problems), but never shares one with
    the other split. The first k problems of a call with n > k are the problems of the call with k.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    names = _task_names(tasks)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: must be an integer >= 0")
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 1:
        raise ValueError(f"difficulty={difficulty!r}: must be an integer >= 1")
    # A str seed goes through sha512 in `random.seed`: the same stream in every process.
    rng = random.Random(f"behemoth.data.tasks|{split}|{seed}|{difficulty}|{','.join(names)}")
    return [_draw(TASKS[names[i % len(names)]], rng, difficulty, split) for i in range(n)]


def distinct_problems(split: str, n: int, seed: int = 0, tasks: Sequence[str] | str | None = None,
                      difficulty: int = 1, patience: int = 2000) -> list[Problem]:
    """Up to `n` *distinct* problems of `split`, `n / len(tasks)` per task (rounded up), for evaluation: a
    problem counted twice would make an accuracy's interval look tighter than the evidence. A task whose
    split holds fewer problems gives all it has: drawing stops after `patience` draws in a row that find no
    new one (at difficulty 1 the test split holds 93 "mul" and 92 "mod" problems). Deterministic in the
    arguments; tasks take turns round-robin as in `make_problems`, and an exhausted task drops out."""
    names = _task_names(tasks)
    per_task = -(-n // len(names)) if n > 0 else 0
    pools = {name: _problem_stream(split, seed, name, difficulty) for name in dict.fromkeys(names)}
    chosen: dict[str, list[Problem]] = {name: [] for name in pools}
    for name, stream in pools.items():
        seen: set[str] = set()
        misses = 0
        while len(chosen[name]) < per_task and misses < patience:
            p = next(stream)
            if p.key in seen:
                misses += 1
                continue
            seen.add(p.key)
            chosen[name].append(p)
            misses = 0
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in chosen.values()):
        out += [v[i] for v in chosen.values() if i < len(v)][: n - len(out)]
        i += 1
    return out


def _problem_stream(split: str, seed: int, task: str, difficulty: int = 1):
    """An endless, deterministic stream of one task's problems of `split` (with repeats)."""
    rng = random.Random(f"behemoth.data.tasks.stream|{split}|{seed}|{difficulty}|{task}")
    while True:
        yield _draw(TASKS[task], rng, difficulty, split)


def _task_names(tasks: Sequence[str] | str | None) -> list[str]:
    if tasks is None:
        return list(TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("tasks=[]: must name at least one task")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown task(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(TASKS)})")
    return names


def _draw(spec: TaskSpec, rng: random.Random, difficulty: int, split: str) -> Problem:
    """Rejection sampling: candidates until one whose canonical key falls in `split`'s buckets."""
    for _ in range(_MAX_TRIES):
        ops = spec.sample(rng, difficulty)
        if split_of(spec.canonical_key(ops)) == split:
            return spec.build(ops)
    raise RuntimeError(f"task {spec.name!r}: no {split} problem in {_MAX_TRIES} candidates "
                       f"at difficulty {difficulty}")


# ---- scoring -----------------------------------------------------------------------------------

def extract_answer(generated: str) -> str | None:
    """The text after the first "####" up to the next newline (or the end), stripped; None when
    there is no "####" or nothing after it."""
    at = generated.find(ANSWER_MARK)
    if at < 0:
        return None
    answer = generated[at + len(ANSWER_MARK):].split("\n", 1)[0].strip()
    return answer or None


def check(problem: Problem, generated: str) -> bool:
    """True when the generation's final answer is exactly `problem.answer`. `generated` is the
    model's continuation of `problem.prompt` (a full document works too: prompts hold no "####")."""
    return extract_answer(generated) == problem.answer


def accuracy(problems: Sequence[Problem], generations: Sequence[str]) -> dict[str, Any]:
    """{"overall": share correct, "per_task": {task: share correct}, "n": number of problems}.
    Raises `ValueError` when the two lengths differ; an empty input scores 0.0."""
    if len(problems) != len(generations):
        raise ValueError(f"generations: {len(generations)} given for {len(problems)} problems")
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for p, g in zip(problems, generations, strict=True):
        total[p.task] = total.get(p.task, 0) + 1
        right[p.task] = right.get(p.task, 0) + int(check(p, g))
    n = len(problems)
    return {"overall": sum(right.values()) / n if n else 0.0,
            "per_task": {t: right[t] / total[t] for t in sorted(total)}, "n": n}

"""Built-in tasks: worked steps and answers recomputed independently, held-out splits, determinism,
difficulty scaling, the alphabet, answer extraction and scoring. CPU, a few seconds."""

from __future__ import annotations

import re

import pytest

from behemoth.data.tasks import (
    ALPHABET,
    TASKS,
    TEST_FRACTION,
    Problem,
    accuracy,
    check,
    extract_answer,
    make_problems,
    split_of,
)

REQUIRED = ("add", "mul", "mod", "lineq", "units", "sort", "count")


# ---- independent verifiers: parse the document, recompute with Python arithmetic --------------------

def _parts(p: Problem, prompt_re: str) -> tuple[tuple[str, ...], list[str]]:
    m = re.fullmatch(prompt_re, p.prompt)
    assert m, p.prompt
    assert p.solution.startswith(" ") and p.solution.endswith(f"; #### {p.answer}\n"), p.solution
    steps = p.solution[1:-len(f"; #### {p.answer}\n")].split("; ")
    return m.groups(), steps


def _verify_add(p: Problem) -> tuple[int, ...]:
    (a, b), steps = _parts(p, r"Q: (\d+)\+(\d+)=\?\nA:")
    ra, rb = a[::-1], b[::-1]
    assert len(steps) == max(len(a), len(b))
    digits, prev = [], 0
    for i, step in enumerate(steps):
        x, y, plus1, s = re.fullmatch(r"(\d)\+(\d)(\+1)?=(\d+)", step).groups()
        assert x == (ra[i] if i < len(ra) else "0") and y == (rb[i] if i < len(rb) else "0")
        assert bool(plus1) == (prev >= 10)  # the carry shows exactly when the last column overflowed
        prev = int(s)
        assert prev == int(x) + int(y) + (1 if plus1 else 0)
        digits.append(str(prev % 10))
    from_steps = ("1" if prev >= 10 else "") + "".join(reversed(digits))
    assert p.answer == from_steps == str(int(a) + int(b))
    return int(a), int(b)


def _verify_mul(p: Problem) -> tuple[int, ...]:
    (a, b), steps = _parts(p, r"Q: (\d+)\*(\d)=\?\nA:")
    assert len(steps) == len(a) and 2 <= int(b) <= 9
    digits, prev = [], 0
    for ch, step in zip(a[::-1], steps, strict=True):
        x, y, carry, r = re.fullmatch(r"(\d)\*(\d)(?:\+(\d))?=(\d+)", step).groups()
        assert x == ch and y == b
        assert int(carry or 0) == prev // 10 and (carry is None) == (prev // 10 == 0)
        prev = int(r)
        assert prev == int(x) * int(y) + int(carry or 0)
        digits.append(str(prev % 10))
    from_steps = (str(prev // 10) if prev >= 10 else "") + "".join(reversed(digits))
    assert p.answer == from_steps == str(int(a) * int(b))
    return int(a), int(b)


def _verify_mod(p: Problem) -> tuple[int, ...]:
    (a, m), steps = _parts(p, r"Q: (\d+)%(\d+)=\?\nA:")
    a, m = int(a), int(m)
    q, m2, prod = map(int, re.fullmatch(r"(\d+)\*(\d+)=(\d+)", steps[0]).groups())
    a2, prod2, r = map(int, re.fullmatch(r"(\d+)-(\d+)=(\d+)", steps[1]).groups())
    assert len(steps) == 2 and q == a // m and m2 == m and prod == q * m == prod2 and a2 == a and r == a - prod
    assert p.answer == str(r) == str(a % m)
    return a, m


def _verify_lineq(p: Problem) -> tuple[int, ...]:
    (a, b, c), steps = _parts(p, r"Q: (\d+)x([+-]\d+)=(-?\d+), x=\?\nA:")
    a, b, c, x = int(a), int(b), int(c), int(p.answer)
    assert a * x + b == c and b != 0
    g = re.fullmatch(r"(\d+)x=(-?\d+)([+-]\d+)=(-?\d+)", steps[0]).groups()
    assert (int(g[0]), int(g[1]), int(g[2]), int(g[3])) == (a, c, -b, c - b)
    g = re.fullmatch(r"x=(-?\d+)/(\d+)=(-?\d+)", steps[1]).groups()
    assert (int(g[0]), int(g[1]), int(g[2])) == (c - b, a, x) and len(steps) == 2
    return a, b, c


# Each unit in its chain's smallest unit, and the chains in order, written out here independently.
BASE = {"km": 10**6, "m": 1000, "cm": 10, "mm": 1, "t": 10**9, "kg": 10**6, "g": 1000, "mg": 1,
        "day": 86400, "h": 3600, "min": 60, "s": 1, "l": 1000, "ml": 1}
CHAINS = (["km", "m", "cm", "mm"], ["t", "kg", "g", "mg"], ["day", "h", "min", "s"], ["l", "ml"])


def _verify_units(p: Problem) -> tuple[int | str, ...]:
    (v, frm, to), steps = _parts(p, r"Q: (\d+) ([a-z]+) to ([a-z]+)=\?\nA:")
    v = int(v)
    chain = next(c for c in CHAINS if frm in c)
    assert to in chain and to != frm
    assert (v * BASE[frm]) % BASE[to] == 0
    expect = v * BASE[frm] // BASE[to]
    assert len(steps) == abs(chain.index(frm) - chain.index(to))  # one hop per step
    cur, i = v, chain.index(frm)
    for step in steps:
        x, op, f, y = re.fullmatch(r"(\d+)([*/])(\d+)=(\d+)", step).groups()
        j = i + 1 if op == "*" else i - 1
        assert int(x) == cur and int(f) == max(BASE[chain[i]], BASE[chain[j]]) // min(BASE[chain[i]], BASE[chain[j]])
        cur = int(x) * int(f) if op == "*" else int(x) // int(f)
        assert int(y) == cur and (op == "*" or int(x) % int(f) == 0)
        i = j
    assert chain[i] == to and p.answer == str(cur) == str(expect)
    return v, frm, to


def _verify_sort(p: Problem) -> tuple[int, ...]:
    (nums,), steps = _parts(p, r"Q: sort (\d+(?:,\d+)*)\nA:")
    nums = [int(x) for x in nums.split(",")]
    assert steps == [f"n={len(nums)}"]
    assert p.answer == ",".join(str(x) for x in sorted(nums))
    return tuple(nums)


def _verify_count(p: Problem) -> tuple[str, ...]:
    (target, s), steps = _parts(p, r"Q: count (\S) in (\S+)\nA:")
    n = sum(ch == target for ch in s)
    assert steps == [" ".join(str(k) for k in range(n + 1))] and p.answer == str(n)
    return target, s


VERIFY = {"add": _verify_add, "mul": _verify_mul, "mod": _verify_mod, "lineq": _verify_lineq,
          "units": _verify_units, "sort": _verify_sort, "count": _verify_count}


def _key(p: Problem) -> str:
    """The canonical key recomputed from the prompt: commutative operands sorted."""
    ops = VERIFY[p.task](p)
    if p.task in ("add", "sort"):
        ops = tuple(sorted(ops))
    return f"{p.task}:{','.join(map(str, ops))}"


# ---- tests ---------------------------------------------------------------------------------------

def test_required_tasks_exist():
    assert set(REQUIRED) <= set(TASKS)
    assert all(spec.name == name for name, spec in TASKS.items())


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_every_document_is_correct_and_well_formed(difficulty):
    for split in ("train", "test"):
        problems = make_problems(split, 700, seed=difficulty, difficulty=difficulty)
        assert {p.task for p in problems} == set(TASKS)
        for p in problems:
            assert p.text == p.prompt + p.solution and p.prompt.endswith("\nA:")
            assert p.text.count("\n") == 2 and p.text.count("####") == 1
            assert extract_answer(p.solution) == p.answer and check(p, p.solution) and check(p, p.text)
            assert p.key == _key(p)  # also re-verifies every step and the answer


def test_documents_are_short_at_difficulty_1():
    lengths = [len(p.text) for p in make_problems("train", 2000, seed=3)]
    assert max(lengths) <= 60
    assert sum(lengths) / len(lengths) < 48


def test_alphabet_covers_every_character():
    assert list(ALPHABET) == sorted(set(ALPHABET)) and "\n" in ALPHABET and " " in ALPHABET
    seen = set()
    for d in (1, 2, 3, 4):
        for split in ("train", "test"):
            for p in make_problems(split, 700, seed=d, difficulty=d):
                seen |= set(p.text)
    assert seen <= set(ALPHABET), sorted(seen - set(ALPHABET))
    assert set("0123456789+*%-/=?,;#") <= seen


def test_deterministic_and_prefix_stable():
    a = make_problems("train", 300, seed=7, difficulty=2)
    assert a == make_problems("train", 300, seed=7, difficulty=2)
    assert a[:100] == make_problems("train", 100, seed=7, difficulty=2)
    assert a != make_problems("train", 300, seed=8, difficulty=2)
    assert make_problems("test", 50, seed=7) != make_problems("train", 50, seed=7)
    assert make_problems("train", 10, tasks="add,mul") == make_problems("train", 10, tasks=["add", "mul"])


def test_pinned_documents():
    """Exact documents for a fixed call: generation must not depend on the process (`hash`) or change
    silently (trained checkpoints depend on the format)."""
    assert [p.text for p in make_problems("train", 3, seed=0, tasks=["add", "lineq", "units"])] == [
        "Q: 49+68=?\nA: 9+8=17; 4+6+1=11; #### 117\n",
        "Q: 6x+1=-11, x=?\nA: 6x=-11-1=-12; x=-12/6=-2; #### -2\n",
        "Q: 82 l to ml=?\nA: 82*1000=82000; #### 82000\n",
    ]
    assert [p.text for p in make_problems("test", 2, seed=0, tasks=["mod", "count"])] == [
        "Q: 49%4=?\nA: 12*4=48; 49-48=1; #### 1\n",
        "Q: count 3 in aa12\nA: 0; #### 0\n",
    ]
    assert split_of("add:47,85") == "train" and split_of("add:0,34") == "test"


def test_rounds_robin_over_the_tasks():
    problems = make_problems("train", 70)
    assert [p.task for p in problems[:7]] == list(TASKS)
    assert all(sum(p.task == t for p in problems) == 10 for t in TASKS)
    assert [p.task for p in make_problems("test", 6, tasks=["sort", "sort", "mod"])] == ["sort", "sort", "mod"] * 2


def test_train_and_test_are_disjoint_by_construction():
    train, test = set(), set()
    for seed in (0, 1, 2):
        train |= {_key(p) for p in make_problems("train", 20000, seed=seed)}
        test |= {_key(p) for p in make_problems("test", 2000, seed=seed)}
    assert train and test and not train & test
    # across difficulties too: the key does not depend on the difficulty
    hard_train = {_key(p) for p in make_problems("train", 5000, seed=0, difficulty=2)}
    assert not hard_train & test
    # and the buckets are what `split_of` says, about TEST_FRACTION of each task's problem space
    assert all(split_of(k) == "test" for k in test) and all(split_of(k) == "train" for k in train)
    keys = [f"mul:{a},{b}" for a in range(100) for b in range(2, 10)]
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert abs(share - TEST_FRACTION) < 0.03
    test_mul = {_key(p) for p in make_problems("test", 2000, tasks=["mul"])}
    assert test_mul == {k for k in keys if split_of(k) == "test"}  # all of them, and only them


def test_commutative_problems_share_a_split():
    for p in make_problems("test", 300, tasks=["add", "sort"]):
        if p.task == "add":
            a, b = map(int, p.prompt[3:-5].split("+"))  # b+a is the same problem: held out with it
            assert split_of(TASKS["add"].canonical_key((b, a))) == "test"
        else:
            nums = [int(x) for x in p.prompt[8:-3].split(",")]
            assert split_of(TASKS["sort"].canonical_key(tuple(reversed(nums)))) == "test"
    assert TASKS["add"].canonical_key((85, 47)) == TASKS["add"].canonical_key((47, 85)) == "add:47,85"
    assert TASKS["sort"].canonical_key((3, 1, 2)) == TASKS["sort"].canonical_key((2, 3, 1))


def _size(p: Problem) -> int:
    """The operand size that `difficulty` scales, per task."""
    ops = VERIFY[p.task](p)
    if p.task in ("add", "mul", "mod"):
        return max(ops)
    if p.task == "lineq":
        return abs(int(p.answer)) + abs(ops[1])
    if p.task == "units":
        return max(ops[0], int(p.answer))
    if p.task == "sort":
        return len(ops) * max(ops)
    return len(ops[1])


def test_difficulty_increases_operand_sizes():
    for task in TASKS:
        means = []
        for d in (1, 2, 3):
            sizes = [_size(p) for p in make_problems("train", 200, seed=0, tasks=[task], difficulty=d)]
            means.append(sum(sizes) / len(sizes))
        assert means[0] < means[1] < means[2], (task, means)
    assert max(len(a) for p in make_problems("train", 300, tasks=["add"], difficulty=1)
               for a in p.prompt[3:-5].split("+")) == 2
    assert max(len(a) for p in make_problems("train", 300, tasks=["add"], difficulty=3)
               for a in p.prompt[3:-5].split("+")) == 4
    # unit conversions: one hop at difficulty 1, several at 3
    hops = [len(p.solution.split("; ")) - 1 for p in make_problems("train", 300, tasks=["units"], difficulty=3)]
    assert all(h == 1 for p in make_problems("train", 100, tasks=["units"])
               for h in [len(p.solution.split("; ")) - 1]) and max(hops) == 3


def test_extract_answer_and_check():
    p = Problem("add", "Q: 47+85=?\nA:", " 7+5=12; 4+8+1=13; #### 132\n", "132")
    assert extract_answer(p.solution) == "132" and check(p, p.solution)
    assert check(p, " 7+5=12; #### 132")  # no newline at the end: up to the end
    assert check(p, " ####   132  \nQ: 1+1=?\nA: #### 2\n")  # the first answer, stripped; the rest ignored
    assert extract_answer(" #### 131\n") == "131" and not check(p, " #### 131\n")
    assert not check(p, " #### 1320\n") and not check(p, " #### 132 c\n") and not check(p, " #### -132\n")
    for bad in ("", " 7+5=12; 4+8+1=13; 132\n", " ### 132\n", " ####\n", " ####   \n132", "#### \n"):
        assert extract_answer(bad) is None and not check(p, bad)
    q = Problem("lineq", "Q: 3x+5=-1, x=?\nA:", " 3x=-1-5=-6; x=-6/3=-2; #### -2\n", "-2")
    assert check(q, q.solution) and not check(q, " #### 2\n")


def test_accuracy():
    problems = make_problems("test", 6, tasks=["add", "mul", "sort"])
    gens = [p.solution for p in problems]
    gens[0] = " #### 0\n"  # add wrong
    gens[4] = "garbage"    # mul wrong
    r = accuracy(problems, gens)
    assert r == {"overall": 4 / 6, "per_task": {"add": 0.5, "mul": 0.5, "sort": 1.0}, "n": 6}
    assert accuracy([], []) == {"overall": 0.0, "per_task": {}, "n": 0}
    with pytest.raises(ValueError, match="generations"):
        accuracy(problems, gens[:-1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="valid"), "split='valid'"),
    (dict(tasks=["add", "integrate"]), "'integrate'"),
    (dict(tasks="add,bogus"), "'bogus'"),
    (dict(tasks=[]), "tasks"),
    (dict(difficulty=0), "difficulty=0"),
    (dict(difficulty=1.5), "difficulty=1.5"),
    (dict(n=-1), "n=-1"),
])
def test_bad_arguments_raise_naming_the_option(kwargs, match):
    args = dict(split="train", n=5) | kwargs
    with pytest.raises(ValueError, match=match):
        make_problems(**args)

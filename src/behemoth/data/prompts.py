"""Prompts to write completions for: the built-in tasks' training problems (never a held-out one), a JSONL of
{prompt, answer (optional), task (optional)}, or a text file of one prompt per non-blank line. What `behemoth
synthesize` writes answers to and on-policy distillation samples from; bad input is a `ValueError` naming the
file and line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from behemoth.data.tasks import Problem, make_problems


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, its reference `answer` (None: not verifiable by answer), its `task` (a built-in
    task's name, a JSONL's "task", else "all") and, for a built-in problem, the `problem` its checker grades."""

    index: int
    text: str
    answer: str | None = None
    task: str = "all"
    problem: Problem | None = None


def load_prompts(source: str | None, *, tasks: Sequence[str] | str | None = None, num_prompts: int = 1000,
                 difficulty: int = 1, seed: int = 0, prompt_field: str = "prompt",
                 answer_field: str = "answer") -> tuple[list[Prompt], dict]:
    """The prompts and a description of where they came from (with a fingerprint of their content): the
    built-in tasks' training problems when `source` is None (`num_prompts` of `tasks`), else a .jsonl or a
    text file (module docstring). Bad input is a `ValueError` naming the file and line."""
    if source is None:
        problems = make_problems("train", num_prompts, seed=seed, tasks=tasks, difficulty=difficulty)
        prompts = [Prompt(i, p.prompt, p.answer, p.task, p) for i, p in enumerate(problems)]
        desc = {"source": "tasks", "tasks": sorted({p.task for p in problems}), "difficulty": difficulty}
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--prompts {source}: no such file")
        prompts = (_jsonl_prompts(path, prompt_field, answer_field) if path.name.endswith(".jsonl")
                   else [Prompt(i, line) for i, line in enumerate(_text_lines(path))])
        if not prompts:
            raise ValueError(f"--prompts {source}: no prompts in it")
        desc = {"source": str(path)}
    digest = hashlib.sha256(json.dumps([[p.text, p.answer, p.task] for p in prompts]).encode()).hexdigest()
    return prompts, {**desc, "count": len(prompts), "fingerprint": digest}


def _text_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None


def _jsonl_prompts(path: Path, prompt_field: str, answer_field: str) -> list[Prompt]:
    out = []
    for lineno, line in enumerate(_text_lines(path), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(prompt_field), str) or not row[prompt_field]:
            raise ValueError(f"{path}:{lineno}: no {prompt_field!r} field with the prompt's text "
                             f"(fields: {', '.join(row) if isinstance(row, dict) else type(row).__name__})")
        answer = row.get(answer_field)
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise ValueError(f"{path}:{lineno}: {answer_field!r} must be a string or a number")
        out.append(Prompt(len(out), row[prompt_field], None if answer is None else str(answer),
                          str(row.get("task", "all"))))
    return out

"""EleutherAI's lm-evaluation-harness, for behemoth models: the built-in tasks as harness tasks, and the harness's
own tasks run in-process.

Two task definitions ship in `harness_tasks/` (YAML with local JSON lines data; no network):

* `behemoth_tasks_gen`: the held-out problems `behemoth eval` grades by default (`EXPORT`: 200 distinct test
  problems, seed 0, difficulty 1), greedy generation until the newline, exact match on the final answer after
  "####" (a regex filter equal to `data.tasks.extract_answer` on one line);
* `behemoth_tasks_mc`: the same problems as multiple choice scored by log-likelihood: the problem's own worked
  solution among three of other held-out problems of the same task (with other answers), at a position fixed by
  the problem's key.

Against a server: `behemoth serve`, then `lm_eval --model local-completions` with the server's tokenizer
(`tokenizer_backend=remote`) and `--include_path` this folder (the README has the command). In-process:
`behemoth eval --lm-eval TASKS` runs any harness task (these, or the harness's own where its datasets are at
hand) through `harness_lm.BehemothLM`, which batches requests through the model directly instead of over HTTP.

The harness is optional (`pip install lm_eval`); it is imported only here, and only when used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from behemoth.data.tasks import Problem, distinct_problems
from behemoth.data.tokenizer import Tokenizer

TASKS_DIR = Path(__file__).parent / "harness_tasks"
EXPORT = {"problems": 200, "seed": 0, "difficulty": 1}  # the problem set of `behemoth eval`'s defaults
CHOICES = 4


def task_records(problems: int = 200, seed: int = 0, difficulty: int = 1) -> tuple[list[dict], list[dict]]:
    """The records of the generation task and of the multiple-choice task, one per problem, in order."""
    test = distinct_problems("test", problems, seed=seed, difficulty=difficulty)
    gen = [{"task": p.task, "key": p.key, "prompt": p.prompt, "answer": p.answer} for p in test]
    return gen, [mc_record(p, test) for p in test]


def mc_record(p: Problem, pool: Sequence[Problem]) -> dict:
    """`p` as a multiple-choice record: its solution and those of the next problems of its task in `pool` (in
    order, wrapping around) with answers of their own, the right one at a position picked by `p.key`'s hash."""
    same = [q for q in pool if q.task == p.task]
    at = same.index(p)
    others, answers = [], {p.answer}
    for q in same[at + 1:] + same[:at]:
        if q.answer not in answers and len(others) < CHOICES - 1:
            others.append(q.solution)
            answers.add(q.answer)
    label = int(hashlib.sha256(p.key.encode()).hexdigest(), 16) % (len(others) + 1)
    choices = others[:label] + [p.solution] + others[label:]
    return {"task": p.task, "key": p.key, "prompt": p.prompt, "choices": choices, "label": label}


def export_tasks(out: str | Path, **export) -> list[Path]:
    """Write the two tasks' data (`behemoth_tasks_{gen,mc}.jsonl`) into `out`; `export`: `task_records`'s
    arguments (default `EXPORT`, the shipped set)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen, mc = task_records(**(EXPORT | export))
    paths = []
    for name, records in (("behemoth_tasks_gen", gen), ("behemoth_tasks_mc", mc)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


# ---- in-process -------------------------------------------------------------------------------------------

def _import_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--lm-eval needs lm-evaluation-harness ({e}): pip install lm_eval") from None


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """The harness's `TaskManager` over its own tasks, this folder's and `include_path`'s; every name in `tasks`
    must be known (checked before any model is loaded)."""
    _import_harness()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"--lm-eval: unknown task(s) {', '.join(unknown)} (behemoth's: behemoth_tasks_gen, "
                         "behemoth_tasks_mc; others need the harness's task definitions and their data)")
    return manager


def run_harness(model: nn.Module, tokenizer: Tokenizer, tasks: Sequence[str], batch_size: int = 32,
                limit: int | None = None, manager=None, log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate` on `tasks` (names, known to `manager`, default `task_manager(tasks)`) with
    `BehemothLM`. Returns the harness's results (per task metrics with their standard errors; samples if asked)."""
    from lm_eval import simple_evaluate

    from behemoth.eval.harness_lm import BehemothLM

    manager = manager or task_manager(tasks)
    return simple_evaluate(model=BehemothLM(model, tokenizer, batch_size), tasks=list(tasks), task_manager=manager,
                           limit=limit, log_samples=log_samples)


def harness_metrics(results: dict) -> dict:
    """The harness's per-task results as plain JSON: {task: {"n": documents, metric: value, metric + "_stderr": its
    standard error}} (metric names as the harness writes them, e.g. "exact_match,final_answer", "acc,none")."""
    out = {}
    for task, values in results["results"].items():
        row = {"n": int(results.get("n-samples", {}).get(task, {}).get("effective", values.get("sample_len", 0)))}
        for key, value in values.items():
            if key in ("name", "alias", "sample_len") or isinstance(value, str):
                continue
            row[key.replace("_stderr,", ",") + "_stderr" if "_stderr," in key else key] = float(value)
        out[task] = row
    return out

"""Evaluation results as model-card results (`checkpoint/model_card.py`): what `behemoth eval --card` and the demo
write into the evaluated model's card."""

from __future__ import annotations

from pathlib import Path

from behemoth.checkpoint.model_card import update_results


def card_results(report: dict, source: str) -> list[dict]:
    """An `evaluate_model` report as card results: held-out loss and bits per byte, KL to the teacher, exact match
    (overall and per task, each with its 95% interval and n), and any lm-evaluation-harness metrics (with
    +-1.96 standard errors as the interval)."""
    heldout = "held-out documents" if report.get("data") else "behemoth built-in tasks (held-out problems)"
    h = report["heldout"]
    out = [{"metric": "loss (nats/token)", "value": h["loss"], "dataset": heldout, "n": h["tokens"],
            "source": source}]
    if h.get("bits_per_byte") is not None:
        out.append({"metric": "bits per byte", "value": h["bits_per_byte"], "dataset": heldout, "n": h["tokens"],
                    "source": source})
    if "teacher_kl" in report:
        out.append({"metric": "KL(teacher || model) (nats/token)", "value": report["teacher_kl"]["kl"],
                    "dataset": heldout, "n": report["teacher_kl"]["tokens"], "source": source})
    t = report.get("tasks")
    if t:
        out.append({"metric": "exact match", "value": t["overall"], "interval": t["interval"], "n": t["n"],
                    "dataset": "behemoth built-in tasks (held-out problems)", "source": source})
        out += [{"metric": f"exact match ({task})", "value": v, "interval": t["per_task_interval"][task],
                 "n": t["per_task_n"][task], "dataset": "behemoth built-in tasks (held-out problems)",
                 "source": source} for task, v in t["per_task"].items()]
    for task, row in report.get("lm_eval", {}).items():
        for key, value in row.items():
            if key == "n" or key.endswith("_stderr"):
                continue
            se = row.get(key + "_stderr")
            out.append({"metric": key.split(",")[0], "value": value, "n": row["n"], "dataset": task,
                        "interval": None if se is None else [value - 1.96 * se, value + 1.96 * se],
                        "source": f"{source} (lm-evaluation-harness)"})
    return out


def write_card_results(model_dir: str | Path, report: dict, source: str) -> Path | None:
    """Replace the results of the card in `model_dir` with `report`'s; None where it has no card."""
    return update_results(model_dir, card_results(report, source))

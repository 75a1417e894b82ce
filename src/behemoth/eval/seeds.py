"""The demo over several seeds: each figure's spread, so that a claim rests on more than one training run.

`behemoth demo --seeds N` runs the whole story once per seed 0..N-1. A seed changes everything random in
training (the initial weights, the training problems drawn, the order of the batches) and nothing in
evaluation: every seed is measured on the same held-out problems (and pictures), so the seeds differ only
in training. Spreads are the mean, the sample standard deviation (n - 1) and the extremes over seeds.
"""

from __future__ import annotations

import datetime
import html
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from behemoth.eval.metrics import format_accuracy
from behemoth.machine import machine_info

STORY = ("teacher", "distilled", "scratch")  # the order the demo's story claims, best first
LABEL = {"accuracy": "accuracy", "heldout_loss": "held-out loss"}


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (None below two values), min and max of the defined values; the
    values themselves, None where a figure is undefined (a gap whose teacher equals its scratch student),
    and how many are."""
    xs = [v for v in values if v is not None]
    return {"values": list(values), "mean": statistics.fmean(xs) if xs else None,
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "min": min(xs, default=None),
            "max": max(xs, default=None), "undefined": len(values) - len(xs)}


def aggregate(reports: Sequence[dict]) -> dict:
    """Over the seeds' demo reports: each model's accuracy, held-out loss and KL to the teacher; the gap
    recovered (accuracy and loss); whether teacher > distilled > scratch held in every seed (by accuracy,
    and by held-out loss); and the vision student's accuracy and baseline when every seed has one."""
    models = {}
    for name in reports[0]["models"]:
        evs = [r["models"][name] for r in reports]
        models[name] = {"accuracy": spread([e["tasks"]["overall"] for e in evs]),
                        "heldout_loss": spread([e["heldout"]["loss"] for e in evs])}
        if all("teacher_kl" in e for e in evs):
            models[name]["teacher_kl"] = spread([e["teacher_kl"]["kl"] for e in evs])
        if all(e.get("routing") for e in evs):  # routing at the end of training (train.health.final_routing)
            models[name]["dead_experts"] = spread([e["routing"]["dead"] for e in evs])
            models[name]["worst_max_over_mean"] = spread([e["routing"]["worst_max_over_mean"] for e in evs])
    acc = [[r["models"][m]["tasks"]["overall"] for m in STORY] for r in reports]
    loss = [[r["models"][m]["heldout"]["loss"] for m in STORY] for r in reports]
    held = {"accuracy": [t > d > s for t, d, s in acc], "heldout_loss": [t < d < s for t, d, s in loss]}
    out = {"seeds": [r.get("seed", i) for i, r in enumerate(reports)], "models": models,
           "gap_recovered": {k: spread([r["gap_recovered"][k] for r in reports]) for k in reports[0]["gap_recovered"]},
           "ordering_held": {k: {"per_seed": v, "every_seed": all(v)} for k, v in held.items()}}
    if all(r.get("distilled_vs_scratch") for r in reports):  # the students problem by problem, per seed
        pairs = [r["distilled_vs_scratch"] for r in reports]
        out["distilled_vs_scratch"] = {"difference": spread([p["difference"] for p in pairs]),
                                       "p_values": [p["p_value"] for p in pairs],
                                       "ahead_at_5_percent": sum(p["difference"] > 0 and p["p_value"] < 0.05
                                                                 for p in pairs)}
    if all(r.get("drafts") for r in reports):  # the students as the teacher's speculative drafts
        out["draft_acceptance"] = {m: spread([r["drafts"][m]["acceptance"] for r in reports])
                                   for m in reports[0]["drafts"]}
    if all("vision" in r for r in reports):
        out["vision"] = {k: spread([r["vision"][k]["overall"] for r in reports])
                         for k in ("accuracy", "majority_baseline")}
        if all(r["vision"].get("routing") for r in reports):
            out["vision"]["dead_experts"] = spread([r["vision"]["routing"]["dead"] for r in reports])
            out["vision"]["worst_max_over_mean"] = spread([r["vision"]["routing"]["worst_max_over_mean"]
                                                           for r in reports])
    return out


def _pm(s: dict, fmt: str, pct: bool = False) -> str:
    """A spread as mean ± std [min, max] (in percent points for shares)."""
    k = 100 if pct else 1
    if s["mean"] is None:
        return "n/a"
    std = "" if s["std"] is None else f" ± {format(k * s['std'], fmt)}"
    return f"{format(k * s['mean'], fmt)}{std} [{format(k * s['min'], fmt)}, {format(k * s['max'], fmt)}]"


def format_aggregate(agg: dict) -> str:
    """The table over seeds: each model's mean ± sample std [min, max]; each seed's gap recovered with the
    gaps' spread; in how many seeds the story's order held; the vision student's accuracy."""
    n = len(agg["seeds"])
    rows = [f"over {n} seeds ({', '.join(map(str, agg['seeds']))}): mean ± sample std [min, max]",
            f"{'model':<11}{'accuracy (%)':>30}{'held-out loss':>36}{'KL':>32}"]
    for name, m in agg["models"].items():
        kl = _pm(m["teacher_kl"], ".3f") if "teacher_kl" in m else "-"
        rows.append(f"{name:<11}{_pm(m['accuracy'], '.1f', pct=True):>30}{_pm(m['heldout_loss'], '.4f'):>36}"
                    f"{kl:>32}")
    for key, g in agg["gap_recovered"].items():
        per = ", ".join("n/a" if v is None else f"{v:.0%}" for v in g["values"])
        summary = "undefined in every seed" if g["mean"] is None else (
            f"mean {g['mean']:.0%}" + ("" if g["std"] is None else f" ± {g['std']:.0%}") + f", min {g['min']:.0%}")
        rows.append(f"gap recovered, {LABEL.get(key, key)}: per seed {per}; {summary}")
    routed = {name: m for name, m in {**agg["models"], **({"vision": agg["vision"]} if "vision" in agg else {})}.items()
              if "dead_experts" in m}
    if routed:
        rows.append("routing at the end, largest over seeds: " + "; ".join(
            f"{name} dead experts {m['dead_experts']['max']:.0f}, max/mean load {m['worst_max_over_mean']['max']:.2f}"
            for name, m in routed.items()))
    if "draft_acceptance" in agg:
        rows.append("as the teacher's speculative draft, share of drafts accepted (%): " + "; ".join(
            f"{name} {_pm(m, '.1f', pct=True)}" for name, m in agg["draft_acceptance"].items()))
    held = agg["ordering_held"]
    rows.append("teacher > distilled > scratch: " + "; ".join(
        f"by {LABEL[k]} in {sum(v['per_seed'])} of {n} seeds" for k, v in held.items()))
    if "distilled_vs_scratch" in agg:
        p = agg["distilled_vs_scratch"]
        rows.append(f"distilled vs scratch on the same problems: {_pm(p['difference'], '.1f', pct=True)} points; "
                    f"ahead at McNemar p < 0.05 in {p['ahead_at_5_percent']} of {n} seeds (p = "
                    + ", ".join(f"{x:.2g}" for x in p["p_values"]) + ")")
    if "vision" in agg:
        v = agg["vision"]
        rows.append(f"vision held-out accuracy (%): {_pm(v['accuracy'], '.1f', pct=True)} vs majority-answer "
                    f"baseline {_pm(v['majority_baseline'], '.1f', pct=True)}")
    return "\n".join(rows)


def seed_figures(report: dict) -> dict:
    """One seed's headline figures (what a README cites): each model's accuracy with its interval and n,
    held-out loss and KL; the gap recovered; the story's checks; the vision student's accuracy."""
    models = {}
    for name, ev in report["models"].items():
        t = ev["tasks"]
        sizes = {k: ev[k] for k in ("params", "active_params") if k in ev}
        models[name] = {**sizes, "accuracy": t["overall"], "interval": t.get("interval"), "n": t["n"],
                        "heldout_loss": ev["heldout"]["loss"]}
        if "teacher_kl" in ev:
            models[name]["teacher_kl"] = ev["teacher_kl"]["kl"]
        if ev.get("routing"):
            models[name]["routing"] = ev["routing"]
    out = {"seed": report.get("seed", 0), "models": models, "gap_recovered": report["gap_recovered"],
           "story_holds": report["story_holds"], "wall_seconds": report["wall_seconds"]}
    if "distilled_vs_scratch" in report:
        out["distilled_vs_scratch"] = report["distilled_vs_scratch"]
    if "vision" in report:
        a, b = report["vision"]["accuracy"], report["vision"]["majority_baseline"]
        out["vision"] = {"accuracy": a["overall"], "interval": a.get("interval"), "n": a["n"],
                         "majority_baseline": b["overall"], "baseline_interval": b.get("interval"),
                         "routing": report["vision"].get("routing")}
    return out


def write_results(path: Path, reports: Sequence[dict], agg: dict, settings: dict) -> Path:
    """The file a README cites: the run's settings, the date and machine, each seed's figures, the aggregate."""
    result = {"benchmark": "demo", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine_info(), **settings, "per_seed": [seed_figures(r) for r in reports],
              "aggregate": agg}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def write_summary_html(agg: dict, reports: Sequence[dict], seed_dirs: Sequence[str], out: Path) -> Path:
    """The page over seeds: the spread table, and one row per seed (its figures, a link to its own report)."""
    table = html.escape(format_aggregate(agg))
    rows = []
    for r, d in zip(reports, seed_dirs, strict=True):
        cells = [f"<a href='{html.escape(d)}/report.html'>seed {r.get('seed', '?')}</a>"]
        cells += [format_accuracy(r["models"][m]["tasks"]["overall"], r["models"][m]["tasks"].get("interval"))
                  for m in STORY]
        cells += ["n/a" if r["gap_recovered"][k] is None else f"{r['gap_recovered'][k]:.0%}"
                  for k in ("accuracy", "heldout_loss")]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>behemoth demo over seeds</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>Teacher, distilled student, scratch student: {len(reports)} seeds</h1>
<p>The same story once per seed; a seed changes the training (initial weights, training problems, batch order),
never the held-out problems. Accuracies are exact match with 95% Wilson intervals; spreads are over seeds.</p>
<pre>{table}</pre>
<table><tr><th>seed (its report)</th><th>teacher</th><th>distilled</th><th>scratch</th>
<th>gap recovered, accuracy</th><th>gap recovered, held-out loss</th></tr>{''.join(rows)}</table>
</body></html>"""
    out.write_text(page)
    return out

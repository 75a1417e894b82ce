"""A self-contained HTML report (plots embedded as PNG data URIs) from a demo's report.json."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from behemoth.eval.metrics import format_accuracy
from behemoth.runlog import read_metrics
from behemoth.train.health import final_routing


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img_file(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def _paired(p: dict | None) -> str:
    """The two students on the same problems (`eval.metrics.paired_comparison`); nothing for older reports."""
    if not p:
        return ""
    lo, hi = p["interval"]
    return (f"<p><b>Distilled vs scratch, problem by problem</b> ({p['n']} problems): {p['difference'] * 100:+.1f} "
            f"points [{lo * 100:+.1f}, {hi * 100:+.1f}] (paired 95% interval); the distilled student alone was right "
            f"on {p['a_only']}, the scratch student alone on {p['b_only']} (exact McNemar p = {p['p_value']:.2g}).</p>")


def _drafts(drafts: dict | None) -> str:
    """The students as the teacher's speculative drafts (`demo.draft_acceptance`); nothing for older reports."""
    if not drafts:
        return ""
    k, n = drafts["distilled"]["k"], drafts["distilled"]["prompts"]
    cells = "".join(f"<tr><td>{html.escape(name)}</td><td>{d['acceptance']:.1%}</td><td>{d['tokens_per_step']:.2f}</td>"
                    "</tr>" for name, d in drafts.items())
    return (f"<p><b>Students as the teacher's speculative draft</b> (greedy, k = {k}, {n} held-out prompts; the "
            "teacher's output is its own either way): the share of the student's proposals the teacher accepts, "
            "and the tokens the teacher gains per verify step.</p><table><tr><th>draft</th><th>accepted</th>"
            f"<th>tokens per teacher step</th></tr>{cells}</table>")


def write_html(report: dict, run_dirs: dict[str, Path], out: Path, vision_dir: Path | None = None) -> Path:
    """Loss curves, accuracy per task, parameters and speed, gap recovered, expert load, routing stability; and,
    when the report has a `vision` part (its run in `vision_dir`), the multimodal student's section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    loss_png, acc_png = _loss_chart(run_dirs, plt), _accuracy_chart(models, plt)
    rows = "".join(_row(n, ev) for n, ev in models.items())
    gap = report["gap_recovered"]
    gap_text = ", ".join(f"{k.replace('_', ' ')}: {'n/a' if v is None else f'{v:.0%}'}" for k, v in gap.items())
    heatmaps = "".join(
        f"<h3>{html.escape(n)}</h3><img src='{src}' style='max-width:100%'>"
        for n, d in run_dirs.items() if (src := _img_file(d / "expert_load.png")))
    samples = "".join(
        f"<tr><td>{html.escape(n)}</td><td><pre>{html.escape(s['prompt'])}</pre></td><td>{html.escape(s['expected'])}"
        f"</td><td><pre>{html.escape(s['generated'])}</pre></td></tr>"
        for n, ev in models.items() for s in ev["tasks"]["samples"][:2])
    recipe = html.escape(", ".join(f"{k}={v}" for k, v in report["recipe"].items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>behemoth demo report</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
pre{{margin:0;text-align:left}}</style></head><body>
<h1>Teacher, distilled student, scratch student</h1>
<p>mini-behemoth teacher; mini-maverick students trained on the same tokens, one distilled from the teacher,
one from scratch; evaluated on held-out problems that never appear in training. Recipe: {recipe}.
Wall time {report['wall_seconds'] / 60:.1f} min.</p>
<table><tr><th>model</th><th>params</th><th>active/token</th><th>train tokens/s</th><th>held-out loss</th>
<th>bits/byte</th><th>perplexity</th><th>KL(teacher||model)</th><th>exact match [95% interval]</th></tr>{rows}</table>
{_per_task_table(models)}
<p><b>Gap recovered</b> = (distilled − scratch) / (teacher − scratch): {gap_text}.</p>
{_paired(report.get("distilled_vs_scratch"))}
{_drafts(report.get("drafts"))}
<h2>Training loss</h2><img src="{loss_png}"><h2>Accuracy per task</h2><img src="{acc_png}">
<h2>Expert load over training</h2>{heatmaps}
{_stability_table(run_dirs)}
<h2>Sample answers</h2><table><tr><th>model</th><th>prompt</th><th>expected</th><th>generated</th></tr>{samples}</table>
{_vision_section(report["vision"], vision_dir, plt) if "vision" in report and vision_dir else ""}
</body></html>"""
    out.write_text(page)
    return out


def _loss_chart(run_dirs: dict[str, Path], plt) -> str:
    """Each run's next-token loss over training tokens (log scale), as a PNG data URI."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, run in run_dirs.items():
        train = [r for r in read_metrics(run) if r.get("type") == "train"]
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("next-token loss (hard labels)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    png = _png(fig)
    plt.close(fig)
    return png


def _accuracy_chart(models: dict[str, dict], plt) -> str:
    """Exact match per task, one bar per model, as a PNG data URI."""
    tasks = sorted(next(iter(models.values()))["tasks"]["per_task"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(models)
    for i, (name, ev) in enumerate(models.items()):
        ax.bar([t + i * width for t in range(len(tasks))], [ev["tasks"]["per_task"][t] for t in tasks], width,
               yerr=_error_bars(ev["tasks"], tasks), capsize=2,
               label=f"{name} ({format_accuracy(ev['tasks']['overall'], ev['tasks'].get('interval'))})")
    ax.set_xticks([t + width * (len(models) - 1) / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("exact match (lines: 95% interval)")
    ax.set_ylim(0, 1)
    ax.legend()
    png = _png(fig)
    plt.close(fig)
    return png


def _error_bars(acc: dict, tasks: list[str]) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bars [below, above] from each task's 95% interval (None without)."""
    if "per_task_interval" not in acc:
        return None
    share, ci = acc["per_task"], acc["per_task_interval"]
    return [[max(0.0, share[t] - ci[t][0]) for t in tasks], [max(0.0, ci[t][1] - share[t]) for t in tasks]]


def _bpb(ev: dict) -> str:
    """Held-out bits per byte (tokenizer-free; "-" for reports written before it)."""
    b = ev["heldout"].get("bits_per_byte")
    return "-" if b is None else f"{b:.4f}"


def _row(name: str, ev: dict) -> str:
    kl = f"{ev['teacher_kl']['kl']:.4f}" if "teacher_kl" in ev else "-"
    cells = [html.escape(name), f"{ev['params']:,}", f"{ev['active_params']:,}", f"{ev['tokens_per_s']:,.0f}",
             f"{ev['heldout']['loss']:.4f}", _bpb(ev), f"{ev['heldout']['ppl']:.3f}", kl,
             format_accuracy(ev["tasks"]["overall"], ev["tasks"].get("interval"))]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _per_task_table(models: dict[str, dict]) -> str:
    """Exact match per task with its 95% Wilson interval, one column per model (empty for old reports)."""
    if not all("per_task_interval" in ev["tasks"] for ev in models.values()):
        return ""
    first = next(iter(models.values()))["tasks"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in models)
    rows = "".join(f"<tr><td>{html.escape(t)} (n={first['per_task_n'][t]})</td>" + "".join(
        f"<td>{format_accuracy(ev['tasks']['per_task'][t], ev['tasks']['per_task_interval'][t])}</td>"
        for ev in models.values()) + "</tr>" for t in sorted(first["per_task"]))
    return (f"<p>Exact match per task, with 95% Wilson score intervals (n held-out problems each):</p>"
            f"<table><tr><th>task</th>{head}</tr>{rows}</table>")


def _vision_section(v: dict, run_dir: Path, plt) -> str:
    """The multimodal student: accuracy per task next to the majority-answer baseline, its training loss,
    and sample pictures with the question, the expected and the generated answer."""
    tasks = sorted(v["accuracy"]["per_task"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = range(len(tasks))
    a, b = v["accuracy"], v["majority_baseline"]
    ax1.bar([t - 0.2 for t in x], [a["per_task"][t] for t in tasks], 0.4, yerr=_error_bars(a, tasks), capsize=2,
            label=f"mini-maverick-vl ({format_accuracy(a['overall'], a.get('interval'))})")
    ax1.bar([t + 0.2 for t in x], [b["per_task"][t] for t in tasks], 0.4, color="#bbb",
            yerr=_error_bars(b, tasks), capsize=2,
            label=f"majority answer ({format_accuracy(b['overall'], b.get('interval'))})")
    ax1.set_xticks(list(x), tasks)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("exact match, held-out pictures")
    ax1.legend(fontsize=8)
    train = [r for r in read_metrics(run_dir) if r.get("type") == "train"]
    ax2.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss (answer text)")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    chart = _png(fig)
    plt.close(fig)
    samples = "".join(
        f"<tr><td><img src='{_img_file(run_dir / s['image']) or ''}' width=96 style='image-rendering:pixelated'>"
        f"</td><td><pre>{html.escape(s['prompt'])}</pre></td><td>{html.escape(s['expected'])}</td>"
        f"<td><pre>{html.escape(s['generated'])}</pre></td></tr>" for s in v["accuracy"]["samples"] if "image" in s)
    return f"""<h1>Learning from pictures</h1>
<p>mini-maverick-vl ({v['params']:,} parameters: mini-maverick with a small vision tower) trained from scratch for
{v['recipe']['steps']} steps on the built-in visual tasks (count the shapes of a colour, read a seven-segment
digit, which shape is bigger), evaluated on {v['accuracy']['n']} pictures never seen in training: exact match
{format_accuracy(v['accuracy']['overall'], v['accuracy'].get('interval'))} (95% Wilson interval). The baseline
always gives each task's most common training answer, what a model blind to the picture can reach:
{format_accuracy(v['majority_baseline']['overall'], v['majority_baseline'].get('interval'))}. Bars show 95%
intervals.</p>
<img src="{chart}"><table><tr><th>picture</th><th>question</th><th>expected</th><th>generated</th></tr>{samples}
</table>"""


def _stability_table(run_dirs: dict[str, Path]) -> str:
    """Each run's routing at its end (`train.health.final_routing`, as the demo's printed table): flip rate and
    selection margin on the fixed probe batch (means over MoE layers), dead experts, the worst layer's
    max/mean load, the run's `routing_unstable` warnings; then its routing_stability.png. Empty when no run
    logged routing."""
    rows, plots = [], []
    for name, run in run_dirs.items():
        records = read_metrics(run)
        steps = max((r["step"] for r in records if r.get("type") == "routing"), default=0)
        end = final_routing(records, steps)
        if end is None:
            continue
        flip, margin = end["flip_rate"], end["margin"]
        cells = [html.escape(name), str(end["step"]), "-" if flip is None else f"{flip:.1%}",
                 "-" if margin is None else f"{margin:.3f}", str(end["dead"]), f"{end['worst_max_over_mean']:.2f}",
                 str(sum(r.get("event") == "routing_unstable" for r in records))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        if src := _img_file(run / "routing_stability.png"):
            plots.append(f"<h3>{html.escape(name)}</h3><img src='{src}' style='max-width:100%'>")
    if not rows:
        return ""
    return ("<h2>Routing stability</h2><p>At each run's last full health window, on a fixed probe batch: the share of "
            "routed slots whose expert changed since the previous report (flip rate) and the biased-score gap between "
            "the last chosen and the best unchosen expert (margin), means over MoE layers; dead experts and the worst "
            "layer's max/mean load over that window; instability warnings over the run.</p><table><tr><th>model"
            "</th><th>step</th><th>flip rate</th><th>margin</th><th>dead experts</th><th>worst max/mean load</th>"
            f"<th>instability warnings</th></tr>{''.join(rows)}</table>{''.join(plots)}")

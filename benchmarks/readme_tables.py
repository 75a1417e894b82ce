"""The README's tables of figures, written from the results files in benchmarks/results/ (and nowhere else).

Each table sits in README.md between `<!-- table: NAME (FILE; COMMAND) -->` and `<!-- /table -->`: NAME picks
its renderer below, FILE is what it reads, COMMAND the command that wrote FILE. This script rewrites every such
block from its file; `--check` rewrites nothing and exits 1 naming each table that differs (the test suite runs
it, so a README table and its file cannot disagree). `--presets` writes presets.json from the code (parameter
counts are computed from the configs, nothing is allocated).

    .venv/bin/python benchmarks/readme_tables.py            # rewrite README.md's tables from the files
    .venv/bin/python benchmarks/readme_tables.py --check    # exit 1 if any table differs from its file
    .venv/bin/python benchmarks/readme_tables.py --presets  # refresh benchmarks/results/presets.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- table: (\w+) \((\S+); ([^)]*)\) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)


def _pm(cell: dict, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """mean ± sample std (just the mean for one seed)."""
    std = cell.get("std")
    return f"{cell['mean'] * scale:{fmt}}" + ("" if std is None else f" ± {std * scale:{fmt}}") + unit


def _ci(share: float, interval) -> str:
    return f"{share:.1%} [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"


# ---- one renderer per table: (the file's parsed content) -> markdown rows ------------------------------------

PRESET_WHAT = {
    "debug": "every feature at toy size (NoPE, chunked masks, temperature tuning, dense + MoE); CPU, seconds",
    "tiny": "small Scout-shaped model for CPU experiments",
    "scout": "Llama 4 Scout 17B-16E (official config)",
    "maverick": "Llama 4 Maverick 17B-128E (official config)",
    "behemoth": "**estimate** (no config is public): from Meta's 288B active / ~2T total / 16 experts; Scout-style "
                "blocks at D=16384, 88 layers, expert width 26624",
    "bench-1b": "the standard GPU training benchmark: 8 experts top-1 + shared in every layer",
    "mini-behemoth": "CPU teacher: 16 experts + shared, MoE in every layer",
    "mini-maverick": "CPU student: 32 small experts, MoE every other layer",
    "mini-maverick-vl": "mini-maverick + a small vision tower (64-pixel tiles, 16 tokens per tile) for the built-in "
                        "visual tasks",
}


def preset_counts() -> dict:
    """Each preset's total and active parameters (text model, vision tower and projector), from its config."""
    from behemoth.config import PRESETS

    out = {}
    for name, cfg in PRESETS.items():
        parts = cfg.param_breakdown()["total"]
        out[name] = {"total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
                     "vision_params": parts.get("vision_tower", 0), "projector_params": parts.get("projector", 0)}
    return out


def presets(d: dict) -> list[str]:
    rows = ["| preset | what | total params | active / token |", "|---|---|---:|---:|"]
    for name, c in d["presets"].items():
        what = PRESET_WHAT.get(name, "")
        if c["vision_params"] and name in ("scout", "maverick"):
            text = c["total_params"] - c["vision_params"] - c["projector_params"]
            what += (f": text model {text:,} + vision tower {c['vision_params']:,} + projector "
                     f"{c['projector_params']:,}")
        rows.append(f"| `{name}` | {what} | {c['total_params']:,} | {c['active_params']:,} |")
    return rows


DEMO_MODELS = {"teacher": "teacher (mini-behemoth)", "distilled": "distilled student (mini-maverick)",
               "scratch": "scratch student (mini-maverick)"}


def demo_seeds(d: dict) -> list[str]:
    seeds = d["aggregate"]["seeds"]
    rows = ["| model | params | active/token | " + " | ".join(f"seed {s}" for s in seeds) +
            " | exact match | held-out loss | KL to teacher |", "|---|---:|---:|" + "---:|" * (len(seeds) + 3)]
    for name, label in DEMO_MODELS.items():
        agg = d["aggregate"]["models"][name]
        first = d["per_seed"][0]["models"][name]
        per = [_ci(s["models"][name]["accuracy"], s["models"][name]["interval"]) for s in d["per_seed"]]
        kl = _pm(agg["teacher_kl"], ".3f") if "teacher_kl" in agg else "–"
        rows.append(f"| {label} | {first['params']:,} | {first['active_params']:,} | " + " | ".join(per) +
                    f" | {_pm(agg['accuracy'], '.1f', 100, '%')} | {_pm(agg['heldout_loss'], '.4f')} | {kl} |")
    return rows


CROSS_LABELS = {"scratch": "scratch", "same-tokenizer": "same tokenizer (character teacher, dense KD)",
                "marginal": "**across tokenizers, marginal** (default)", "aligned": "across, aligned, prefix matching",
                "hybrid": "across, hybrid, prefix matching", "aligned-exact": "across, aligned, exact matching",
                "hybrid-exact": "across, hybrid, exact matching", "uld": "across, ULD"}
CROSS_TEACHERS = {"bpe": "teacher (Qwen 2, BPE)", "chars": "teacher (Qwen 2, characters)"}


def cross_family(d: dict) -> list[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cross_family as bench  # the benchmark's own table, with the README's labels

    return bench.table(d, CROSS_LABELS, CROSS_TEACHERS).splitlines()


TEACHING_LABELS = {"scratch": "scratch (no teacher)", "logit": "logit distillation (the demo's)",
                   "sequence": "sequence-level (verified teacher data)", "on_policy": "on-policy (λ = 1)",
                   "logit+on_policy": "logit, then on-policy"}


def teaching(d: dict) -> list[str]:
    rows = ["| method | seeds | steps | FLOPs (of budget) | wall s (of which generating) | held-out loss | "
            "exact match |", "|---|---:|---:|---:|---:|---:|---:|"]
    best = max(c["accuracy"]["mean"] for c in d["summary"].values())
    for m, c in d["summary"].items():
        gen = c["seconds"].get("synthesis", 0.0) + c["seconds"].get("rollout_gen", 0.0)
        wall = c["seconds"].get("training_run", 0.0) + c["seconds"].get("synthesis", 0.0)
        share = c["budget_share"]
        share = f"{share['mean']:.0%}" if (share["std"] or 0) < 0.005 else \
            f"{share['mean'] * 100:.0f} ± {share['std'] * 100:.0f}%"
        acc = _pm(c["accuracy"], ".1f", 100, "%")
        rows.append(f"| {TEACHING_LABELS.get(m, m)} | {len(c['seeds'])} | {c['steps']} | {share} | {wall:,.0f} "
                    f"({gen:,.0f}) | {_pm(c['heldout_loss'], '.4f')} | "
                    f"{f'**{acc}**' if c['accuracy']['mean'] == best else acc} |")
    return rows


ROUTING_LABELS = {"adaptive": "**adaptive** (default)",
                  "adaptive+noise-0.3+lr-5e-4": "adaptive + selection noise 0.3, lr 5e-4 (the demo's)",
                  "adaptive+lr-5e-4": "adaptive, lr 5e-4",
                  "adaptive+noise-0.3": "adaptive + selection noise 0.3",
                  "sign-1e-3": "sign, γ = 1e-3 (DeepSeek-V3; the default before)",
                  "sign-1e-2": "sign, γ = 1e-2", "batch-loss-1e-2": "Switch balance loss 0.01, no bias"}
ROUTING_RECIPES = ("student", "teacher", "vision")


def _methods(names) -> list[str]:
    """Methods in the order of `ROUTING_LABELS`, any others after them."""
    order = list(ROUTING_LABELS)
    return sorted(names, key=lambda m: (order.index(m) if m in order else len(order), m))


def routing(d: dict) -> list[str]:
    rows = ["| recipe | method | seeds | dead experts (of 96) | worst max/mean | warnings after 20% | flip rate | "
            "held-out loss | exact match |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe in ROUTING_RECIPES:
        cells = d["summary"].get(recipe, {})
        for method in _methods(cells):
            c, label = cells[method], ROUTING_LABELS.get(method, method)
            rows.append(f"| {recipe} | {label} | {len(c['seeds'])} | {_pm(c['dead'], '.1f')} | "
                        f"{_pm(c['worst_max_over_mean'], '.2f')} | {_pm(c['late_warnings'], '.1f')} | "
                        f"{_pm(c['flip_rate'], '.3f')} | {_pm(c['heldout_loss'], '.4f')} | "
                        f"{_pm(c['accuracy'], '.1f', 100, '%')} |")
    return rows


VISION_TASKS = {"bigger": "bigger (which shape is bigger, left or right)",
                "digit": "digit (read a seven-segment digit)", "count": "count (how many shapes of a colour)"}


def vision(runs: list[dict]) -> list[str]:
    """Per task, each recorded vision run: the adaptive rule's seeds, then the other rules' (seed 0)."""
    runs = [r for r in runs if r["recipe"] == "vision"]
    order = _methods({r["method"] for r in runs})
    runs.sort(key=lambda r: (order.index(r["method"]), r["seed"]))
    head = [f"{ROUTING_LABELS.get(r['method'], r['method']).split(' (')[0].replace('**', '')}, seed {r['seed']}"
            for r in runs]
    rows = ["| task | " + " | ".join(head) + " |", "|---|" + "---:|" * len(runs)]
    for task, label in VISION_TASKS.items():
        rows.append(f"| {label} | " + " | ".join(f"{r['per_task'][task]:.0%}" for r in runs) + " |")
    rows.append("| all | " + " | ".join(f"{r['accuracy']:.1%}" for r in runs) + " |")
    return rows


def decode(d: dict) -> list[str]:
    rows = ["| model | batch 1 | batch 8 | batch-1 floor (weights + cache bytes per token) | batch 1 / floor, eager / "
            "compiled / transformers |", "|---|---|---|---:|---|"]
    for m in d["models"]:
        cells = []
        for run in m["runs"]:
            e, c, h = run["ours"], run["ours_compile"], run["hf"]
            cells.append(f"{e['decode_tok_s']:,.1f} / {c['decode_tok_s']:,.1f} / {h['decode_tok_s']:,.1f} "
                         f"({e['decode_speedup_vs_hf']:.2f}× / {c['decode_speedup_vs_hf']:.2f}×)")
        f = m["bandwidth_floor"]
        one = next(r for r in m["runs"] if r["batch"] == 1)
        mib = (f["active_weight_bytes"] + f["cache_bytes"]) / 2**20
        cells.append(f"{f['batch1_max_tok_s']:,.0f} tokens/s ({mib:.1f} MiB)")
        cells.append(" / ".join(f"{one[k]['of_floor']:.2f}" for k in ("ours", "ours_compile", "hf")))
        rows.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return rows


def serve_roofline(d: dict) -> list[str]:
    rows = ["| model | GPUs | batch that fits | decode step (bound) | prefill of the batch (bound) | planner, output "
            "tokens/s | published (TensorRT-LLM) | planner / published |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        rows.append(f"| {r['model']} fp8 | {r['gpus']} x {r['gpu']} | {r['batch']:,} | {r['decode_step_s'] * 1e3:.1f} "
                    f"ms ({r['decode_bound']}) | {r['prefill_s']:.2f} s ({r['prefill_bound']}) | "
                    f"{r['output_tokens_per_s']:,.0f} | {r['published']:,.0f} | {r['ratio']:.2f}× |")
    return rows


def speculative(d: dict) -> list[str]:
    rows = ["| decode steps | method | tokens/s | vs the target alone | accepted drafts | tokens per target step | "
            "outputs equal the target's |", "|---|---|---:|---:|---:|---:|---:|"]
    for mode, methods in d["modes"].items():
        for name, r in methods.items():
            acc = "–" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
            rows.append(f"| {mode} | {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | {acc} | "
                        f"{r['tokens_per_target_step']:.2f} | {r['outputs_equal_target']} of {d['problems']} |")
    return rows


def prefill_gap(d: dict) -> list[str]:
    rows = ["| long prompt | prefill | worst gap of the 8 running requests | median gap | tokens they made meanwhile | "
            "long prompt's first token after |", "|---:|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        how = "whole" if r["prefill_chunk"] is None else f"chunks of {r['prefill_chunk']}"
        rows.append(f"| {r['long_prompt']:,} | {how} | {r['worst_gap_s'] * 1e3:,.0f} ms | "
                    f"{r['median_gap_s'] * 1e3:,.0f} ms | {r['tokens_meanwhile']} | "
                    f"{r['time_to_first_token_s']:.2f} s |")
    return rows


def prefix_reuse(d: dict) -> list[str]:
    rows = ["| what | reuse | time to first token, first | median after the first | prompt tokens reused |",
            "|---|---|---:|---:|---:|"]
    for r in d["server"]:
        rows.append(f"| {len(r['ttft_s'])} requests, a {d['system_tokens']:,}-token system prompt + "
                    f"{d['question_tokens']} of their own | {'prefix cache' if r['prefix_cache_bytes'] else 'none'} | "
                    f"{r['ttft_s'][0] * 1e3:,.0f} ms | {r['median_ttft_after_first_s'] * 1e3:,.0f} ms | "
                    f"{r['reused_tokens']:,} |")
    for r in d["chat"]:
        rows.append(f"| chat, {len(r['ttft_s'])} turns ({r['prompt_tokens'][0]}-{r['prompt_tokens'][-1]:,} prompt "
                    f"tokens) | {'cache kept across turns' if r['reuse'] else 'none'} | "
                    f"{r['ttft_s'][0] * 1e3:,.0f} ms | "
                    f"{r['median_ttft_after_first_s'] * 1e3:,.0f} ms | {sum(r['reused_tokens']):,} |")
    return rows


def long_context(d: dict) -> list[str]:
    mib = 2**20
    rows = ["| context | prefill | decode | peak memory above the model | KV cache | one layer's K/V copy | largest "
            "piece (query-key pairs) | closed form, fitted |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        rows.append(f"| {r['context']:,} | {r['prefill_s']:,.1f} s | {r['decode_tok_s']:,.0f} tokens/s | "
                    f"{r['peak_above_start_bytes'] / mib:,.0f} MiB | {r['cache_bytes'] / mib:,.1f} MiB | "
                    f"{r['kv_copy_bytes'] / mib:,.1f} MiB | {r['max_pairs'] / 2**20:,.0f} M | "
                    f"{r['predicted_bytes'] / mib:,.0f} MiB |")
    return rows


RENDERERS: dict[str, Callable] = {"presets": presets, "demo_seeds": demo_seeds, "cross_family": cross_family,
                                  "teaching": teaching, "routing": routing, "vision": vision, "decode": decode,
                                  "serve_roofline": serve_roofline, "speculative": speculative,
                                  "prefill_gap": prefill_gap, "prefix_reuse": prefix_reuse,
                                  "long_context": long_context}


# ---- the README -----------------------------------------------------------------------------------------------

def load(file: str):
    path = ROOT / file
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every table block rendered from its file, and the names of the blocks that changed."""
    changed = []

    def one(m: re.Match) -> str:
        opening, name, file, _, old, closing = m.groups()
        if name not in RENDERERS:
            raise ValueError(f"README.md: table {name!r} has no renderer in benchmarks/readme_tables.py")
        new = "\n".join(RENDERERS[name](load(file))) + "\n"
        if new != old:
            changed.append(name)
        return opening + new + closing

    return BLOCK.sub(one, text), changed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its file")
    p.add_argument("--presets", action="store_true", help="write benchmarks/results/presets.json from the code")
    args = p.parse_args()
    if args.presets:
        path = RESULTS / "presets.json"
        path.write_text(json.dumps({"benchmark": "presets", "command": "python benchmarks/readme_tables.py --presets",
                                    "presets": preset_counts()}, indent=2) + "\n")
        print(f"wrote {path}")
    text = README.read_text()
    new, changed = render(text)
    if args.check:
        for name in changed:
            print(f"README.md: table {name} differs from its results file (run benchmarks/readme_tables.py)")
        return 1 if changed else 0
    if new != text:
        README.write_text(new)
    print(f"README.md: {len(BLOCK.findall(text))} tables, {len(changed)} rewritten ({', '.join(changed) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model cards: the `README.md` every model directory carries, saying what the model is and how it was made.

A card has Hugging Face's model-card front matter (YAML between `---` lines: library, pipeline, tags, the
training data, and a `model-index` with the evaluation results where there are any), then sections:
architecture and parameter counts, tokenizer, training data (a path or the built-in tasks, with a fingerprint),
the recipe (the full resolved config), training (steps, tokens seen, wall time, hardware and versions), the
teacher for a distilled student (which, and its fingerprint), and the latest evaluation results.

The results section lies between `RESULTS_BEGIN` and `RESULTS_END`, so that an evaluation run later
(`behemoth eval --card`, the demo) replaces it, and the front matter's `model-index` with it, leaving the rest of
the card as the training run wrote it. `convert` copies the card with the weights.

The front matter is written as JSON values (JSON is YAML), so no YAML library is needed to write it, and any
YAML reader reads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

CARD = "README.md"
RESULTS_BEGIN = "<!-- behemoth:results -->"
RESULTS_END = "<!-- /behemoth:results -->"
HASH_LIMIT = 4 << 30  # weights up to this size are hashed whole; above it, their config and headers


def model_fingerprint(directory: str | Path) -> dict:
    """A model directory's fingerprint: sha256 over its weights (the safetensors files, in name order) when
    they total at most `HASH_LIMIT` bytes, else over config.json and each file's safetensors header (names,
    shapes, dtypes, offsets) and size, said as such in "kind". A directory written by several processes
    (`model.dcp/`) or with `.bin` weights is hashed whole; one without weights files has no fingerprint (None)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(
        f for pattern in ("model.dcp/*", "*.bin") for f in directory.glob(pattern) if f.is_file())
    if not files:
        return {"sha256": None, "kind": "no weights files found", "bytes": 0}
    whole_only = files[0].suffix != ".safetensors"  # DCP and .bin files have no safetensors header to read
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    whole = total <= HASH_LIMIT or whole_only
    if not whole:
        cfg = directory / "config.json"
        h.update(cfg.read_bytes() if cfg.is_file() else b"")
    for f in files:
        with f.open("rb") as fh:
            if whole:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
            else:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n) + f.stat().st_size.to_bytes(8, "little"))
    return {"sha256": h.hexdigest(), "kind": "weights" if whole else "config and safetensors headers",
            "bytes": total}


def render_card(facts: dict) -> str:
    """The card's text from `facts`: "name", "summary", "architecture" {config, total_params, active_params},
    "tokenizer", "data", "recipe" (the resolved config), "training", "hardware", and optionally "teacher" and
    "results" (see `results_section`)."""
    data = facts.get("data", {})
    front = {"library_name": "behemoth", "pipeline_tag": "text-generation",
             "tags": ["behemoth", "llama4", "mixture-of-experts"] + (["distillation"] if facts.get("teacher") else []),
             "datasets": [data.get("name", "unknown")]}
    arch = facts["architecture"]
    lines = [f"# {facts['name']}", "", facts.get("summary", ""), "",
             "## Architecture", "",
             f"{arch['total_params']:,} parameters, {arch['active_params']:,} active per token.", "",
             _json_block(arch["config"]), "",
             "## Tokenizer", "", _table(facts["tokenizer"]), "",
             "## Training data", "", _table(data), ""]
    if facts.get("teacher"):
        lines += ["## Teacher", "", _table(facts["teacher"]), ""]
    lines += ["## Training", "", _table(facts["training"]), "",
              "## Hardware and versions", "", _table(facts["hardware"]), "",
              "## Recipe", "", "The full resolved configuration of the run:", "", _json_block(facts["recipe"]), "",
              results_section(facts.get("results", []), facts["name"])]
    return _front_matter(front, facts.get("results", []), facts["name"]) + "\n".join(lines) + "\n"


def results_section(results: list[dict], name: str) -> str:
    """The results section. Each result: {"metric", "value", "dataset", optional "interval" [lo, hi] (95%),
    "n", "source"} (a share in [0, 1] for accuracies)."""
    rows = ["| metric | dataset | value | 95% interval | n | source |", "|---|---|---:|---|---:|---|"]
    for r in results:
        interval = f"[{r['interval'][0]:.4f}, {r['interval'][1]:.4f}]" if r.get("interval") else ""
        metric, dataset, source = (_cell(r.get(k, "")) for k in ("metric", "dataset", "source"))
        rows.append(f"| {metric} | {dataset} | {r['value']:.4f} | {interval} | {r.get('n', '')} | {source} |")
    body = "\n".join(rows) if results else "No evaluation yet (`behemoth eval --model DIR --card` adds one)."
    return f"{RESULTS_BEGIN}\n## Evaluation\n\n{body}\n{RESULTS_END}"


def update_results(directory: str | Path, results: list[dict]) -> Path | None:
    """Replace the results of the card in `directory` (its section and the front matter's `model-index`); None
    (nothing written) where the directory has no card."""
    path = Path(directory) / CARD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    name = re.search(r"^# (.+)$", text, re.MULTILINE)
    name = name.group(1) if name else Path(directory).name
    section = re.compile(re.escape(RESULTS_BEGIN) + ".*?" + re.escape(RESULTS_END), re.DOTALL)
    text = section.sub(lambda _: results_section(results, name), text) if section.search(text) else \
        text.rstrip("\n") + "\n\n" + results_section(results, name) + "\n"
    front = _read_front(text)
    if front is not None:
        body = text.split("\n---\n", 1)[1]
        front.pop("model-index", None)
        text = _front_matter(front, results, name) + body
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def carry_card(src: str | Path, dst: str | Path, library: str) -> Path | None:
    """Copy the card of `src` into `dst` (a converted copy of the model), its front matter's `library_name` set to
    `library` (the format `dst` is in: "transformers" or "behemoth"); None where `src` has no card."""
    card = read_card(src)
    if card is None:
        return None
    front, text = card
    if front:  # the front matter is the first block; the body follows it unchanged
        text = _dump_front(front | {"library_name": library}) + text.split("\n---\n", 1)[1]
    path = Path(dst) / CARD
    path.write_text(text, encoding="utf-8")
    return path


def read_card(directory: str | Path) -> tuple[dict, str] | None:
    """(front matter, whole text) of the card in `directory`, or None."""
    path = Path(directory) / CARD
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return _read_front(text) or {}, text


# ---- text ----------------------------------------------------------------------------------------------------

def _front_matter(front: dict, results: list[dict], name: str) -> str:
    """The front matter with a `model-index` of `results` (none without results)."""
    front = dict(front)
    if results:
        front["model-index"] = [{"name": name, "results": [
            {"task": {"type": "text-generation"}, "dataset": {"name": r["dataset"], "type": r["dataset"]},
             "metrics": [{"type": r["metric"], "value": r["value"], "name": r["metric"]}]} for r in results]}]
    return _dump_front(front)


def _dump_front(front: dict) -> str:
    return "---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in front.items()) + "---\n"


def _read_front(text: str) -> dict | None:
    """The front matter this module writes (one JSON value per key), or None: also for front matter written
    otherwise (an ordinary Hugging Face card's YAML lists), which is then left as it is."""
    if not text.startswith("---\n") or "\n---\n" not in text:
        return None
    out = {}
    for line in text[4:text.index("\n---\n")].splitlines():
        key, sep, value = line.partition(": ")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            return None
        if not sep or not key or key.startswith((" ", "-")):
            return None
    return out


def _table(d: dict) -> str:
    rows = ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in d.items() if v is not None]
    return "\n".join(rows)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v))
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items())
    return str(v).replace("|", "\\|")


def _json_block(obj) -> str:
    return "```json\n" + json.dumps(obj, indent=2) + "\n```"

"""Every GPU figure the project reports, from one command, in under 8 minutes on one H100/H200.

GPU time comes in short loans, so this runs the whole plan at once: the CUDA tests (`pytest -m gpu`), then
each GPU benchmark that benchmarks/README.md names, every one as a subprocess through its own command line
(so this file depends on the scripts' flags only, not on the package's internals). Each item has a
wall-clock budget (imports, model builds and compilation included) and repeats cut to fit it; an item that
crashes or runs out of time is recorded as that item's error and the rest still run. The budgets add up to
under 8 minutes; an item may also use the time that earlier items left unused (so the items whose time is
least certain, compiled decoding, come last), never the time reserved for the items after it.

Into --out DIR: one JSON per item (status, seconds, command, headline figures, the device and versions,
the benchmark's own result), summary.json, raw/ (each script's own output) and logs/ (each item's output).
A table of item, status, seconds and headline figures is printed at the end; the exit status is non-zero
when an item failed or was not started.

--dry-run is the same plan on the CPU at toy sizes (the same command lines, then flags that shrink them:
tiny models and shapes, one repeat), so that a typo cannot waste the GPU run; it also executes the
compiled paths with compilation switched off (TORCH_COMPILE_DISABLE=1), which on two cores would take
minutes, and hides any GPU (CUDA_VISIBLE_DEVICES=""). It takes about a minute on two cores, less with
--jobs 2 (items side by side; the GPU run always takes them one at a time).

On a bare GPU machine (no internet, no venv) the image's own python and packages serve, with src/ on
PYTHONPATH instead of an installed package; where transformers is not importable the benchmarks run
without their transformers side (--skip-hf), and without pytest the tests are recorded as skipped:

    make gpu-check GPU_PYTHON=python3 GPU_OUT=out/gpu              # bare GPU machine
    make gpu-check                                                 # dev box: .venv, into out/gpu-check
    PYTHONPATH=src python3 benchmarks/gpu_check.py --out out/gpu --only moe_scout decode_b1   # rerun two
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 470  # the items' budgets (460 s) and the probe; the brief is 8 minutes (480 s)
DRY_BUDGET_S = 120  # per item on the CPU, toy sizes
KILL_GRACE_S = 3
ERROR_LINE = re.compile(r"[\w.]*(Error|Exception)\b")

PROBE = """
import json, platform, sys
sys.path.insert(0, sys.argv[1])
import torch
from common import device_info, transformers_version
try:
    import pytest
    pytest_version = pytest.__version__
except ImportError:
    pytest_version = None
cuda = torch.cuda.is_available()
print(json.dumps({
    "cuda_available": cuda,
    "device": device_info(torch.device("cuda" if cuda else "cpu")),
    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                 "transformers": transformers_version(), "cuda": torch.version.cuda,
                 "gpu": torch.cuda.get_device_name(0) if cuda else None, "pytest": pytest_version},
}))
"""


# ---- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One subprocess: `python <argv>` on the GPU; in a dry run `tiny` is appended (argparse keeps the last
    value of a repeated flag, so it overrides the GPU sizes while every GPU flag is still parsed and used)."""

    name: str
    what: str
    budget_s: int  # wall clock on one H100/H200, imports, builds and compilation included
    argv: tuple[str, ...]
    tiny: tuple[str, ...]
    headline: Callable[[dict], str]
    has_skip_hf: bool = False  # takes --skip-hf, added where transformers is not importable

    @property
    def is_pytest(self) -> bool:
        return self.argv[:2] == ("-m", "pytest")

    @property
    def raw_ext(self) -> str:
        return "xml" if self.is_pytest else "json"

    def command(self, dry: bool, raw: Path, transformers: bool = True) -> list[str]:
        out = [f"--junitxml={raw}"] if self.is_pytest else ["--out", str(raw)]
        skip_hf = ["--skip-hf"] if self.has_skip_hf and not transformers else []
        return [*self.argv, *(self.tiny if dry else ()), *skip_hf, *out]

    def read(self, raw: Path) -> dict | None:
        try:
            return read_junit(raw) if self.is_pytest else json.loads(raw.read_text())
        except (OSError, ValueError, ET.ParseError):
            return None

    def skip_reason(self, info: dict) -> str | None:
        if self.is_pytest and info["versions"]["pytest"] is None:
            return f"pytest is not importable by {sys.executable}"
        return None


def read_junit(path: Path) -> dict:
    """pytest's JUnit XML as counts and one entry per test."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    tests = []
    for case in (c for s in suites for c in s.iter("testcase")):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    return {**counts, "tests_run": tests}


def gpu_test_files() -> list[str]:
    """The test files that carry the gpu mark (passed by name: collecting every test module would import
    packages a bare GPU image may lack)."""
    files = sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    return [str(p.relative_to(ROOT)) for p in files] or ["tests"]


def pytest_headline(r: dict) -> str:
    return f"{r['passed']} passed, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"


def not_run(v: dict) -> str:
    """A configuration's headline when it has no figures: skipped (does not fit the device) or its error."""
    return f"skipped ({v['skipped'][:60]})" if "skipped" in v else v.get("error", "no result")[:40]


def moe_headline(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    parts = []
    for mode, v in r["results"]["ours"].items():
        if mode in ("fwd", "fwd_bwd"):
            parts.append(f"{mode} {v['median_ms']:.3g} ms {v['tflops']:.3g} TFLOP/s" if "median_ms" in v
                         else f"{mode} {not_run(v)}")
    vs = r["ratios"].get("ours_speedup_vs_hf_fwd_bwd") or r["ratios"].get("ours_speedup_vs_hf_fwd")
    return "ours " + ", ".join(parts) + (f"; x{vs} vs hf" if vs else "")


def train_headline(r: dict) -> str:
    parts = []
    for impls in r["results"].values():
        for name, v in impls.items():
            if "tokens_per_s" in v:
                mfu = f" MFU {v['mfu']:.1%}" if v.get("mfu") else ""
                parts.append(f"{name} {v['tokens_per_s']:,.0f} tok/s{mfu}")
            else:
                parts.append(f"{name} {not_run(v)}")
    return "; ".join(parts)


def distill_headline(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    ms, tps = r["median_ms"], r["tokens_per_s"]
    line = f"distill {ms['distill']:.3g} ms ({tps['distill']:,.0f} tok/s), vs its parts {r['overhead_vs_parts']:+.1%}"
    if r.get("hf_overhead_vs_parts") is not None:
        line += f"; qwen2 teacher {ms['hf_distill']:.3g} ms, vs its parts {r['hf_overhead_vs_parts']:+.1%}"
    return line


def decode_headline(r: dict) -> str:
    model = r["models"][0]
    run = model["runs"][0]
    if "skipped" in run:
        return f"batch {run['batch']} skipped: {run['skipped']}"
    parts = [f"{k} {run[k]['decode_tok_s']:,.0f}" for k in ("ours", "ours_compile", "hf") if k in run]
    floor = model.get("bandwidth_floor", {}).get("batch1_max_tok_s")
    return f"decode tok/s (batch {run['batch']}): " + ", ".join(parts) + (f"; floor {floor:,.0f}" if floor else "")


def parallel_headline(r: dict) -> str:
    def ac(x: dict) -> str:
        return " (AC)" if x.get("activation_checkpointing") else ""

    first, rest = r["results"][0], r["results"][1:]
    parts = [f"1 process{ac(first)} " + (f"{first['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in first
                                         else not_run(first))]
    for x in rest:
        if "vs_one_process" in x:
            parts.append(f"{x['parallel']} x{x['processes']}{ac(x)}: {x['vs_one_process']:.3f} of it")
        elif "tokens_per_s" in x:
            parts.append(f"{x['parallel']} x{x['processes']}{ac(x)}: {x['tokens_per_s']:,.0f} tok/s")
        else:
            parts.append(f"{x['parallel']} x{x['processes']}: {not_run(x)}")
    return "; ".join(parts)


def build_plan() -> dict[str, Item]:
    """The items, in order. Sizes are the README's; repeats and warm-up are cut so that each fits its budget,
    which counts the interpreter start and imports (about 10 s), model builds and compilation."""
    moe_tiny = ("--device", "cpu", "--d", "64", "--f", "128", "--tokens", "256", "--warmup", "1", "--repeats", "1")
    decode = ("benchmarks/decode.py", "--preset", "h100", "--new", "64", "--repeats", "2")
    decode_tiny = ("--device", "cpu", "--models", "debug", "--prompt", "8", "--new", "4", "--repeats", "1")
    items = [
        # the CUDA tests compile FlexAttention (forward and backward) for two shapes: tens of seconds
        Item("pytest_gpu", "the CUDA tests: pytest -m gpu", 85,
             ("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
              *gpu_test_files()), (), pytest_headline),
        Item("moe_scout", "one MoE layer at Scout's shape (D=5120 F=8192 E=16 T=32768 bf16), vs transformers", 50,
             ("benchmarks/moe_layer.py", "--preset", "scout-h100", "--repeats", "10", "--hf-repeats", "3",
              "--warmup", "2"), (*moe_tiny, "--experts", "4", "--hf-repeats", "1"), moe_headline, True),
        Item("moe_maverick", "one MoE layer at Maverick's shape (E=128, 512 tokens per expert), forward", 40,
             ("benchmarks/moe_layer.py", "--preset", "maverick-h100", "--repeats", "10", "--warmup", "2"),
             (*moe_tiny, "--experts", "8"), moe_headline, True),
        Item("distill", "online distillation step, mini-behemoth (and a transformers Qwen 2 of its shape) -> "
             "mini-maverick, bf16, 8 x 2048", 40,
             ("benchmarks/distill_step.py", "--device", "cuda", "--bf16", "--batch", "8", "--seq-len", "2048",
              "--repeats", "5", "--warmup", "2", "--hf-teacher", "qwen2"),
             ("--device", "cpu", "--teacher", "debug", "--student", "debug", "--batch", "1", "--seq-len", "32",
              "--repeats", "1", "--warmup", "0"),
             distill_headline, True),
        Item("train_bench1b", "bench-1b training step (bf16, 2 x 4096): tokens/s and MFU, vs transformers", 80,
             ("benchmarks/train_throughput.py", "--preset", "h100", "--repeats", "5", "--warmup", "2", "--blocks", "1"),
             ("--device", "cpu", "--models", "debug", "--batch", "1", "--seq-len", "32", "--repeats", "1",
              "--warmup", "1"), train_headline, True),
        Item("parallel_fsdp1", "bench-1b step, 2 x 2048: one process vs FSDP over one rank (torchrun)", 55,
             ("benchmarks/parallel.py", "--device", "cuda", "--batch", "2", "--steps", "4", "--warmup", "2",
              "--max-procs", "1"),
             ("--device", "cpu", "--preset", "debug", "--seq-len", "32", "--steps", "1", "--warmup", "0"),
             parallel_headline),
        Item("decode_b1", "bench-1b greedy decode, batch 1, 128-token prompt, 64 new: eager, compiled, hf", 60,
             (*decode, "--batch", "1"), decode_tiny, decode_headline, True),
        Item("decode_b8", "bench-1b greedy decode, batch 8, 128-token prompt, 64 new: eager, compiled, hf", 60,
             (*decode, "--batch", "8"), decode_tiny, decode_headline, True),
    ]
    return {i.name: i for i in items}


PLAN = build_plan()


# ---- the run -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # ok | error | timeout | skipped (pytest missing) | not_run (total budget spent)
    seconds: float
    headline: str = ""
    error: str | None = None


def fail(msg: str) -> NoReturn:
    sys.exit(f"gpu_check: error: {msg}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON results, raw outputs and logs")
    p.add_argument("--dry-run", action="store_true", help="the same plan on the CPU at toy sizes")
    p.add_argument("--jobs", type=int, default=1, help="--dry-run only: items at a time (the GPU run: always one)")
    p.add_argument("--only", nargs="+", metavar="ITEM", help=f"run only these items of: {' '.join(PLAN)}")
    p.error = fail  # one line, not the usage text
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(PLAN))
    if unknown:
        fail(f"unknown item(s) {', '.join(unknown)}; the plan has: {', '.join(PLAN)}")
    if args.jobs < 1:
        fail(f"--jobs {args.jobs}: at least one item at a time")
    if args.jobs > 1 and not args.dry_run:
        fail("--jobs: only --dry-run runs items side by side; the GPU run takes them one at a time")
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is a file, not a folder")
    args.out = args.out.resolve()  # the items run in the repository root
    return args


def child_env(dry: bool) -> dict[str, str]:
    """The environment of every item: src/ importable without installing; in a dry run no GPU, no compiling."""
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}
    if dry:
        env.update(CUDA_VISIBLE_DEVICES="", TORCH_COMPILE_DISABLE="1")
    return env


def probe(env: dict[str, str]) -> dict:
    """Device and versions, read in a subprocess so that this process never holds the GPU."""
    try:
        r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "benchmarks")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
        why = error_line(r.stderr.splitlines())
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        why = type(e).__name__
    fail(f"{sys.executable} cannot read the device and versions ({why})")


def run_bounded(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Run cmd in its own process group, output to log; None when it ran out of time (group killed)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return None
        except BaseException:
            _kill(proc)
            raise


def _kill(proc: subprocess.Popen) -> None:
    """SIGTERM to the item's process group (torchrun workers, compile workers), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=KILL_GRACE_S)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def log_lines(log: Path) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()
    except OSError:
        return []


def error_line(lines: list[str]) -> str:
    """The first exception line of a failed item's output (a torchrun worker's, not torchrun's own), else the
    last line with words in it (a script's `sys.exit` message)."""
    hits = [ln.strip() for ln in lines if ERROR_LINE.match(ln.strip()) and "ChildFailedError" not in ln]
    words = [ln.strip() for ln in lines if any(c.isalpha() for c in ln)]
    return hits[0] if hits else (words[-1] if words else "no output")


def run_item(item: Item, args: argparse.Namespace, env: dict[str, str], info: dict, timeout: float) -> Outcome:
    """Run one item, write its JSON, and return what the table shows."""
    raw, log = args.out / "raw" / f"{item.name}.{item.raw_ext}", args.out / "logs" / f"{item.name}.log"
    raw.unlink(missing_ok=True)
    cmd = [sys.executable, *item.command(args.dry_run, raw, info["versions"].get("transformers") is not None)]
    record = {"item": item.name, "what": item.what, "dry_run": args.dry_run, "budget_s": round(timeout),
              "command": cmd, "device": info["device"], "versions": info["versions"],
              "raw": str(raw), "log": str(log)}
    t0 = time.perf_counter()
    skip = item.skip_reason(info)
    if skip:
        out, result = Outcome("skipped", 0.0, error=skip), None
    else:
        rc = run_bounded(cmd, env, log, timeout)
        seconds = round(time.perf_counter() - t0, 1)
        result = item.read(raw) if raw.exists() else None
        if rc is None:
            out = Outcome("timeout", seconds, error=f"timed out after {timeout:.0f} s")
        elif rc != 0:
            out = Outcome("error", seconds, error=f"exit {rc}: {error_line(log_lines(log))[:200]}")
        elif result is None:
            out = Outcome("error", seconds, error=f"exit 0 but no result at {raw}")
        else:
            out = Outcome("ok", seconds)
        if result is not None:
            out.headline = _headline(item.headline, result)
    record.update(status=out.status, seconds=out.seconds, headline=out.headline, error=out.error,
                  log_tail=log_lines(log)[-30:] if out.status in ("error", "timeout") else None, result=result)
    write_json(args.out / f"{item.name}.json", record)
    return out


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _headline(fn: Callable[[dict], str], result: dict) -> str:
    try:
        return fn(result)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        return f"? ({type(e).__name__}: {e})"


def print_table(rows: list[tuple[str, Outcome]]) -> None:
    print(f"\n{'item':16s}{'status':9s}{'seconds':>8s}  headline")
    for name, o in rows:
        text = o.headline if o.status == "ok" else " | ".join(t for t in (o.error and o.error[:100], o.headline) if t)
        print(f"{name:16s}{o.status:9s}{o.seconds:8.1f}  {text}")


def run_planned(i: int, item: Item, args: argparse.Namespace, env: dict[str, str], info: dict, deadline: float,
                reserved: list[float]) -> Outcome:
    """Item i (from 1): its budget plus what earlier items left unused, which is what remains of the total
    less the budgets reserved for the items after it; not started when that is under 5 s."""
    n = len(reserved)
    timeout = deadline - time.perf_counter() - reserved[i - 1]
    if timeout < 5:
        out = Outcome("not_run", 0.0, error="not started: the total time budget was spent")
        write_json(args.out / f"{item.name}.json", {"item": item.name, "status": out.status, "error": out.error,
                                                    "device": info["device"], "versions": info["versions"]})
    else:
        print(f"[{i}/{n}] {item.name} (budget {timeout:.0f} s) ...", file=sys.stderr, flush=True)
        out = run_item(item, args, env, info, timeout)
    print(f"[{i}/{n}] {item.name}: {out.status} in {out.seconds} s", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    env = child_env(args.dry_run)
    info = probe(env)
    if not args.dry_run and not info["cuda_available"]:
        fail(f"{sys.executable} sees no CUDA device; use --dry-run to rehearse the plan on the CPU")
    for sub in ("raw", "logs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    items = [PLAN[n] for n in PLAN if not args.only or n in args.only]
    budgets = [DRY_BUDGET_S if args.dry_run else item.budget_s for item in items]
    reserved = [sum(budgets[i + 1:]) for i in range(len(items))]  # for the items after each one
    deadline = t_start + (sum(budgets) if args.dry_run else TOTAL_BUDGET_S)
    where = "CPU, toy sizes" if args.dry_run else info["versions"]["gpu"]
    print(f"gpu_check: {len(items)} items on {where}, torch {info['versions']['torch']}, into {args.out}",
          file=sys.stderr)
    run = functools.partial(run_planned, args=args, env=env, info=info, deadline=deadline, reserved=reserved)
    if args.jobs == 1:  # in this thread, so that Ctrl-C reaches run_bounded and ends the item's processes
        outcomes = [run(i, item) for i, item in enumerate(items, 1)]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(run, range(1, len(items) + 1), items))
    rows = [(item.name, out) for item, out in zip(items, outcomes, strict=True)]
    total = round(time.perf_counter() - t_start, 1)
    summary = {"dry_run": args.dry_run, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "total_s": total, "budget_s": None if args.dry_run else TOTAL_BUDGET_S, "device": info["device"],
               "versions": info["versions"],
               "items": [{"item": n, "status": o.status, "seconds": o.seconds, "headline": o.headline,
                          "error": o.error, "json": str(args.out / f"{n}.json")} for n, o in rows]}
    write_json(args.out / "summary.json", summary)
    print_table(rows)
    print(f"total {total} s; results in {args.out}")
    failed = [n for n, o in rows if o.status not in ("ok", "skipped")]
    if failed:
        fail(f"{len(failed)} of {len(rows)} items failed: {', '.join(failed)} (see {args.out / 'summary.json'})")


if __name__ == "__main__":
    main()

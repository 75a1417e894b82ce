"""Bytes per token of the offline teacher cache (`behemoth.data.teacher_cache`), and what it keeps.

Two measurements:

1. Synthetic top-128 at Llama 4's vocabulary (V = 202,048), from Zipf-like logits, two ways:
   `zipf_uniform_ids`   ranks assigned by a fresh random permutation per position, so the top-k ids are
                        spread uniformly over the vocabulary: the worst case for the id code;
   `zipf_frequency_ids` a unigram prior over ids (BPE ids are roughly in frequency order, so a real
                        teacher's top-k leans toward low ids) plus per-position noise and a few strongly
                        boosted "context" tokens.
   For each value codec (u8, f16, f32): bytes/token split into ids, values and headers; the teacher
   mass the top-k captures; the log-prob error (max, and the max allowed by the u8 bound); the
   probability error sum_v |p' - p| per position; encode and decode throughput. Reference sizes: naive
   int32 id + bf16 value (768 B), 18-bit ids + bf16 (544 B), and the information bound of the id set,
   log2 C(V, k) bits.
2. A real small teacher trained here: a byte-level BPE (--bpe-vocab tokens) and a small Llama 4 model
   trained for --train-steps on the running Python's standard-library sources (real text with real
   token statistics, no download), then `run_distill_cache` over files it was not trained on. Reported:
   the cache's bytes/token and mean captured mass, and the same positions with their ids replaced by
   uniformly random ones (what the clustering of a real teacher's top-k saves), decode throughput.
   `--teacher DIR` uses an existing checkpoint (with tokenizer.json) instead of training one.

    .venv/bin/python benchmarks/cache_size.py                      # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/cache_size.py --no-real            # synthetic only, ~30 s

Results: results/cache_size_<device>.json (device, versions, date, settings, every number above).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import device_info

from behemoth.data.teacher_cache import TeacherCache
from behemoth.data.teacher_codec import VALUE_RANGE, decode_record, encode_record, u8_error_bound

LLAMA4_VOCAB = 202048


def id_bound_bytes(vocab: int, k: int) -> float:
    """log2 C(V, k) / 8: the fewest bytes any code can average for uniformly random k-subsets."""
    return (math.lgamma(vocab + 1) - math.lgamma(k + 1) - math.lgamma(vocab - k + 1)) / math.log(2) / 8


def synthetic(kind: str, n: int, k: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    ids, lps = [], []
    prior = -torch.log1p(torch.arange(vocab, dtype=torch.float32))
    for start in range(0, n, 64):
        b = min(64, n - start)
        if kind == "zipf_uniform_ids":
            z = -1.1 * torch.log1p(torch.stack([torch.randperm(vocab, generator=g) for _ in range(b)]).float())
            z += 0.5 * torch.randn(z.shape, generator=g)
        else:
            z = prior[None] + 2.0 * torch.randn(b, vocab, generator=g)
            hot = torch.randint(0, vocab, (b, 8), generator=g)
            z.scatter_add_(1, hot, 8.0 + 4.0 * torch.rand(b, 8, generator=g))
        lp, i = torch.log_softmax(z, -1).topk(k, -1)
        ids.append(i.numpy())
        lps.append(lp.numpy())
    return np.concatenate(ids), np.concatenate(lps)


def measure_codec(ids: np.ndarray, lps: np.ndarray, vocab: int, values: str, window: int = 256) -> dict:
    """Encode in records of `window` positions (a training window), decode, compare."""
    n, k = ids.shape
    recs, t0 = [], time.perf_counter()
    for s in range(0, n, window):
        recs.append(encode_record(ids[s:s + window], lps[s:s + window], vocab, values))
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = [decode_record(r, min(window, n - s), k, vocab, values) for r, s in zip(recs, range(0, n, window),
                                                                                  strict=True)]
    t_dec = time.perf_counter() - t0
    got_ids = np.concatenate([d[0] for d in dec])
    got_lp = np.concatenate([d[1] for d in dec])
    order = np.argsort(ids, 1)
    want_ids, want_lp = np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)
    assert np.array_equal(got_ids, want_ids)
    hi, lo = want_lp.max(1), want_lp.min(1)
    near = want_lp >= hi[:, None] - VALUE_RANGE
    err = np.abs(got_lp.astype(np.float64) - want_lp)
    total = sum(len(r) for r in recs)
    value_bytes = {"u8": n * (6 + k), "f16": 2 * n * k, "f32": 4 * n * k}[values]
    chunk_bytes = n * -(-k // 32)
    return {
        "values": values, "bytes_per_token": total / n, "id_bytes_per_token": (total - value_bytes - chunk_bytes) / n,
        "value_bytes_per_token": value_bytes / n, "header_bytes_per_token": chunk_bytes / n,
        "max_logprob_error": float(err[near].max()), "mean_logprob_error": float(err[near].mean()),
        "u8_bound_max": float(max(u8_error_bound(h, lo_) for h, lo_ in zip(hi, lo, strict=True))),
        "mean_prob_l1_error": float(np.abs(np.exp(got_lp.astype(np.float64)) - np.exp(want_lp)).sum(1).mean()),
        "encode_tokens_per_s": n / t_enc, "decode_tokens_per_s": n / t_dec,
    }


def run_synthetic(n: int, k: int, say) -> dict:
    out = {"vocab_size": LLAMA4_VOCAB, "top_k": k, "positions": n, "temperature": 1.0,
           "reference_bytes_per_token": {"int32_id_bf16_value": 6 * k, "18bit_id_bf16_value": (18 + 16) * k / 8,
                                         "id_information_bound": id_bound_bytes(LLAMA4_VOCAB, k)},
           "generators": {}}
    for kind in ("zipf_uniform_ids", "zipf_frequency_ids"):
        ids, lps = synthetic(kind, n, k, LLAMA4_VOCAB, seed=0)
        mass = np.exp(lps.astype(np.float64)).sum(1)
        res = {"mean_captured_mass": float(mass.mean()), "min_captured_mass": float(mass.min()),
               "mean_logprob_range": float((lps[:, 0] - lps[:, -1]).mean()),
               "codecs": [measure_codec(ids, lps, LLAMA4_VOCAB, v) for v in ("u8", "f16", "f32")]}
        out["generators"][kind] = res
        u8 = res["codecs"][0]
        say(f"synthetic {kind}: u8 {u8['bytes_per_token']:.1f} B/token (ids {u8['id_bytes_per_token']:.1f}, values "
            f"{u8['value_bytes_per_token']:.1f}, chunk widths {u8['header_bytes_per_token']:.1f}); max log-prob error "
            f"{u8['max_logprob_error']:.4f} (bound {u8['u8_bound_max']:.4f}); mass {res['mean_captured_mass']:.3f}; "
            f"decode {u8['decode_tokens_per_s']:,.0f} tok/s")
    return out


# ---- a real small teacher -------------------------------------------------------------------------

def stdlib_documents(first: int, count: int, chunk_chars: int = 4000) -> list[str]:
    """Text chunks of the running Python's standard-library modules (sorted by name), files [first, first+count)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[first:first + count]
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        docs += [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    return docs


def run_real(work: Path, teacher: str | None, train_steps: int, bpe_vocab: int, k: int, seq_len: int, say) -> dict:
    from behemoth.checkpoint.locate import latest_checkpoint
    from behemoth.config import PRESETS
    from behemoth.train.config import DataSection, build_config
    from behemoth.train.distill_cache import run_distill_cache
    from behemoth.train.run import run_training

    def write_jsonl(path: Path, docs: list[str]) -> Path:
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return path

    train_files, cache_files = (0, 120), (120, 12)
    if teacher is None:
        cfg_file = work / "teacher_config.json"
        mc = PRESETS["debug"].replace(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32, ffn_dim=512,
                                      vocab_size=bpe_vocab, moe={"num_experts": 8, "expert_dim": 256})
        cfg_file.write_text(json.dumps({"format": "behemoth", "model": mc.to_dict()}))
        corpus = write_jsonl(work / "train.jsonl", stdlib_documents(*train_files))
        overrides = {"model.config_file": cfg_file, "data.path": corpus, "data.tokenizer_vocab_size": bpe_vocab,
                     "data.seq_len": seq_len, "data.cache_dir": work / "tok", "train.steps": train_steps,
                     "train.batch_size": 8, "optim.lr": 3e-3, "optim.warmup_steps": 20, "log.every": 50,
                     "log.eval_every": 0, "log.tensorboard": False, "log.plots": False, "checkpoint.every": 0,
                     "train.out_dir": work / "teacher_run", "train.device": "cpu"}
        t0 = time.perf_counter()
        summary = run_training(build_config(None, [f"--{a}={b}" for a, b in overrides.items()]), say=say)
        teacher = str(latest_checkpoint(work / "teacher_run"))
        say(f"teacher trained: {summary['step']} steps in {time.perf_counter() - t0:.0f}s -> {teacher}")
    data = DataSection(path=str(write_jsonl(work / "cache.jsonl", stdlib_documents(*cache_files))), seq_len=seq_len,
                       cache_dir=str(work / "tok"), val_fraction=0.0)
    t0 = time.perf_counter()
    m = run_distill_cache(teacher, str(work / "cache"), data, top_k=k, device="cpu", say=say)
    wall = time.perf_counter() - t0
    cache = TeacherCache.open(work / "cache")
    windows = np.arange(cache.num_windows)
    t0 = time.perf_counter()
    ids, lps = cache.read_windows(windows)
    t_read = time.perf_counter() - t0
    # the same positions with uniformly random ids: what the clustering of the real top-k saves
    rng = np.random.default_rng(0)
    flat_lp = lps.reshape(-1, k)
    rand_ids = np.stack([rng.choice(cache.vocab_size, k, replace=False) for _ in range(len(flat_lp))])
    rand = measure_codec(rand_ids, flat_lp, cache.vocab_size, "u8", seq_len)
    real = measure_codec(ids.reshape(-1, k), flat_lp, cache.vocab_size, "u8", seq_len)
    span = ids.reshape(-1, k)
    return {
        "teacher": teacher, "teacher_params": m["teacher_params"], "vocab_size": m["vocab_size"], "top_k": k,
        "seq_len": seq_len, "train_steps": train_steps, "corpus": "python stdlib *.py, files 0-119 (teacher), "
        "120-131 (cache)", "positions": m["positions"], "bytes_per_token": m["bytes_per_token"],
        "mean_captured_mass": m["mean_captured_mass"], "cache_wall_s": wall,
        "read_decode_tokens_per_s": m["positions"] / t_read,
        "id_bytes_per_token": real["id_bytes_per_token"],
        "random_ids_same_values": {"bytes_per_token": rand["bytes_per_token"],
                                   "id_bytes_per_token": rand["id_bytes_per_token"]},
        "id_information_bound_uniform": id_bound_bytes(cache.vocab_size, k),
        "median_largest_id": float(np.median(span[:, -1])), "median_id": float(np.median(span)),
        "mean_logprob_range": float((flat_lp.max(1) - flat_lp.min(1)).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=2048, help="synthetic positions per generator")
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--no-real", action="store_true", help="skip the real small teacher")
    p.add_argument("--teacher", help="an existing teacher checkpoint (with tokenizer.json) instead of training one")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--bpe-vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", help="result JSON (default results/cache_size_<device>.json)")
    args = p.parse_args()

    def say(line: str) -> None:
        print(line, flush=True)

    result = {"benchmark": "cache_size", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "device": device_info(torch.device("cpu")), "python": platform.python_version(),
              "torch": torch.__version__, "numpy": np.__version__, "args": vars(args),
              "synthetic": run_synthetic(args.positions, args.top_k, say)}
    if not args.no_real:
        with tempfile.TemporaryDirectory() as tmp:
            real = run_real(Path(tmp), args.teacher, args.train_steps, args.bpe_vocab, args.top_k, args.seq_len, say)
        result["real_teacher"] = real
        say(f"real teacher (V={real['vocab_size']}, {real['teacher_params']:,} params): "
            f"{real['bytes_per_token']:.1f} B/token (ids {real['id_bytes_per_token']:.1f}; random ids at this V: "
            f"{real['random_ids_same_values']['id_bytes_per_token']:.1f}), mass {real['mean_captured_mass']:.3f}, "
            f"read+decode {real['read_decode_tokens_per_s']:,.0f} tok/s")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / "cache_size_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    say(f"wrote {out}")


if __name__ == "__main__":
    main()

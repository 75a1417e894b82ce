"""Offline teacher targets: the codec, the sharded resumable writer, the checked reader, cached training."""

from __future__ import annotations

import copy
import json
import zlib

import numpy as np
import pytest
import torch

import behemoth
from behemoth.checkpoint import save_model
from behemoth.cli import main
from behemoth.config import PRESETS
from behemoth.data.loader import DataLoader
from behemoth.data.packing import build_in_memory
from behemoth.data.tasks import ALPHABET, make_problems
from behemoth.data.teacher_cache import MANIFEST, TeacherCache, write_cache
from behemoth.data.teacher_codec import VALUE_RANGE, decode_record, encode_record, u8_error_bound
from behemoth.data.tokenizer import Tokenizer
from behemoth.train.config import DistillSection, RouterSection
from behemoth.train.distill_cache import teacher_topk_fn
from behemoth.train.steps import CachedDistillStep, DistillStep

LLAMA4_VOCAB = 202048


def random_topk(n: int, k: int, vocab: int, seed: int = 0, spread: float = 8.0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)])
    lp = -np.sort(rng.exponential(spread / k, (n, k)).cumsum(1), axis=1).astype(np.float32) - 0.05
    return ids, lp


def sorted_by_id(ids, lp):
    order = np.argsort(ids, 1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)


# ---- the codec ------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab,k", [(LLAMA4_VOCAB, 128), (LLAMA4_VOCAB, 33), (320, 128), (300, 1), (64, 64)])
@pytest.mark.parametrize("values", ["u8", "f16", "f32"])
def test_round_trip_ids_exact_logprobs_within_bound(vocab, k, values):
    ids, lp = random_topk(40, k, vocab, seed=k)
    if k > 1:  # the extreme ids
        ids[0] = np.concatenate([[0, vocab - 1], np.random.default_rng(1).choice(np.arange(1, vocab - 1), k - 2,
                                                                                   replace=False)])
    lp[1, :] = -3.0  # a position whose log-probs are all equal (range 0)
    if k > 2:
        lp[2, -1] = -np.inf  # an absent entry
        lp[3, -1] = lp[3, 0] - 50  # far below its top: clamped
    rec = encode_record(ids, lp, vocab, values)
    got_ids, got_lp = decode_record(rec, 40, k, vocab, values)
    want_ids, want_lp = sorted_by_id(ids, lp)
    assert got_ids.dtype == np.int64 and got_lp.dtype == np.float32
    assert np.array_equal(got_ids, want_ids)
    assert np.array_equal(np.isneginf(got_lp), np.isneginf(want_lp))
    finite = np.isfinite(want_lp)
    err = np.abs(np.where(finite, got_lp, 0.0) - np.where(finite, want_lp, 0.0))
    if values == "f32":
        assert np.array_equal(got_lp[finite], want_lp[finite])
    elif values == "f16":
        assert (err <= np.abs(want_lp) * 2.0**-11 + 1e-7).all()
    else:
        hi = np.where(finite, want_lp, -np.inf).max(1)
        lo = np.where(finite, want_lp, np.inf).min(1)
        bound = np.array([u8_error_bound(h, lo_) for h, lo_ in zip(hi, lo, strict=True)])[:, None]
        near = finite & (want_lp >= hi[:, None] - VALUE_RANGE)
        assert (err[near] <= np.broadcast_to(bound, err.shape)[near]).all()
        assert bound.max() <= 0.0395
        top = want_lp == hi[:, None]
        assert np.array_equal(got_lp[top], want_lp[top])  # the top entry is exact
        far = finite & ~near
        assert (got_lp[far] <= hi[:, None].repeat(k, 1)[far] - VALUE_RANGE + 0.04).all()


def test_bytes_per_token_at_llama4_vocab_k128():
    """Top-128 of Zipf-like logits over 202,048 ids: the ids spread uniformly (a random permutation per
    position, the worst case for the id code) stay within 350 bytes/token with u8 values."""
    g = torch.Generator().manual_seed(0)
    n, k = 32, 128
    base = -1.1 * torch.arange(1, LLAMA4_VOCAB + 1, dtype=torch.float32).log()
    z = base[torch.stack([torch.randperm(LLAMA4_VOCAB, generator=g) for _ in range(n)])]
    lp, ids = torch.log_softmax(z + 0.5 * torch.randn(z.shape, generator=g), -1).topk(k, -1)
    rec = encode_record(ids.numpy(), lp.numpy(), LLAMA4_VOCAB, "u8")
    assert len(rec) / n <= 350
    # ids clustered at low (frequent) ids, as a real teacher's top-k is, cost less
    skewed = np.sort(np.random.default_rng(0).zipf(1.3, (n, 4 * k)) % LLAMA4_VOCAB, 1)
    skewed_ids = np.stack([np.unique(r)[:k] for r in skewed if len(np.unique(r)) >= k])
    rec2 = encode_record(skewed_ids, lp.numpy()[:len(skewed_ids)], LLAMA4_VOCAB, "u8")
    assert len(rec2) / len(skewed_ids) < len(rec) / n


def test_bad_records_and_inputs_are_value_errors():
    ids, lp = random_topk(8, 16, 1000)
    rec = encode_record(ids, lp, 1000)
    with pytest.raises(ValueError, match="shard_x.bin"):
        decode_record(rec[:-3], 8, 16, 1000, where="shard_x.bin")
    with pytest.raises(ValueError, match="shard_x.bin"):
        decode_record(rec + b"\xff", 8, 16, 1000, where="shard_x.bin")
    with pytest.raises(ValueError, match="distinct"):
        encode_record(np.zeros((2, 4), np.int64), np.zeros((2, 4)), 1000)
    with pytest.raises(ValueError, match="ids must lie"):
        encode_record(ids, lp, 500)
    with pytest.raises(ValueError, match="NaN"):
        encode_record(ids, np.full_like(lp, np.nan), 1000)


# ---- writer and reader (a cheap deterministic stand-in teacher) -----------------------------------

V, K, S = 5000, 8, 16


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_chars(ALPHABET)


@pytest.fixture(scope="module")
def store(tok):
    return build_in_memory((p.text for p in make_problems("train", 60, seed=0)), tok)


def fake_targets(batch):
    """Distinct ids and log-probs that depend on each position's token and document position."""
    x = batch.input_ids.reshape(-1, 1).numpy() * 131 + batch.positions.reshape(-1, 1).numpy() * 7
    ids = (x + np.arange(K) * 611) % V
    lp = (-0.3 * np.arange(K) - 1.5 - (x % 5) * 0.1).astype(np.float32)  # mass 0.78 and below
    return ids, lp


def write(out, store, tok, **kw):
    args = dict(top_k=K, temperature=1.0, vocab_size=V, teacher_fingerprint="t" * 64, tokenizer=tok,
                windows_per_shard=6, batch_size=4, say=lambda s: None)
    return write_cache(out, store, S, kw.pop("targets_fn", fake_targets), **{**args, **kw})


def shard_files(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name.startswith("shard_")}


def test_cache_covers_every_window_in_stream_order(tmp_path, store, tok):
    m = write(tmp_path / "c", store, tok)
    cache = TeacherCache.open(tmp_path / "c")
    n = (store.num_tokens - 1) // S
    assert m["complete"] and m["num_windows"] == n and m["positions"] == n * S and len(m["shards"]) == -(-n // 6)
    assert m["bytes_per_token"] > 0 and 0 < m["mean_captured_mass"] <= 1
    assert cache.tokenizer().fingerprint == tok.fingerprint
    loader = DataLoader(store, 5, S, seed=3)
    for _ in range(4):
        batch = next(loader)
        ids, lps = cache.targets(batch.offsets)
        want_ids, want_lp = sorted_by_id(*fake_targets(batch))
        assert torch.equal(ids, torch.from_numpy(want_ids))
        assert (lps - torch.from_numpy(want_lp)).abs().max() <= 0.0395
    _, sub_lps = cache.targets(batch.offsets, top_k=3)
    full_ids, full_lps = cache.targets(batch.offsets)
    assert torch.equal(sub_lps, full_lps.topk(3, -1).values)
    cut_ids, cut_lps = cache.targets(batch.offsets, vocab_size=2500)  # a student vocabulary below the teacher's
    assert torch.equal(torch.isneginf(cut_lps), full_ids >= 2500) and (cut_ids < 2500).all()


def test_resume_after_interruptions_gives_identical_files(tmp_path, store, tok):
    write(tmp_path / "ref", store, tok)
    out = tmp_path / "b"

    def stop_after_two(line):
        if line.startswith("shard 2/"):
            raise KeyboardInterrupt  # killed between shards

    with pytest.raises(KeyboardInterrupt):
        write(out, store, tok, say=stop_after_two)
    with pytest.raises(ValueError, match="incomplete cache"):
        TeacherCache.open(out)
    with pytest.raises(ValueError, match="already holds a teacher cache"):
        write(out, store, tok)
    with pytest.raises(ValueError, match="top_k differs"):
        write(out, store, tok, resume=True, top_k=K - 1, targets_fn=lambda b: [x[:, :-1] for x in fake_targets(b)])
    calls = {"n": 0}

    def dies_mid_shard(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed mid-shard")
        return fake_targets(batch)

    with pytest.raises(RuntimeError):
        write(out, store, tok, resume=True, targets_fn=dies_mid_shard)
    assert (out / "shard_00002.bin.tmp").exists()  # a half-written shard, not listed
    (out / "shard_00003.bin").write_bytes(b"garbage")  # a stray shard the manifest does not list
    (out / "shard_00003.idx").write_bytes(b"garbage")
    (out / ".shard_00003.idx.tmp-99-ab12cd34").write_bytes(b"x")  # an index killed before its rename
    m = json.loads((out / MANIFEST).read_text())
    assert [s["bin"] for s in m["shards"]] == ["shard_00000.bin", "shard_00001.bin"] and not m["complete"]
    lines = []
    write(out, store, tok, resume=True, say=lines.append)
    assert lines[0].startswith(f"resuming {out}: 12/")
    assert shard_files(out) == shard_files(tmp_path / "ref")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    a, b = (json.loads((d / MANIFEST).read_text()) for d in (tmp_path / "ref", out))
    for m in (a, b):
        m.pop("created"), m.pop("updated")
    assert a == b
    TeacherCache.open(out)
    write(out, store, tok, resume=True)  # complete: nothing to do


def test_truncated_or_corrupt_shards_are_errors_naming_the_file(tmp_path, store, tok):
    write(tmp_path / "c", store, tok)
    base = tmp_path / "c"
    for case in ("truncate", "flip", "index"):
        d = tmp_path / case
        d.mkdir()
        for f in base.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        if case == "truncate":
            f = d / "shard_00001.bin"
            f.write_bytes(f.read_bytes()[:-5])
            with pytest.raises(ValueError, match="shard_00001.bin"):
                TeacherCache.open(d)
        elif case == "flip":
            f = d / "shard_00001.bin"
            raw = bytearray(f.read_bytes())
            raw[40] ^= 0x10
            f.write_bytes(bytes(raw))
            cache = TeacherCache.open(d)  # sizes agree: found when the record is read
            with pytest.raises(ValueError, match="shard_00001.bin.*checksum"):
                cache.read_windows([6])
            cache.read_windows([0, 12])
        else:
            f = d / "shard_00000.idx"
            raw = bytearray(f.read_bytes())
            raw[3] ^= 1
            f.write_bytes(bytes(raw))
            with pytest.raises(ValueError, match="shard_00000.idx"):
                TeacherCache.open(d)
    with pytest.raises(ValueError, match="no manifest.json"):
        TeacherCache.open(tmp_path / "nothing")


def test_manifest_is_checked_against_the_run_field_by_field(tmp_path, store, tok):
    write(tmp_path / "c", store, tok, temperature=2.0)
    cache = TeacherCache.open(tmp_path / "c")
    ok = dict(tokenizer_fingerprint=tok.fingerprint, store=store, seq_len=S, vocab_size=256, top_k=0,
              temperature=2.0)
    cache.validate(**ok)
    cache.validate(**{**ok, "top_k": K - 2, "vocab_size": V})
    other_tokens = np.array(store.tokens)
    other_tokens[5] = (other_tokens[5] + 1) % tok.vocab_size
    other = type(store)(other_tokens, store.doc_starts, store.meta)
    shorter = build_in_memory((p.text for p in make_problems("train", 59, seed=0)), tok)
    bad = {"tokenizer": {"tokenizer_fingerprint": "0" * 64}, "num_tokens": {"store": shorter},
           "data fingerprint": {"store": other}, "seq_len": {"seq_len": 32}, "vocab_size": {"vocab_size": V + 1},
           "top_k": {"top_k": K + 1}, "temperature": {"temperature": 1.0}}
    for field, change in bad.items():
        with pytest.raises(ValueError, match=field) as e:
            cache.validate(**{**ok, **change})
        assert "\n" not in str(e.value)


# ---- cached training == online top-k training -----------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("teacher") / "t"
    save_model(behemoth.build_model(PRESETS["debug"], seed=1), d)
    tok.save(d / "tokenizer.json")
    return d


@pytest.mark.parametrize("values,tol", [("f32", 1e-6), ("u8", 5e-3)])
def test_cached_step_equals_online_topk_step(tmp_path, store, tok, teacher_dir, values, tol):
    teacher = behemoth.load_model(str(teacher_dir))
    k = 32
    fn = teacher_topk_fn(teacher, k, 1.0, torch.device("cpu"), None)
    write_cache(tmp_path / "c", store, S, fn, top_k=k, temperature=1.0, vocab_size=256, teacher_fingerprint="t",
                tokenizer=tok, values=values, windows_per_shard=10, batch_size=8, say=lambda s: None)
    cache = TeacherCache.open(tmp_path / "c")
    cfg = DistillSection(top_k=k, alpha=0.7, loss="jsd", missing_mass="residual")
    student = behemoth.build_model(PRESETS["debug"], seed=5).train()
    online = DistillStep(student, teacher, RouterSection(), cfg)
    cached = CachedDistillStep(copy.deepcopy(student), cache, RouterSection(), cfg)
    loader = DataLoader(store, 3, S, seed=7)
    opts = [torch.optim.SGD(s.model.parameters(), lr=0.5) for s in (online, cached)]
    for _ in range(3):
        batch = next(loader)
        ms = []
        for step, opt in zip((online, cached), opts, strict=True):
            opt.zero_grad()
            ms.append(step.forward_backward(batch, 1.0))
            opt.step()
        for key in ("loss", "kd_loss", "kd_weight"):
            assert float(ms[0][key]) == pytest.approx(float(ms[1][key]), rel=tol, abs=tol), key
    if values == "f32":
        for a, b in zip(online.model.parameters(), cached.model.parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


# ---- the CLI --------------------------------------------------------------------------------------

TRAIN = {"model.preset": "debug", "train.steps": 1, "train.batch_size": 2, "data.seq_len": 16,
         "data.num_problems": 40, "log.every": 1, "log.eval_every": 0, "checkpoint.every": 0,
         "log.tensorboard": False, "log.plots": False}


def test_cli_distill_cache_then_distill_from_it(tmp_path, teacher_dir, capsys):
    out = tmp_path / "cache"
    argv = ["distill-cache", "--teacher", str(teacher_dir), "--out", str(out), "--data.num_problems=40",
            "--data.seq_len=16", "--top-k", "16", "--shard-tokens", "256"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "bytes/token" in last and "mean teacher mass captured" in last
    assert main(argv) == 2
    assert "already holds a teacher cache" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    run = [f"--{k}={v}" for k, v in {**TRAIN, "train.out_dir": str(tmp_path / "run")}.items()]
    assert main(["distill", *run, f"--distill.cache={out}"]) == 0
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_loss" in r for r in rec)
    for extra, field in ((["--data.num_problems=41"], "num_tokens"), (["--data.seq_len=32"], "seq_len"),
                         (["--distill.top_k=17"], "top_k"), ([f"--distill.teacher={teacher_dir}"], "distill.teacher"),
                         (["--train.seed=1"], "the cache was made from")):
        bad = [f"--{k}={v}" for k, v in {**TRAIN, "train.out_dir": str(tmp_path / "bad")}.items()]
        assert main(["distill", *bad, f"--distill.cache={out}", *extra]) == 2, field
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err


@pytest.mark.parametrize("argv,msg", [
    (["--teacher", "/no/such/teacher"], "/no/such/teacher"),
    (["--top-k", "0"], "top_k"),
    (["--top-k", "300"], "top_k"),
    (["--temperature", "0"], "temperature"),
    (["--values", "u4"], "invalid choice"),
    (["--data.seq_len", "1"], "seq_len"),
    (["--data.seq_len", "x"], "data.seq_len"),
    (["--data.seqlen", "16"], "did you mean 'data.seq_len'"),
])
def test_cli_distill_cache_bad_input_is_one_line_exit_2(argv, msg, tmp_path, teacher_dir, capsys):
    base = {"--teacher": str(teacher_dir), "--out": str(tmp_path / "c"), "--data.num_problems": "20",
            "--data.seq_len": "16"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    assert main(["distill-cache", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err


def test_cli_distill_cache_takes_the_distill_runs_settings(tmp_path, teacher_dir):
    """Flags left out take the config's distill.top_k / distill.temperature, so a cache made from the distill
    run's own settings fits it; a flag given wins."""
    base = ["distill-cache", "--teacher", str(teacher_dir), "--data.num_problems=20", "--data.seq_len=16"]
    assert main([*base, "--out", str(tmp_path / "a"), "--distill.top_k=8", "--distill.temperature=2"]) == 0
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert (m["top_k"], m["temperature"]) == (8, 2.0)
    assert main([*base, "--out", str(tmp_path / "b"), "--distill.top_k=8", "--top-k", "4"]) == 0
    m = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert (m["top_k"], m["temperature"]) == (4, 1.0)


def test_cli_distill_cache_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill-cache", "--help"])
    assert e.value.code == 0 and "--top-k" in capsys.readouterr().out


def test_index_and_record_checksums_cover_the_bytes(tmp_path, store, tok):
    write(tmp_path / "c", store, tok)
    m = json.loads((tmp_path / "c" / MANIFEST).read_text())
    for s in m["shards"]:
        raw = (tmp_path / "c" / s["idx"]).read_bytes()
        assert zlib.crc32(raw) == s["index_crc32"]
        n = s["windows"]
        offsets = np.frombuffer(raw[:8 * (n + 1)], "<u8")
        crcs = np.frombuffer(raw[8 * (n + 1):], "<u4")
        data = (tmp_path / "c" / s["bin"]).read_bytes()
        assert offsets[-1] == len(data) == s["bytes"]
        assert all(zlib.crc32(data[offsets[i]:offsets[i + 1]]) == crcs[i] for i in range(n))

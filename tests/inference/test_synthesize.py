"""`behemoth synthesize`: a teacher's dataset, deterministic for a seed, equal after a kill and a resume,
verified and filtered exactly, and a training corpus as it stands (prompts masked)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from behemoth import build_model, load_model
from behemoth.checkpoint import save_model
from behemoth.cli import main
from behemoth.data.answers import matches
from behemoth.data.corpus import Prompted, iter_documents
from behemoth.data.prompts import load_prompts
from behemoth.data.tasks import check, make_problems
from behemoth.inference.synthesize import Settings, Teacher, sample_seed, select, synthesize
from behemoth.inference.text import Completion

QUICK = {"max_tokens": 12, "temperature": 1.0, "shard_size": 4, "batch_size": 3}


def _run(model_dir, out, prompts_file=None, say=lambda line: None, **settings):
    s = Settings(**{**QUICK, **settings})
    prompts, source = load_prompts(prompts_file, tasks="add,count", num_prompts=10, seed=s.seed)
    return synthesize(str(model_dir), out, prompts, source, s, say=say)


def _shards(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.jsonl"))}


def _records(out) -> list[dict]:
    return [json.loads(line) for data in _shards(out).values() for line in data.decode().splitlines()]


def test_deterministic_for_a_seed_and_different_for_another(char_model_dir, tmp_path):
    a = _run(char_model_dir, tmp_path / "a", samples=2)
    _run(char_model_dir, tmp_path / "b", samples=2)
    _run(char_model_dir, tmp_path / "c", samples=2, seed=1)
    assert a["complete"] and len(a["shards"]) == 3  # 10 prompts in shards of 4
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")
    assert _shards(tmp_path / "a") != _shards(tmp_path / "c")
    records = _records(tmp_path / "a")
    assert len(records) == 20 and [(r["index"], r["sample"]) for r in records[:3]] == [(0, 0), (0, 1), (1, 0)]
    assert {"prompt", "completion", "teacher", "index", "sample", "verified", "logprob", "tokens"} <= set(records[0])
    assert a["counts"]["samples"] == 20 and a["counts"]["kept"] == 20


class Killed(Exception):
    pass


def test_killed_then_resumed_equals_an_uninterrupted_run(char_model_dir, tmp_path):
    whole = tmp_path / "whole"
    _run(char_model_dir, whole, samples=2)

    def kill_after_first_shard(line):
        if line.startswith("shard 1/"):
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        _run(char_model_dir, out, samples=2, say=kill_after_first_shard)
    assert list(_shards(out)) == ["shard-00000.jsonl"]
    (out / ".shard-00001.jsonl.tmp-123-abcd").write_text('{"prompt": "torn')  # a write cut short by the kill
    written = [r for r in _records(out) if r["completion"].strip()]  # (a blank completion is no document)
    assert [d.text for d in iter_documents(out)] == [r["completion"] for r in written]  # the torn file is never read
    lines = []
    manifest = _run(char_model_dir, out, samples=2, say=lines.append)
    assert "1 of 3 shards already" in lines[0]
    assert _shards(out) == _shards(whole)
    assert manifest == json.loads((whole / "manifest.json").read_text()) | {"teacher": manifest["teacher"]}


def test_sampled_logprob_is_the_full_forward_closed_form(char_model_dir):
    teacher = Teacher(char_model_dir)
    settings = Settings(**{**QUICK, "temperature": 0.8})
    prompts, _ = load_prompts(None, tasks="add,count", num_prompts=5)
    rows = [(teacher.encode(p), settings.params((teacher.tokenizer.eos_id,), sample_seed(0, p.index, 0)))
            for p in prompts]
    done, computed = teacher.complete(rows, (), batch_size=2)  # continuous batching: rows join as others finish
    assert computed >= sum(len(p) + len(c.token_ids) for (p, _), c in zip(rows, done, strict=True))
    assert {c.finish_reason for c in done} == {"stop", "length"}
    for (prompt, _), c in zip(rows, done, strict=True):
        stop = [teacher.tokenizer.eos_id] if c.finish_reason == "stop" else []
        ids = torch.tensor([prompt + c.token_ids + stop])
        with torch.no_grad():
            logp = teacher.model(ids).float().log_softmax(-1)[0, len(prompt) - 1:-1]
        assert c.logprob == pytest.approx(logp.gather(-1, ids[0, len(prompt):, None]).sum().item(), abs=1e-4)


def test_task_checker_flags_every_sample(char_model_dir, tmp_path):
    _run(char_model_dir, tmp_path / "t", verify="task")
    problems = make_problems("train", 10, seed=0, tasks="add,count")
    for r in _records(tmp_path / "t"):
        assert r["verified"] == check(problems[r["index"]], r["completion"])


def test_verified_only_keeps_exactly_what_the_checker_accepts(char_model_dir, tmp_path, write_prompts):
    # a random teacher that ends its completions at the first letter, and reference answers it often hits: the
    # first digit of its first sample (found by a first run), so that the filter keeps some and drops some
    rule, letters = r"re:(\d)", tuple("abcdefghijklmnopqrstuvwxyz")
    texts = [f"Q: {i}+{i}=?\nA:" for i in range(10)]
    questions = write_prompts(tmp_path / "q.jsonl", [{"prompt": t} for t in texts])
    first = _run(char_model_dir, tmp_path / "probe", questions, samples=3, stop=letters)
    digits = {r["index"]: r["completion"] for r in _records(tmp_path / "probe") if r["sample"] == 0}
    rows = [{"prompt": t, "answer": next((ch for ch in digits[i] if ch.isdigit()), "none")}
            for i, t in enumerate(texts)]
    prompts = write_prompts(tmp_path / "p.jsonl", rows)
    everything = _run(char_model_dir, tmp_path / "all", prompts, samples=3, extract=rule, stop=letters)
    _run(char_model_dir, tmp_path / "ver", prompts, samples=3, extract=rule, stop=letters, keep="verified")
    records = _records(tmp_path / "all")
    assert first["counts"]["samples"] == len(records) == 30
    for r in records:
        assert r["verified"] == matches(r["completion"], r["answer"], rule)
    accepted = [r for r in records if r["verified"] and r["finish_reason"] == "stop"]  # (a cut-off one: never)
    assert 0 < len(accepted) < len(records)  # the filter is not trivial either way
    assert _records(tmp_path / "ver") == accepted
    assert everything["counts"]["verified"] == sum(bool(r["verified"]) for r in records)
    assert everything["counts"]["acceptance"] == pytest.approx(everything["counts"]["verified"] / len(records))


def test_best_of_n_takes_the_most_likely_verified_whole_sample():
    def c(lp, n=0, end="stop"):
        return Completion("", [5] * n, end, lp)

    comps = [[c(-3.0), c(-1.0), c(-2.0)], [c(-1.0), c(-1.0)], [c(-5.0)], [c(-4.0, 7), c(-1.0)], [c(-0.1, 3, "length")]]
    verified = [[True, False, True], [None, None], [False], [True, True], [True]]
    assert select([None] * 5, comps, verified, "best") == [
        [False, False, True], [True, False], [False],
        [True, False],  # per token: -4 / 8 beats -1 / 1
        [False]]  # cut off by max_tokens: never the best, never kept as verified
    assert select([None] * 2, [comps[0], comps[4]], [verified[0], verified[4]], "verified") == [
        [True, False, True], [False]]


def test_the_dataset_is_a_training_corpus_with_prompts_masked(char_model_dir, tmp_path):
    _run(char_model_dir, tmp_path / "d")
    docs = list(iter_documents(tmp_path / "d"))
    assert len(docs) >= 1 and all(isinstance(d, Prompted) and d.prompt.startswith("Q: ") for d in docs)
    assert (tmp_path / "d" / "tokenizer.json").is_file()  # the teacher's: a student trained on it takes it


def test_seeds_are_per_sample():
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1) and sample_seed(0, 1, 0) == sample_seed(0, 1, 0)


def test_a_run_where_every_completion_ends_at_once(char_model_dir, tmp_path):
    """The engine admits the next requests when every admitted one finished at its first token."""
    manifest = _run(char_model_dir, tmp_path / "one", max_tokens=1, batch_size=1)
    assert manifest["counts"]["samples"] == 10 and manifest["counts"]["tokens"]["generated"] == 10


def test_bad_input_is_one_line_and_exit_2(char_model_dir, tmp_path, write_prompts, capsys):
    base = ["synthesize", "--teacher", str(char_model_dir), "--max-tokens", "4", "--num-prompts", "4"]

    def fails(args, match):
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and match in err, err

    fails(["--out", str(tmp_path / "x"), "--prompts", str(write_prompts(tmp_path / "np.jsonl", [{"text": "q"}]))],
          "np.jsonl:1: no 'prompt' field")
    no_answers = write_prompts(tmp_path / "na.jsonl", [{"prompt": "q"}])
    fails(["--out", str(tmp_path / "x"), "--prompts", str(no_answers), "--verify", "answer"], "no reference answer")
    fails(["--out", str(tmp_path / "x"), "--prompts", str(no_answers), "--keep", "verified"], "needs a verifier")
    fails(["--out", str(tmp_path / "x"), "--extract", "re:("], "not a regular expression")
    fails(["--out", str(tmp_path / "long"), "--max-tokens", "5000"], "exceeds the teacher's context")
    assert not (tmp_path / "long").exists()  # found before anything was written: the directory stays usable
    # a directory holding another teacher's shards is left as it was
    other = tmp_path / "other-teacher"  # the same architecture and tokenizer, other weights
    save_model(build_model(load_model(str(char_model_dir)).config, seed=1), other)
    shutil.copy(char_model_dir / "tokenizer.json", other)
    out = tmp_path / "taken"
    assert main([*base, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["synthesize", "--teacher", str(other), "--max-tokens", "4", "--num-prompts", "4", "--out",
                 str(out)]) == 2
    assert "another teacher" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    fails(["--out", str(out), "--temperature", "0.5"], "other settings (temperature differ)")
    bare = tmp_path / "no-tokenizer"  # a teacher that cannot turn prompts into tokens
    shutil.copytree(char_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(["synthesize", "--teacher", str(bare), "--out", str(tmp_path / "nt")]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err and not (tmp_path / "nt").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    fails(["--out", str(tmp_path / "busy")], "is not a synthesized dataset")


@pytest.fixture
def write_prompts():
    def write(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    return write


def test_cli_prints_acceptance(char_model_dir, tmp_path, capsys):
    assert main(["synthesize", "--teacher", str(char_model_dir), "--out", str(tmp_path / "o"), "--tasks", "add",
                 "--num-prompts", "3", "--max-tokens", "4", "--keep", "best", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "shard 1/1" in out and "verified (add 0%)" in out and "--data.path=" in out


def test_a_transformers_teacher_of_another_family_writes_too(tmp_path):
    pytest.importorskip("transformers")
    from foreign_models import char_tokenizer, save_teacher

    teacher_dir = save_teacher(tmp_path / "gpt2", "gpt2", char_tokenizer())
    first = _run(teacher_dir, tmp_path / "a", samples=2)
    _run(teacher_dir, tmp_path / "b", samples=2)
    assert first["teacher"]["family"] == "transformers:gpt2"
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b") and len(_records(tmp_path / "a")) == 20
    teacher = Teacher(teacher_dir)  # its log-probabilities are its own forward's
    prompts, _ = load_prompts(None, tasks="add", num_prompts=3)
    rows = [(teacher.encode(p), Settings(**QUICK).params((teacher.tokenizer.eos_id,), 5)) for p in prompts]
    for (prompt, _), c in zip(rows, teacher.complete(rows, (), batch_size=3)[0], strict=True):
        stop = [teacher.tokenizer.eos_id] if c.finish_reason == "stop" else []
        ids = torch.tensor([prompt + c.token_ids + stop])
        with torch.no_grad():
            logp = teacher.model.model(ids).logits.float().log_softmax(-1)[0, len(prompt) - 1:-1]
        assert c.logprob == pytest.approx(logp.gather(-1, ids[0, len(prompt):, None]).sum().item(), abs=1e-3)

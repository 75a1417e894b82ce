"""Corpus files: formats, globs, document rules, bad input (ValueError naming the file), fingerprints."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest

from behemoth.data import corpus_fingerprint, iter_documents, resolve_paths

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(path, columns: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_three_formats_in_order(tmp_path, write_jsonl):
    (tmp_path / "a.txt").write_text("line one\nline two\n\nstill the same document\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "json one", "id": 1}, {"text": "json two 🙂"}])
    write_parquet(tmp_path / "c.parquet", {"text": ["pq one", "pq two"], "n": [1, 2]})
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"]))
    assert docs == ["line one\nline two\n\nstill the same document\n", "json one", "json two 🙂", "pq one", "pq two"]


def test_txt_keeps_bytes_exactly(tmp_path):
    text = "crlf\r\nkept\r\n  and spaces  "
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    assert list(iter_documents(tmp_path / "a.txt")) == [text]


def test_custom_field_and_gzip(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "x1"}, {"body": "x2"}])
    write_parquet(tmp_path / "b.parquet", {"body": ["p1"]})
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gz1"}) + "\n")
    with gzip.open(tmp_path / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gz text")
    assert list(iter_documents(str(tmp_path / "*"), field="body")) == ["x1", "x2", "p1", "gz1", "gz text"]


def test_blank_and_null_documents_are_skipped(tmp_path, write_jsonl):
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "keep"}, {"text": ""}, {"text": None}, {"text": " \t"}])
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n\n", encoding="utf-8")
    write_parquet(tmp_path / "b.parquet", {"text": ["p", None, ""]})
    assert list(iter_documents([tmp_path / "blank.txt", tmp_path / "a.jsonl", tmp_path / "b.parquet"])) == ["keep", "p"]


def test_globs_are_sorted_recursive_and_deduplicated(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/.hidden/h.txt", "z.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name, encoding="utf-8")
    assert resolve_paths(str(tmp_path / "*.txt")) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert resolve_paths(str(tmp_path / "**" / "c.txt")) == [tmp_path / "sub" / "c.txt"]
    # list order is kept across items, repeats dropped
    got = resolve_paths([str(tmp_path / "z.jsonl"), str(tmp_path / "*.txt"), tmp_path / "a.txt"])
    assert got == [tmp_path / "z.jsonl", tmp_path / "a.txt", tmp_path / "b.txt"]
    # a directory means its supported files, recursively, without hidden entries
    assert resolve_paths(tmp_path) == [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub" / "c.txt",
                                       tmp_path / "z.jsonl"]
    assert list(iter_documents(str(tmp_path / "*.txt"))) == ["a.txt", "b.txt"]


def _bad_inputs(tmp_path, write_jsonl):
    """(name, spec, field, file that must be named, extra text that must appear)."""
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "ok"}, {"content": "no text"}])
    (tmp_path / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    write_jsonl(tmp_path / "list.jsonl", [["not", "an", "object"]])
    write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    (tmp_path / "blank.jsonl").write_text("\n\n", encoding="utf-8")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    write_parquet(tmp_path / "nocol.parquet", {"content": ["x"]})
    write_parquet(tmp_path / "ints.parquet", {"text": [1, 2]})
    (tmp_path / "notes.md").write_text("markdown", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return [
        ("missing", tmp_path / "missing.txt", "text", "missing.txt", "no such file"),
        ("glob", str(tmp_path / "nothing*.jsonl"), "text", "nothing*.jsonl", "no files match"),
        ("empty file", tmp_path / "empty.txt", "text", "empty.txt", "no documents"),
        ("empty corpus", [tmp_path / "empty.txt", tmp_path / "blank.jsonl"], "text", "blank.jsonl", "no documents"),
        ("missing field", tmp_path / "nofield.jsonl", "text", "nofield.jsonl:2", "'text'"),
        ("invalid json", tmp_path / "badjson.jsonl", "text", "badjson.jsonl:2", "invalid JSON"),
        ("not an object", tmp_path / "list.jsonl", "text", "list.jsonl:1", "JSON object"),
        ("not a string", tmp_path / "number.jsonl", "text", "number.jsonl:1", "expected a string"),
        ("corrupt parquet", tmp_path / "corrupt.parquet", "text", "corrupt.parquet", "parquet"),
        ("missing column", tmp_path / "nocol.parquet", "text", "nocol.parquet", "'text'"),
        ("non-string column", tmp_path / "ints.parquet", "text", "ints.parquet", "expected strings"),
        ("unknown extension", tmp_path / "notes.md", "text", "notes.md", "unsupported"),
        ("not utf-8", tmp_path / "latin1.txt", "text", "latin1.txt", "UTF-8"),
    ]


def test_bad_inputs_name_the_file(tmp_path, write_jsonl):
    for name, spec, field, named, extra in _bad_inputs(tmp_path, write_jsonl):
        with pytest.raises(ValueError) as info:
            list(iter_documents(spec, field=field))
        msg = str(info.value)
        assert named in msg and extra in msg, f"{name}: {msg}"


def test_path_errors_are_raised_before_iterating(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl"):
        iter_documents([tmp_path / "missing.jsonl"])  # no next() needed
    with pytest.raises(ValueError, match="no corpus paths"):
        resolve_paths([])


def test_fingerprint(tmp_path, write_jsonl):
    a = write_jsonl(tmp_path / "one" / "a.jsonl", [{"text": "alpha"}])
    b = write_jsonl(tmp_path / "one" / "b.jsonl", [{"text": "beta"}])
    fp = corpus_fingerprint([a, b])
    assert len(fp) == 64 and fp == corpus_fingerprint(str(tmp_path / "one" / "*.jsonl"))
    assert corpus_fingerprint([b, a]) != fp  # order matters (it is the document order)
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # moving the corpus keeps the fingerprint
    assert corpus_fingerprint(str(tmp_path / "two" / "*.jsonl")) == fp
    write_jsonl(b, [{"text": "betb"}])  # same size, different content
    assert corpus_fingerprint([a, b]) != fp
    with pytest.raises(ValueError, match="nope"):
        corpus_fingerprint(tmp_path / "nope.txt")

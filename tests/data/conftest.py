"""Small corpora and tokenizers shared by the data tests (CPU, milliseconds).

Shared helpers are fixtures (not imports), so this file never competes with another `conftest` module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from behemoth.data import Tokenizer

# Varied text: ASCII, accents, CJK, emoji, combining marks, tabs, CRLF and a special-token string.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, ça va? Ünïcödé is fine.",
    "你好，世界。日本語のテキスト。",
    "emoji 🙂🚀 and combining e\u0301 marks",
    "tabs\tand\r\nwindows newlines\n\n  leading and trailing spaces  ",
    "a literal <|end_of_text|> string inside a document",
]


@pytest.fixture(scope="session")
def byte_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on `TEXTS` (repeated so merges pass min_frequency)."""
    return Tokenizer.train(TEXTS * 4, vocab_size=320)


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, [obj, ...]) -> path: one JSON object per line."""

    def write(path: Path, rows: list) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def numbered_corpus(tmp_path, write_jsonl):
    """corpus(n, name="docs.jsonl") -> path of a jsonl file with documents "document {i} ..." for i < n."""

    def make(n: int, name: str = "docs.jsonl") -> Path:
        rows = [{"text": f"document {i} " + "word " * (i % 7)} for i in range(n)]
        return write_jsonl(tmp_path / "corpus" / name, rows)

    return make

"""Token stores: layout, dtype, atomic writes, the tokenized-corpus cache and the validation split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models

from behemoth.data import Tokenizer, TokenStore, build_in_memory, iter_documents, tokenize_corpus
from behemoth.data.packing import token_dtype

DOCS = ["first document", "the second one, a bit longer than the first", "x", "héllo 🙂"]


def expected_stream(tok: Tokenizer, docs: list[str]) -> tuple[list[int], list[int]]:
    tokens, starts = [], []
    for d in docs:
        starts.append(len(tokens))
        tokens += tok.encode(d) + [tok.eos_id]
    return tokens, starts


def test_build_open_layout(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    store = TokenStore.build(DOCS, tok, tmp_path / "store")
    tokens, starts = expected_stream(tok, DOCS)
    assert store.tokens.dtype == np.uint16 and store.doc_starts.dtype == np.int64
    assert store.tokens.tolist() == tokens and store.doc_starts.tolist() == starts
    assert (store.num_tokens, store.num_docs) == (len(tokens), len(DOCS))
    assert isinstance(store.tokens, np.memmap)
    # EOS ends every document, so it sits right before every document start
    assert store.tokens[-1] == tok.eos_id
    assert (store.tokens[store.doc_starts[1:] - 1] == tok.eos_id).all()
    for i, d in enumerate(DOCS):
        assert tok.decode(store.document(i)) == d
    meta = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert meta["tokenizer"] == tok.fingerprint and meta["num_tokens"] == len(tokens) and meta["dtype"] == "uint16"
    reopened = TokenStore.open(tmp_path / "store")
    assert reopened.tokens.tolist() == tokens and reopened.tokenizer_fingerprint == tok.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary directory left behind


def test_in_memory_matches_disk(tmp_path, byte_tokenizer):
    disk = TokenStore.build(DOCS, byte_tokenizer, tmp_path / "s")
    mem = build_in_memory(DOCS, byte_tokenizer)
    assert mem.directory is None and not isinstance(mem.tokens, np.memmap)
    assert mem.tokens.dtype == disk.tokens.dtype
    assert mem.tokens.tolist() == disk.tokens.tolist() and mem.doc_starts.tolist() == disk.doc_starts.tolist()
    # pre-tokenized documents are taken as they are (EOS still appended)
    ids = build_in_memory([[5, 6, 7], [8]], byte_tokenizer)
    assert ids.tokens.tolist() == [5, 6, 7, 1, 8, 1] and ids.doc_starts.tolist() == [0, 4]
    with pytest.raises(ValueError, match="token ids"):
        build_in_memory([[byte_tokenizer.vocab_size]], byte_tokenizer)
    empty = build_in_memory([], byte_tokenizer)
    assert (empty.num_tokens, empty.num_docs) == (0, 0)


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    vocab = {t: i for i, t in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"])}
    vocab.update({f"w{i}": i + 3 for i in range(70_000)})
    hf = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    big = Tokenizer(hf)
    store = TokenStore.build(["w69999 w1", "w2"], big, tmp_path / "big")
    assert store.tokens.dtype == np.uint32
    assert store.tokens.tolist() == [70002, 4, 1, 5, 1]
    assert TokenStore.open(tmp_path / "big").tokens.tolist() == [70002, 4, 1, 5, 1]


def test_failed_build_leaves_nothing_and_keeps_old_store(tmp_path, byte_tokenizer):
    def docs():
        yield "one"
        yield "two"
        raise RuntimeError("crash while reading")

    with pytest.raises(RuntimeError, match="crash"):
        TokenStore.build(docs(), byte_tokenizer, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []  # neither the store nor a temporary directory
    old = TokenStore.build(["old"], byte_tokenizer, tmp_path / "s").tokens.tolist()
    with pytest.raises(RuntimeError, match="crash"):
        TokenStore.build(docs(), byte_tokenizer, tmp_path / "s")
    assert TokenStore.open(tmp_path / "s").tokens.tolist() == old
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="precious.*not a token store"):
        TokenStore.build(["x"], byte_tokenizer, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_open_rejects_incomplete_stores(tmp_path, byte_tokenizer):
    with pytest.raises(ValueError, match="not a token store"):
        TokenStore.open(tmp_path)
    store_dir = tmp_path / "s"
    TokenStore.build(DOCS, byte_tokenizer, store_dir)
    tokens_bin = store_dir / "tokens.bin"
    tokens_bin.write_bytes(tokens_bin.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"tokens\.bin.*truncated"):
        TokenStore.open(store_dir)
    (store_dir / "meta.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match=r"meta\.json"):
        TokenStore.open(store_dir)


# ---- tokenize_corpus: cache and split -------------------------------------------------------------

def test_cache_hit_tokenizes_nothing(tmp_path, byte_tokenizer, numbered_corpus, monkeypatch):
    corpus = numbered_corpus(40)
    cache = tmp_path / "cache"
    train, val = tokenize_corpus(corpus, byte_tokenizer, cache, val_fraction=0.1)
    assert train.num_docs + val.num_docs == 40
    first = (train.tokens.tolist(), train.doc_starts.tolist(), val.tokens.tolist(), val.doc_starts.tolist())

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized on a cache hit")

    monkeypatch.setattr(Tokenizer, "encode", refuse)
    monkeypatch.setattr(Tokenizer, "encode_batch", refuse)
    train2, val2 = tokenize_corpus(str(corpus), byte_tokenizer, cache, val_fraction=0.1)
    assert (train2.tokens.tolist(), train2.doc_starts.tolist(), val2.tokens.tolist(),
            val2.doc_starts.tolist()) == first
    assert train2.directory == train.directory
    assert len(list(cache.iterdir())) == 1


def test_cache_key_changes_with_inputs(tmp_path, byte_tokenizer, numbered_corpus, write_jsonl):
    corpus = numbered_corpus(10)
    cache = tmp_path / "cache"

    def key_dir(*args, **kwargs):
        train, _ = tokenize_corpus(*args, **kwargs)
        return train.directory.parent

    base = key_dir(corpus, byte_tokenizer, cache)
    assert key_dir(corpus, byte_tokenizer, cache) == base
    assert key_dir(corpus, Tokenizer.train(["other text " * 5] * 3, 300), cache) != base
    assert key_dir(corpus, byte_tokenizer, cache, val_fraction=0.2) != base
    assert key_dir(corpus, byte_tokenizer, cache, seed=1) != base
    write_jsonl(corpus.parent / "more.jsonl", [{"text": "another file"}])
    assert key_dir([corpus, corpus.parent / "more.jsonl"], byte_tokenizer, cache) != base
    write_jsonl(corpus, [{"text": "changed content"}, {"text": "second"}])
    changed = key_dir(corpus, byte_tokenizer, cache)
    assert changed != base
    assert len({p.name for p in cache.iterdir()}) == 6


def test_crash_leaves_no_complete_cache(tmp_path, byte_tokenizer, numbered_corpus, monkeypatch):
    corpus = numbered_corpus(600)  # more than one encode_batch chunk
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = Tokenizer.encode_batch

    def crash_on_second_chunk(self, texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, byte_tokenizer, cache)
    assert list(cache.iterdir()) == []  # the temporary directory is removed too
    monkeypatch.setattr(Tokenizer, "encode_batch", real)
    train, val = tokenize_corpus(corpus, byte_tokenizer, cache)
    assert train.num_docs + val.num_docs == 600


def test_half_written_cache_dir_is_not_read_as_complete(tmp_path, byte_tokenizer, numbered_corpus):
    corpus = numbered_corpus(12)
    cache = tmp_path / "cache"
    train, _ = tokenize_corpus(corpus, byte_tokenizer, cache)
    key_dir = train.directory.parent
    (key_dir / "meta.json").unlink()  # as if the process died before the final meta.json
    (key_dir / "train" / "tokens.bin").write_bytes(b"")
    with pytest.warns(UserWarning, match="rebuilding"):
        train2, val2 = tokenize_corpus(corpus, byte_tokenizer, cache)
    assert train2.num_docs + val2.num_docs == 12 and (key_dir / "meta.json").is_file()


def _doc_texts(store: TokenStore, tok: Tokenizer) -> list[str]:
    return [tok.decode(store.document(i)) for i in range(store.num_docs)]


def test_validation_split_is_disjoint_deterministic_whole_documents(tmp_path, byte_tokenizer, numbered_corpus):
    corpus = numbered_corpus(400)
    all_docs = list(iter_documents(corpus))
    train, val = tokenize_corpus(corpus, byte_tokenizer, tmp_path / "c1", val_fraction=0.25, seed=3)
    train_docs, val_docs = _doc_texts(train, byte_tokenizer), _doc_texts(val, byte_tokenizer)
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(all_docs)
    assert 60 <= len(val_docs) <= 140  # ~25% of 400
    assert train_docs == [d for d in all_docs if d in set(train_docs)]  # corpus order kept within a split
    # deterministic: a fresh cache directory gives the same split; another seed a different one
    train_b, val_b = tokenize_corpus(corpus, byte_tokenizer, tmp_path / "c2", val_fraction=0.25, seed=3)
    assert _doc_texts(val_b, byte_tokenizer) == val_docs and train_b.tokens.tolist() == train.tokens.tolist()
    _, val_c = tokenize_corpus(corpus, byte_tokenizer, tmp_path / "c3", val_fraction=0.25, seed=4)
    assert _doc_texts(val_c, byte_tokenizer) != val_docs


@pytest.mark.parametrize("n_docs", [1, 2, 3, 5])
def test_small_corpora_keep_one_document_on_each_side(tmp_path, byte_tokenizer, numbered_corpus, n_docs):
    corpus = numbered_corpus(n_docs)
    for seed in range(4):
        train, val = tokenize_corpus(corpus, byte_tokenizer, tmp_path / "cache", val_fraction=0.01, seed=seed)
        assert train.num_docs + val.num_docs == n_docs
        assert train.num_docs >= 1
        assert val.num_docs >= 1 if n_docs >= 2 else val.num_docs == 0
    train, val = tokenize_corpus(corpus, byte_tokenizer, tmp_path / "cache", val_fraction=0.0)
    assert (train.num_docs, val.num_docs, val.num_tokens) == (n_docs, 0, 0)


def test_tokenize_corpus_bad_arguments(tmp_path, byte_tokenizer, numbered_corpus):
    corpus = numbered_corpus(3)
    with pytest.raises(ValueError, match="val_fraction"):
        tokenize_corpus(corpus, byte_tokenizer, tmp_path / "c", val_fraction=1.0)
    with pytest.raises(ValueError, match="missing.jsonl"):
        tokenize_corpus(tmp_path / "missing.jsonl", byte_tokenizer, tmp_path / "c")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no documents in .*empty.txt"):
        tokenize_corpus(tmp_path / "empty.txt", byte_tokenizer, tmp_path / "c")
    assert [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")] == []

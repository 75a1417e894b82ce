"""Documents with prompts: read from JSONL and parquet, packed with their prompt lengths, and masked out of the
labels by the loader (the model reads a prompt but is not trained to write it)."""

from __future__ import annotations

import numpy as np
import pytest

from behemoth.data import DataLoader, TokenStore, build_in_memory, iter_documents, tokenize_corpus
from behemoth.data.corpus import Prompted, as_text
from behemoth.data.loader import IGNORE_INDEX
from behemoth.data.tasks import ALPHABET
from behemoth.data.tokenizer import Tokenizer

CHARS = Tokenizer.from_chars(ALPHABET)
ROWS = [{"prompt": "Q: 1+1=?\nA:", "completion": " 2\n"},  # the prompt-completion format (synthesize, TRL)
        {"text": "plain text"},  # no prompt: trained on whole
        {"prompt": "Q: x", "text": " y"},  # a prompt beside the text field
        {"prompt": None, "text": "null prompt"},  # a null or empty prompt is none
        {"prompt": "", "completion": "empty prompt"},
        {"prompt": "Q: 7", "text": "Q: 7 is seven"}]  # a text that holds its prompt: the prompt is not repeated


def test_jsonl_records_with_prompts(tmp_path, write_jsonl):
    docs = list(iter_documents(write_jsonl(tmp_path / "a.jsonl", ROWS)))
    assert docs == [Prompted("Q: 1+1=?\nA:", " 2\n"), "plain text", Prompted("Q: x", " y"), "null prompt",
                    "empty prompt", Prompted("Q: 7", " is seven")]
    assert as_text(docs[0]) == "Q: 1+1=?\nA: 2\n"
    assert list(iter_documents(tmp_path / "a.jsonl", prompt_field=None))[0] == " 2\n"  # prompts not read


def test_jsonl_prompt_errors_name_the_line(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"prompt": 3, "text": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'prompt' is int"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "none.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"none.jsonl:1: no field 'text' or 'completion'"):
        list(iter_documents(tmp_path / "none.jsonl"))


def test_parquet_prompt_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a1", "b2"], "prompt": ["Q:", None]}), tmp_path / "p.parquet")
    assert list(iter_documents(tmp_path / "p.parquet")) == [Prompted("Q:", "a1"), "b2"]
    pq.write_table(pa.table({"prompt": ["Q:"], "completion": [" 3"]}), tmp_path / "c.parquet")  # TRL's format
    assert list(iter_documents(tmp_path / "c.parquet")) == [Prompted("Q:", " 3")]


def _labels_by_hand(store: TokenStore) -> np.ndarray:
    """The stream's next-token labels, IGNORE_INDEX wherever the label token is in its document's prompt,
    from the documents one by one (the loader's vectorised mask is checked against this)."""
    labels = np.asarray(store.tokens, dtype=np.int64).copy()
    for i in range(store.num_docs):
        start = int(store.doc_starts[i])
        labels[start:start + store.prompt_len(i)] = IGNORE_INDEX
    return labels[1:]


def test_store_keeps_prompt_lengths_and_loader_masks_them(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "a.jsonl", ROWS * 3)
    train, _ = tokenize_corpus(tmp_path / "a.jsonl", CHARS, tmp_path / "cache", val_fraction=0.0)
    assert train.meta["prompted"] == 9
    assert list(train.prompt_lens[:5]) == [len("Q: 1+1=?\nA:"), 0, len("Q: x"), 0, 0]
    reopened = TokenStore.open(train.directory)
    assert np.array_equal(reopened.prompt_lens, train.prompt_lens)
    expect = _labels_by_hand(train)
    S = 7  # windows that cut documents anywhere, prompts included
    loader = DataLoader(train, batch_size=1, seq_len=S, shuffle=False)
    for w in range(loader.num_windows):
        batch = next(loader)
        assert batch.labels[0].tolist() == expect[w * S:w * S + S].tolist()
        assert batch.input_ids[0].tolist() == np.asarray(train.tokens[w * S:w * S + S], dtype=np.int64).tolist()
    # the first completion token is trained (predicted from the prompt's last token), and so is EOS
    first = next(DataLoader(train, batch_size=1, seq_len=train.num_tokens - 1, shuffle=False))
    n = len("Q: 1+1=?\nA:")
    assert first.labels[0, n - 2].item() == IGNORE_INDEX and first.labels[0, n - 1].item() == CHARS.encode(" ")[0]
    assert first.labels[0, n + 2].item() == CHARS.eos_id


def test_plain_stores_have_no_prompt_file_and_are_unchanged(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}, {"text": "de"}])
    train, _ = tokenize_corpus(tmp_path / "a.jsonl", CHARS, tmp_path / "cache", val_fraction=0.0)
    assert train.prompt_lens is None and "prompted" not in train.meta
    assert not (train.directory / "prompt_lens.bin").exists()
    batch = next(DataLoader(train, batch_size=1, seq_len=4, shuffle=False))
    assert (batch.labels != IGNORE_INDEX).all()


def test_in_memory_store_with_prompts():
    store = build_in_memory([Prompted("ab", "cd"), "ef"], CHARS)
    assert store.prompt_lens.tolist() == [2, 0]
    assert build_in_memory(["ab"], CHARS).prompt_lens is None
    with pytest.raises(ValueError, match="prompt length"):
        TokenStore(store.tokens, store.doc_starts, prompt_lens=np.array([5, 0], np.int32))  # the whole document

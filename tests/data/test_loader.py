"""The data loader: window slicing, per-document positions and segments, determinism, epochs, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from behemoth.data import Batch, DataLoader, TokenStore, build_in_memory

# Token i has value i, so a batch row tells exactly which stream offsets it holds.
DOC_STARTS = [0, 5, 17, 18, 40, 41, 42, 90, 131]
NUM_TOKENS = 150


def arange_store(num_tokens: int = NUM_TOKENS, doc_starts=DOC_STARTS) -> TokenStore:
    return TokenStore(np.arange(num_tokens, dtype=np.uint32), np.array(doc_starts, dtype=np.int64))


def drain(loader: DataLoader, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "labels", "positions", "segment_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_windows_labels_positions_segments():
    store, S = arange_store(), 8
    loader = DataLoader(store, batch_size=3, seq_len=S, seed=0)
    assert loader.num_windows == (NUM_TOKENS - 1) // S and loader.tokens_per_batch == 24
    starts = np.array(DOC_STARTS)
    for batch in drain(loader, 12):
        for t in (batch.input_ids, batch.labels, batch.positions, batch.segment_ids):
            assert t.shape == (3, S) and t.dtype == torch.int64
        x, y = batch.input_ids.numpy(), batch.labels.numpy()
        assert (x[:, 0] % S == 0).all()  # windows start at multiples of seq_len (stride seq_len)
        assert (y == x + 1).all()  # labels: the next token of the stream
        assert (batch.input_ids[:, 1:] == batch.labels[:, :-1]).all()
        doc = np.searchsorted(starts, x, side="right") - 1
        assert (batch.positions.numpy() == x - starts[doc]).all()
        assert ((batch.positions.numpy() == 0) == np.isin(x, starts)).all()  # restarts exactly at doc starts
        seg = batch.segment_ids.numpy()
        assert (seg[:, 0] == 0).all()
        changes = seg[:, 1:] != seg[:, :-1]
        assert (changes == np.isin(x[:, 1:], starts)).all()  # segment changes exactly at document starts
        assert (seg[:, 1:] - seg[:, :-1] == changes).all()


def test_real_store_eos_between_documents(byte_tokenizer):
    docs = [f"document number {i} " + "text " * (i % 5) for i in range(30)]
    store = build_in_memory(docs, byte_tokenizer)
    loader = DataLoader(store, batch_size=4, seq_len=16, shuffle=False)
    for batch in drain(loader, loader.num_windows // 4):
        x, pos = batch.input_ids, batch.positions
        starts_here = pos[:, 1:] == 0
        assert (x[:, :-1][starts_here] == byte_tokenizer.eos_id).all()  # EOS right before each document start
        seg = batch.segment_ids
        assert (seg[:, :-1][starts_here] + 1 == seg[:, 1:][starts_here]).all()  # EOS belongs to the doc it ends
        assert ((x == byte_tokenizer.eos_id)[:, :-1] == starts_here).all()  # and EOS only there


def test_epoch_visits_every_window_once_and_batches_straddle_epochs():
    store = arange_store()
    loader = DataLoader(store, batch_size=4, seq_len=8, seed=7)
    n = loader.num_windows  # 18 windows: 4 batches + 2 windows, then the 5th batch crosses into epoch 1
    assert n == 18
    firsts = torch.cat([b.input_ids[:, 0] for b in drain(loader, 9)]).numpy() // 8  # 36 windows = 2 epochs
    assert sorted(firsts[:n]) == list(range(n)) and sorted(firsts[n:]) == list(range(n))
    assert list(firsts[:n]) != list(firsts[n:])  # each epoch has its own permutation
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["index"] == 0
    ordered = DataLoader(store, batch_size=4, seq_len=8, shuffle=False)
    firsts = torch.cat([b.input_ids[:, 0] for b in drain(ordered, 9)]).numpy() // 8
    assert list(firsts) == list(range(n)) * 2


def test_deterministic_by_seed():
    store = arange_store()
    a = drain(DataLoader(store, batch_size=5, seq_len=6, seed=3), 10)
    b = drain(DataLoader(store, batch_size=5, seq_len=6, seed=3), 10)
    c = drain(DataLoader(store, batch_size=5, seq_len=6, seed=4), 10)
    assert_same(a, b)
    assert any(not torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("k", [0, 1, 3, 4, 5, 9])  # 18 windows / batch 4: k=4 is mid-way through the crossing
def test_resume_reproduces_the_uninterrupted_run(k, shuffle):
    store = arange_store()
    reference = drain(DataLoader(store, batch_size=4, seq_len=8, seed=11, shuffle=shuffle), k + 8)
    first = DataLoader(store, batch_size=4, seq_len=8, seed=11, shuffle=shuffle)
    drain(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON round trip, as in a checkpoint
    assert {"epoch", "index", "seed"} <= set(state)
    resumed = DataLoader(store, batch_size=4, seq_len=8, seed=11, shuffle=shuffle)
    resumed.load_state_dict(state)
    assert_same(drain(resumed, 8), reference[k:])


def test_load_state_dict_rejects_mismatches():
    store = arange_store()
    state = DataLoader(store, batch_size=4, seq_len=8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        DataLoader(store, batch_size=4, seq_len=8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        DataLoader(store, batch_size=4, seq_len=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_windows"):
        DataLoader(arange_store(100, [0, 50]), batch_size=4, seq_len=8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="index"):
        DataLoader(store, batch_size=4, seq_len=8, seed=1).load_state_dict({**state, "index": 99})
    DataLoader(store, batch_size=2, seq_len=8, seed=1).load_state_dict(state)  # batch size may change


def test_too_little_data_and_bad_arguments():
    with pytest.raises(ValueError, match="too few"):
        DataLoader(arange_store(8, [0]), batch_size=1, seq_len=8)
    DataLoader(arange_store(9, [0]), batch_size=1, seq_len=8)  # exactly one window of 9 tokens
    with pytest.raises(ValueError, match="too few"):
        DataLoader(TokenStore(np.zeros(0, np.uint16), np.zeros(0, np.int64)), batch_size=1, seq_len=4)
    for kwargs in ({"batch_size": 0}, {"seq_len": 0}, {"seed": -1}, {"batch_size": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            DataLoader(arange_store(), **{"batch_size": 2, "seq_len": 4, **kwargs})


def test_fewer_windows_than_batch_size_and_iteration():
    loader = DataLoader(arange_store(20, [0, 7]), batch_size=5, seq_len=8, shuffle=False)
    assert loader.num_windows == 2
    batch = next(iter(loader))
    assert batch.input_ids[:, 0].tolist() == [0, 8, 0, 8, 0]  # epochs follow one another inside a batch
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["index"] == 1
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.num_tokens == 40


def test_disk_store_matches_memory(tmp_path, byte_tokenizer):
    docs = [f"doc {i} " * (i % 4 + 1) for i in range(20)]
    disk = TokenStore.build(docs, byte_tokenizer, tmp_path / "s")
    mem = build_in_memory(docs, byte_tokenizer)
    assert_same(drain(DataLoader(disk, 2, 8, seed=5), 6), drain(DataLoader(mem, 2, 8, seed=5), 6))

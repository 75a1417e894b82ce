"""Training data: corpora on disk -> tokenizer -> packed, cached token stores -> resumable batches.

    paths = resolve_paths("corpus/*.jsonl")
    tok = Tokenizer.load("tokenizer.json")            # or Tokenizer.train(iter_documents(paths), 32000)
    train, val = tokenize_corpus(paths, tok, cache_dir)   # tokenized once, then read from the cache
    for batch in DataLoader(train, batch_size=8, seq_len=2048):   # endless; state_dict() to resume
        ...
"""

from __future__ import annotations

from behemoth.data.corpus import corpus_fingerprint, iter_documents, resolve_paths
from behemoth.data.loader import Batch, DataLoader
from behemoth.data.packing import TokenStore, build_in_memory, tokenize_corpus
from behemoth.data.tokenizer import Tokenizer

__all__ = ["Batch", "DataLoader", "TokenStore", "Tokenizer", "build_in_memory", "corpus_fingerprint",
           "iter_documents", "resolve_paths", "tokenize_corpus"]

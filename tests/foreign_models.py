"""Tiny random transformers models of several families, saved with a tokenizer as `save_pretrained` writes them:
the teachers of other families the tests distil from."""

from __future__ import annotations

from pathlib import Path

import torch

from behemoth.data.tasks import ALPHABET, make_problems
from behemoth.data.tokenizer import Tokenizer

FAMILIES = ("llama", "qwen2", "gpt2", "mixtral")  # dense x 3 (two attention layouts, learned positions), MoE


def hf_config(family: str, vocab: int):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mixtral":
        return transformers.MixtralConfig(**{**common, "intermediate_size": 48}, num_local_experts=4,
                                          num_experts_per_tok=2)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                       bos_token_id=1, eos_token_id=1)
    raise ValueError(family)


def char_tokenizer() -> Tokenizer:
    """The tokenizer a student of the built-in tasks gets by default."""
    return Tokenizer.from_chars(ALPHABET)


def bpe_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained here on the built-in tasks' text: another tokenizer than the student's."""
    texts = [p.text for p in make_problems("train", 600, seed=1)]
    return Tokenizer.train(texts, vocab_size=vocab_size)


def save_teacher(directory: Path, family: str, tok: Tokenizer, seed: int = 0, tokenizer: bool = True) -> Path:
    """A random `family` model sized for `tok`, written by `save_pretrained` with `tok`'s tokenizer.json."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, tok.vocab_size)).eval()
    model.save_pretrained(directory)
    if tokenizer:
        tok.save(directory)
    return directory

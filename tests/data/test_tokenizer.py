"""Tokenizers: train/save/load round trips, exact byte-level decoding, fingerprints, character tokenizers,
foreign tokenizer.json files (special-token discovery) and bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, processors

from behemoth.data import Tokenizer

ROUND_TRIP = [
    "",
    " ",
    "plain ascii text.",
    "  leading, trailing and   repeated   spaces  ",
    "tabs\tnewlines\n\nand CRLF\r\n",
    "Héllo wörld, ça va? Ñandú.",
    "你好，世界。こんにちは。안녕하세요.",
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 vs precomposed é (not normalised)",
    "zero\u200bwidth and \u00a0nbsp",
    "text with <|end_of_text|> and <|pad|> inside",
    "unseen characters: ∮ ℵ ⅷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_train_special_tokens_and_vocab(byte_tokenizer):
    tok = byte_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == tok.hf.get_vocab_size(with_added_tokens=True)
    assert 259 <= tok.vocab_size <= 320
    assert len(tok.fingerprint) == 64 and int(tok.fingerprint, 16) >= 0


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_byte_level_round_trip_is_exact(byte_tokenizer, text):
    ids = byte_tokenizer.encode(text)
    assert byte_tokenizer.decode(ids) == text
    assert all(0 <= i < byte_tokenizer.vocab_size for i in ids)


def test_encode_adds_no_special_tokens_and_ignores_special_strings(byte_tokenizer):
    tok = byte_tokenizer
    text = "a <|end_of_text|> b <|begin_of_text|>"
    ids = tok.encode(text)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)  # literal text cannot inject control tokens
    assert tok.decode(ids) == text  # the special strings survive as text (decode would drop control tokens)
    hello = tok.encode("hello")
    assert "".join(tok.hf.id_to_token(i) for i in hello) == "hello"  # only pieces of the text, nothing added
    # a post-processor that wraps every sequence in BOS ... EOS (Llama 4's tokenizer.json prepends BOS) changes
    # encode_prompt, never encode
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    hf.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A <|end_of_text|>",
        special_tokens=[("<|begin_of_text|>", tok.bos_id), ("<|end_of_text|>", tok.eos_id)])
    wrapped = Tokenizer(hf)
    assert wrapped.encode("hello") == hello and wrapped.encode(text) == ids
    assert wrapped.encode_prompt("hello") == [tok.bos_id, *hello, tok.eos_id]
    assert tok.encode_prompt("hello") == hello  # ours have no post-processor


def test_decode_skips_special_tokens_and_accepts_arrays(byte_tokenizer):
    tok = byte_tokenizer
    ids = tok.encode("The quick brown fox")
    with_specials = [tok.bos_id, *ids, tok.eos_id, tok.pad_id]
    assert tok.decode(with_specials) == "The quick brown fox"
    assert tok.decode(torch.tensor(with_specials)) == "The quick brown fox"
    assert tok.decode(np.array(with_specials, dtype=np.uint16)) == "The quick brown fox"


def test_save_load_round_trip(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    tok.save(tmp_path / "dir")  # a directory: writes dir/tokenizer.json
    tok.save(tmp_path / "named.json")  # a .json path: writes that file
    assert (tmp_path / "dir" / "tokenizer.json").is_file() and (tmp_path / "named.json").is_file()
    for loaded in (Tokenizer.load(tmp_path / "dir"), Tokenizer.load(tmp_path / "dir" / "tokenizer.json"),
                   Tokenizer.load(str(tmp_path / "named.json"))):
        assert loaded.fingerprint == tok.fingerprint
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.vocab_size, 0, 1, 2)
        for text in ROUND_TRIP:
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(loaded.encode(text)) == text
    # saving a loaded tokenizer again gives the same fingerprint (stable across save/load cycles)
    again = Tokenizer.load(tmp_path / "dir")
    again.save(tmp_path / "again")
    assert Tokenizer.load(tmp_path / "again").fingerprint == tok.fingerprint


def test_fingerprint_identifies_the_tokenizer(byte_tokenizer):
    texts = ["some other training text, quite different " * 3, "more words here and there"] * 4
    other = Tokenizer.train(texts, vocab_size=300)
    assert other.fingerprint != byte_tokenizer.fingerprint
    assert Tokenizer.train(texts, vocab_size=300).fingerprint == other.fingerprint  # training is deterministic
    assert Tokenizer.from_chars("ab").fingerprint != Tokenizer.from_chars("ba").fingerprint


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        Tokenizer.train(["text"], vocab_size=100)


def test_char_tokenizer(tmp_path):
    tok = Tokenizer.from_chars("0123456789+= \nab")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + 16
    assert tok.encode("12+3") == [4, 5, 13, 6]
    assert tok.encode("") == []
    assert tok.decode(tok.encode("12 + 30 = 42\nab")) == "12 + 30 = 42\nab"  # no spaces inserted
    assert tok.decode([tok.bos_id, 4, 5, tok.eos_id, tok.pad_id]) == "12"
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("12x")
    assert Tokenizer.from_chars("aab").vocab_size == 5  # duplicates ignored
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == tok.fingerprint and loaded.encode("12+3") == [4, 5, 13, 6]
    with pytest.raises(ValueError, match="'x'"):
        loaded.encode("x")
    with pytest.raises(ValueError, match="alphabet"):
        Tokenizer.from_chars("")


def _foreign(tmp_path, name: str, specials: list[str]):
    vocab = {t: i for i, t in enumerate(["a", "b", "c", *specials])}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    path = tmp_path / name
    path.write_text(hf.to_str(), encoding="utf-8")
    return path, vocab


def test_foreign_tokenizer_special_token_discovery(tmp_path):
    # Llama 4 style: end_of_text wins over eot, pad is finetune_right_pad
    path, vocab = _foreign(tmp_path, "llama4.json", ["<|begin_of_text|>", "<|eot|>", "<|end_of_text|>",
                                                     "<|finetune_right_pad|>"])
    tok = Tokenizer.load(path)
    assert tok.eos_id == vocab["<|end_of_text|>"] and tok.bos_id == vocab["<|begin_of_text|>"]
    assert tok.pad_id == vocab["<|finetune_right_pad|>"]
    assert tok.vocab_size == 7
    # sentencepiece style, no pad: pad falls back to eos
    path, vocab = _foreign(tmp_path, "sp.json", ["<s>", "</s>"])
    tok = Tokenizer.load(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["</s>"])
    # no EOS-like token at all: a clear error naming the file
    path, _ = _foreign(tmp_path, "noeos.json", ["<s>", "<pad>"])
    with pytest.raises(ValueError, match=r"noeos\.json.*end-of-text"):
        Tokenizer.load(path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"empty_dir.*tokenizer\.json"):
        Tokenizer.load(tmp_path / "empty_dir")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.json.*invalid JSON"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": "world"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"other\.json.*not a valid tokenizer"):
        Tokenizer.load(tmp_path / "other.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"binary\.json"):
        Tokenizer.load(tmp_path / "binary.json")


def test_tokenizer_config_names_an_eos_and_adds_bos(tmp_path):
    """A tokenizer.json whose end-of-text token has an uncommon name (DeepSeek's) is usable when
    tokenizer_config.json names it; add_bos_token makes prompts start with BOS; both survive save and load."""
    import tokenizers as tk

    vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, **{c: i + 2 for i, c in enumerate("abc ")}}
    hf = tk.Tokenizer(tk.models.WordLevel(vocab=vocab, unk_token=None))
    hf.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
    hf.add_special_tokens(["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"])
    (tmp_path / "t").mkdir()
    hf.save(str(tmp_path / "t" / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-text token"):
        Tokenizer.load(tmp_path / "t")
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<｜end▁of▁sentence｜>"}, "bos_token": "<｜begin▁of▁sentence｜>",
        "add_bos_token": True, "model_max_length": 16384}))
    tok = Tokenizer.load(tmp_path / "t")
    assert (tok.eos_id, tok.bos_id) == (1, 0)
    assert tok.encode_prompt("ab") == [0, 2, 3] and tok.encode("ab") == [2, 3]
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    assert (again.eos_id, again.bos_id, again.encode_prompt("c")) == (1, 0, [0, 4])
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text()) == {
        "eos_token": {"content": "<｜end▁of▁sentence｜>"}, "bos_token": "<｜begin▁of▁sentence｜>",
        "add_bos_token": True}

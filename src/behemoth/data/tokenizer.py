"""Tokenizers: a thin wrapper over Hugging Face `tokenizers` that knows its special-token ids.

Three ways to get one:

* `Tokenizer.load(path)`: any `tokenizer.json` (ours, or a foreign one such as Llama 4's). The EOS,
  BOS and pad ids are found by common token names, else from the `tokenizer_config.json` beside it (the
  names transformers records, e.g. DeepSeek's); a tokenizer with no EOS-like token is rejected, because
  every document in the packed stream ends with EOS. Where `tokenizer_config.json` says `add_bos_token`,
  `encode_prompt` starts with BOS even if the tokenizer's post-processor does not add it.
* `Tokenizer.train(texts, vocab_size)`: byte-level BPE, so every string (any Unicode) encodes and
  `decode(encode(t)) == t` exactly.
* `Tokenizer.from_chars(alphabet)`: one token per character of a fixed alphabet, for generated tasks
  whose outputs should be read character by character; a character outside the alphabet is an error.

Our own tokenizers put `<|begin_of_text|>`, `<|end_of_text|>`, `<|pad|>` at ids 0, 1, 2.

`encode` never adds special tokens and treats special-token *strings* in the text as ordinary text
(`encode_special_tokens`), so a document that happens to contain "<|end_of_text|>" cannot inject a
control token, and byte-level round trips stay exact. `decode` skips special tokens.

`fingerprint` is the sha256 of the tokenizer's canonical JSON: it identifies the vocabulary and all
encoding rules, is stable across save/load, and keys the tokenized-corpus cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2 in tokenizers we build

# Looked up in order in a loaded tokenizer; the first name present wins. `<|end_of_text|>` comes
# before `<|eot|>` (Llama 4's end of *turn*): documents in a pretraining stream end with end-of-text.
EOS_NAMES = (EOS_TOKEN, "<|endoftext|>", "</s>", "<eos>", "<|eot|>", "<|eot_id|>", "<|im_end|>", "[SEP]")
BOS_NAMES = (BOS_TOKEN, "<s>", "<bos>", "<|startoftext|>", "[CLS]")
PAD_NAMES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad|>", "<|finetune_right_pad_id|>")

CONFIG_KEYS = ("eos_token", "bos_token", "pad_token", "add_bos_token")  # read from tokenizer_config.json
_BYTE_LEVEL_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte is a token, plus the specials


class Tokenizer:
    """Wraps a Hugging Face `tokenizers.Tokenizer`.

    Attributes: `vocab_size` (including added tokens), `eos_id`, `bos_id`, `pad_id` (a loaded
    tokenizer without a BOS or pad token uses `eos_id` for them), `fingerprint` (sha256 hex), and
    `hf` (the wrapped `tokenizers.Tokenizer`, for anything not covered here).
    """

    def __init__(self, hf: tokenizers.Tokenizer, source: str = "<memory>", config: dict | None = None) -> None:
        self.hf = hf
        self.hf.encode_special_tokens = True  # special-token strings in text are plain text
        self.source = source
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        # what a tokenizer_config.json adds: special-token names, add_bos_token (kept, and saved beside the json)
        self.config = {k: config[k] for k in CONFIG_KEYS if k in (config or {})}
        config = self.config
        named = {k: _config_token(config, f"{k}_token") for k in ("eos", "bos", "pad")}
        eos = _first_id(hf, EOS_NAMES + named["eos"])
        if eos is None:
            raise ValueError(f"{source}: tokenizer has no end-of-text token (looked for {', '.join(EOS_NAMES)})")
        self.eos_id: int = eos
        bos = _first_id(hf, BOS_NAMES + named["bos"])
        pad = _first_id(hf, PAD_NAMES + named["pad"])
        self.add_bos: bool = bool(config.get("add_bos_token", False)) and bos is not None
        self.bos_id: int = eos if bos is None else bos
        self.pad_id: int = eos if pad is None else pad
        canonical = json.dumps(json.loads(hf.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        self.fingerprint: str = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        self._alphabet: frozenset[str] | None = None  # character vocabulary, only for error messages

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a `tokenizer.json` file, or the `tokenizer.json` inside a directory."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            what = "directory has no tokenizer.json" if path.is_dir() else "no such file"
            raise ValueError(f"{file}: {what}")
        try:
            text = file.read_text(encoding="utf-8")
            json.loads(text)
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not a tokenizer.json (not UTF-8: {e.reason})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not a tokenizer.json (invalid JSON: {e.msg} at line {e.lineno})") from None
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for schema errors
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from None
        return cls(hf, source=str(file), config=_read_config(file.parent / "tokenizer_config.json"))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE tokenizer (GPT-2/Llama style, no normalisation) on `texts`.

        All 256 bytes are in the vocabulary whatever the texts, so `vocab_size` must be at least
        259 (bytes + specials). The result may be smaller than `vocab_size` when the texts run out
        of merges that occur `min_frequency` times.
        """
        if vocab_size < _BYTE_LEVEL_MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                             f"{_BYTE_LEVEL_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        if min_frequency < 1:
            raise ValueError(f"min_frequency={min_frequency}: must be >= 1")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        _check_special_ids(hf)
        return cls(hf, source=f"<byte-level BPE, vocab {vocab_size}>")

    @classmethod
    def from_chars(cls, alphabet: str, extra_special: Sequence[str] = ()) -> Tokenizer:
        """One token per character of `alphabet` (duplicates ignored), after the three special tokens,
        then `extra_special` tokens (e.g. the image tokens of `data.images.IMAGE_SPECIAL_TOKENS`).

        Characters are numbered in order of first appearance: `from_chars("ab")` gives a=3, b=4.
        Decoding concatenates characters (no spaces are inserted).
        """
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet={alphabet!r}: must be a non-empty string")
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for ch in alphabet:
            vocab.setdefault(ch, len(vocab))
        hf = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(list(SPECIAL_TOKENS))
        hf.add_special_tokens([t for t in extra_special if t not in vocab])
        _check_special_ids(hf)
        extra = f" + {len(extra_special)} special tokens" if extra_special else ""
        return cls(hf, source=f"<characters {alphabet[:40]!r}{extra}>")

    # ---- use ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added. Unencodable text raises `ValueError`."""
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._encode_error(text, e) from None

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt, with whatever the tokenizer's own post-processor adds (Llama 4's
        `tokenizer.json` prepends `<|begin_of_text|>`; ours add nothing, matching how they train)."""
        try:
            ids = self.hf.encode(text, add_special_tokens=True).ids
        except Exception as e:
            raise self._encode_error(text, e) from None
        return [self.bos_id, *ids] if self.add_bos and ids[:1] != [self.bos_id] else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, encoded in parallel by the Rust library (without offsets where the
        installed `tokenizers` has `encode_batch_fast`)."""
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        try:
            return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]
        except Exception:
            return [self.encode(t) for t in texts]  # re-run one by one to report the offending text

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (a list, numpy array or tensor), with special tokens skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json`: to `path` if it names a .json file, else into directory `path`."""
        path = Path(path)
        file = path if path.suffix == ".json" and not path.is_dir() else path / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        tmp.write_text(self.hf.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, file)
        if self.config and file.name == "tokenizer.json":  # what tokenizer.json cannot say, beside it
            cfg = file.with_name("tokenizer_config.json")
            tmp = cfg.with_name(f".{cfg.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
            os.replace(tmp, cfg)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, vocab_size={self.vocab_size}, eos={self.eos_id}, bos={self.bos_id}, "
                f"pad={self.pad_id}, fingerprint={self.fingerprint[:12]})")

    def _encode_error(self, text: object, e: Exception) -> ValueError:
        if not isinstance(text, str):
            return ValueError(f"cannot encode {type(text).__name__}: expected str")
        if isinstance(self.hf.model, models.WordLevel):
            if self._alphabet is None:
                self._alphabet = frozenset(self.hf.get_vocab(with_added_tokens=False))
            unknown = sorted(set(text) - self._alphabet)
            if unknown:
                shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
                return ValueError(f"text has characters outside the tokenizer's alphabet: {shown}")
        return ValueError(f"cannot encode text {text[:40]!r}: {e}")


def _read_config(path: Path) -> dict:
    """A tokenizer_config.json as a dict ({} when absent or unreadable: it only adds to tokenizer.json)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _config_token(config: dict, key: str) -> tuple[str, ...]:
    """The token a tokenizer_config.json names under `key` (a string, or {"content": ...}), as a 0/1-tuple."""
    v = config.get(key)
    v = v.get("content") if isinstance(v, dict) else v
    return (v,) if isinstance(v, str) and v else ()


def _first_id(hf: tokenizers.Tokenizer, names: Iterable[str]) -> int | None:
    for name in names:
        i = hf.token_to_id(name)
        if i is not None:
            return i
    return None


def _check_special_ids(hf: tokenizers.Tokenizer) -> None:
    got = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(len(SPECIAL_TOKENS))):  # an invariant of how we build, not user input
        raise RuntimeError(f"special tokens landed at ids {got}, expected 0, 1, 2")

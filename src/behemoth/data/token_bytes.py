"""The text each token stands for, as UTF-8 bytes: what makes tokenizers comparable.

Two tokenizers cut the same text differently, and a loss per token means different things under each. Bytes
are the common ground: `TokenBytes.of(tok).table[i]` is what token i adds to the decoded text, so a row of
ids maps to byte offsets (cross-tokenizer alignment, `train/token_align.py`), and a loss summed over tokens
divided by the bytes they cover is bits per byte (`eval`), comparable across tokenizers.

Why a table of our own: `tokenizers` decodes whole sequences, not single ids. A byte-level BPE token can be
half a UTF-8 character, whose lone decode is U+FFFD, and SentencePiece's `▁` and `<0xNN>` byte tokens only
become text through the decoder's pipeline. The rules, by the tokenizer's decoder:

  ByteLevel (GPT-2, Llama 3, Qwen, ours)   each character of the token string is one byte (GPT-2's
                                           byte-to-unicode table, inverted)
  Replace "▁" + ByteFallback (Llama 2,     "▁" is a space; "<0xNN>" is the byte NN; a leading space the
  Mistral, Gemma: SentencePiece)           pre-tokenizer prepended to each encoded text is not text
  anything else whose tokens are text      the token string itself (character tokenizers: `Fuse`)
  (Fuse, none)

Special tokens stand for no text (b""). A tokenizer whose decoder is none of these (WordPiece's "##", which
inserts spaces between tokens) raises `ValueError`: it cannot say which bytes one token covers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from behemoth.data.tokenizer import Tokenizer

SPM_SPACE = "\u2581"  # SentencePiece's visible space "▁"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
CHECK_TEXT = "Hello, world! 12 + 30 = 42.\n  Größe: 5 km; café ½ 東京 🙂 end"  # multi-byte characters of 2-4 bytes


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte value. Printable
    Latin-1 bytes stand for themselves; the other 68 are shifted to code points 256 and up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def _decoder_kinds(decoder: dict | None) -> set[str]:
    """The decoder types of a tokenizer.json's "decoder" (a Sequence flattened), with "replace_spm" for a
    Replace of "▁" by a space."""
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in decoder.get("decoders", [])))
    kind = decoder.get("type", "")
    if kind == "Replace" and decoder.get("pattern", {}).get("String") == SPM_SPACE:
        return {"replace_spm"}
    return {kind}


def _prepends_space(spec: dict) -> bool:
    """Whether encoding prepends "▁" to a text (SentencePiece's Metaspace with prepend_scheme first/always,
    or a Prepend normalizer)."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    parts = pre.get("pretokenizers", [pre]) + norm.get("normalizers", [norm])
    for p in parts:
        if p.get("type") == "Metaspace" and (p.get("prepend_scheme", "always") != "never"
                                             and p.get("add_prefix_space", True)):
            return True
        if p.get("type") == "Prepend" and p.get("prepend") == SPM_SPACE:
            return True
    return False


@dataclass(frozen=True)
class TokenBytes:
    """`table[i]`: the UTF-8 bytes token i adds to decoded text (b"" for special tokens). `prefix_space`: the
    tokenizer prepends a space to every text it encodes, so a document's first token carries one byte that
    is not text."""

    table: tuple[bytes, ...]
    prefix_space: bool
    source: str

    @classmethod
    def of(cls, tok: Tokenizer) -> TokenBytes:
        """The table of `tok`, checked on a sample text (`check`); `ValueError` naming the tokenizer when its
        tokens do not map to text piece by piece."""
        spec = json.loads(tok.hf.to_str())
        kinds = _decoder_kinds(spec.get("decoder"))
        special = {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
        vocab = tok.hf.get_vocab(with_added_tokens=True)
        strings = [""] * tok.vocab_size
        for s, i in vocab.items():
            if i < len(strings):
                strings[i] = s
        if "ByteLevel" in kinds:
            alphabet = byte_level_alphabet()

            def to_bytes(s: str) -> bytes:
                return bytes(alphabet[c] for c in s) if all(c in alphabet for c in s) else s.encode()
        elif kinds <= {"replace_spm", "ByteFallback", "Fuse", "Strip", ""} and kinds:
            spm = "replace_spm" in kinds

            def to_bytes(s: str) -> bytes:
                m = _BYTE_TOKEN.fullmatch(s)
                if m and "ByteFallback" in kinds:
                    return bytes([int(m.group(1), 16)])
                return (s.replace(SPM_SPACE, " ") if spm else s).encode()
        elif not kinds or kinds <= {"Fuse"}:
            def to_bytes(s: str) -> bytes:
                return s.encode()
        else:
            raise ValueError(f"{tok.source}: its decoder ({', '.join(sorted(kinds))}) does not map each token to "
                             "a piece of text, so it cannot be aligned with another tokenizer or measured in bytes")
        table = tuple(b"" if i in special else to_bytes(s) for i, s in enumerate(strings))
        out = cls(table, _prepends_space(spec), tok.source)
        out.check(tok)
        return out

    def check(self, tok: Tokenizer, text: str = CHECK_TEXT) -> None:
        """`ValueError` unless the bytes of `text`'s tokens, concatenated, are the bytes of `text` (characters
        the tokenizer cannot encode are left out of the sample)."""
        try:
            ids = tok.encode(text)
        except ValueError:
            text = "".join(c for c in text if _encodes(tok, c))
            ids = tok.encode(text)
        got = self.join(ids, document_start=True)
        if got != text.encode():
            raise ValueError(f"{tok.source}: its tokens do not spell the text they encode ({text[:24]!r}... became "
                             f"{got[:24]!r}...), so it cannot be aligned with another tokenizer or measured in bytes")

    def join(self, ids, document_start: bool = False) -> bytes:
        """The bytes of a row of ids; `document_start` drops the prepended space of a document's first token."""
        out = b"".join(self.table[int(i)] for i in ids)
        return out[1:] if document_start and self.prefix_space and out.startswith(b" ") else out

    def lengths(self, ids, document_start: bool = False) -> list[int]:
        """Bytes per token of a row of ids (the first one less its prepended space at a document start)."""
        n = [len(self.table[int(i)]) for i in ids]
        if document_start and self.prefix_space:
            first = next((k for k, m in enumerate(n) if m), None)  # past any special token (a BOS) at the start
            if first is not None and self.table[int(ids[first])].startswith(b" "):
                n[first] -= 1
        return n


def _encodes(tok: Tokenizer, ch: str) -> bool:
    try:
        tok.encode(ch)
        return True
    except ValueError:
        return False


def utf8_chars(data: bytes) -> int:
    """Characters in UTF-8 `data`: the bytes that start one (not continuation bytes 0b10xxxxxx)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)

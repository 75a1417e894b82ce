"""Chat formats: messages -> prompt token ids, and what ends the assistant's turn.

* `llama4`: Meta's format, as in the Llama 4 Instruct tokenizer's chat template:

      <|begin_of_text|>[<|header_start|>system<|header_end|>\\n\\n{system}<|eot|>]
      <|header_start|>user<|header_end|>\\n\\n{user}<|eot|>
      <|header_start|>assistant<|header_end|>\\n\\n          <- the generation prompt

  (one line here, no newlines between turns). The system turn appears only if a system message is
  given. The turn ends at `<|eot|>`, `<|eom|>` or `<|end_of_text|>`.
* `plain`: for this project's own small models, which have no control tokens. It is the format of
  the built-in tasks, so a model trained on them answers in its own format:

      {system}\\n            (if any)
      Q: {user}\\n
      A: {assistant}\\n
      A:                     <- the generation prompt

  Every turn is one line, so the assistant's turn ends at the end of its line (or at EOS, which ends
  every training document).

Control tokens are inserted by id and message text is encoded as text, so a message that contains
"<|eot|>" cannot end a turn or forge a header. A message's content is a string, or a list of parts:
{"type": "text", "text": ...} and {"type": "tokens", "ids": [...]} (ids inserted as they are: an
image's token block, see `Runner`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from behemoth.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython", "tool")
LLAMA4_SPECIALS = ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>")
LLAMA4_STOPS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")


@dataclass(frozen=True)
class ChatFormat:
    """A chat template bound to a tokenizer: `encode(messages)` and the stop ids/strings of a turn."""

    name: str
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]

    @property
    def jinja(self) -> str:
        """The format as a Jinja chat template (`messages`, `add_generation_prompt`), for clients that format chats
        themselves (`/tokenizer_info`); it renders the text whose tokens `encode` gives."""
        if self.name == "llama4":
            return ("<|begin_of_text|>{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
                    "{{ m['content'] }}<|eot|>{% endfor %}"
                    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}")
        return ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                "{% elif m['role'] == 'assistant' %}A: {{ m['content'] | trim }}\n"
                "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")

    def encode(self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for `messages` (dicts with a "role" and a "content": a string or a list of parts, see
        the module docstring)."""
        msgs = _check(messages)
        tok = self.tokenizer
        if self.name == "llama4":
            special = {s: tok.token_to_id(s) for s in LLAMA4_SPECIALS}
            ids = [special["<|begin_of_text|>"]]
            for m in msgs:
                ids += [special["<|header_start|>"], *tok.encode(m["role"]), special["<|header_end|>"],
                        *self._encode_parts(["\n\n", *_parts(m["content"])]), special["<|eot|>"]]
            if add_generation_prompt:
                ids += [special["<|header_start|>"], *tok.encode("assistant"), special["<|header_end|>"],
                        *tok.encode("\n\n")]
            return ids
        text = ""
        for m in msgs:
            parts = _parts(m["content"])
            if any(not isinstance(x, str) for x in parts):
                raise ValueError("the plain chat format has no image tokens (images need a Llama 4 tokenizer)")
            content = "".join(parts)
            if m["role"] == "user":
                text += f"Q: {content}\n"
            elif m["role"] == "assistant":
                text += f"A: {content.strip()}\n"
            else:
                text += f"{content}\n"
        return tok.encode(text + ("A:" if add_generation_prompt else ""))

    def _encode_parts(self, parts: list[str | list[int]]) -> list[int]:
        """Adjacent text is encoded together (as one string would be); id lists go in as they are."""
        ids: list[int] = []
        text = ""
        for part in parts:
            if isinstance(part, str):
                text += part
                continue
            ids += self.tokenizer.encode(text) if text else []
            ids += part
            text = ""
        return ids + (self.tokenizer.encode(text) if text else [])


def chat_format(tokenizer: Tokenizer, name: str | None = None) -> ChatFormat:
    """The Llama 4 format when the tokenizer has its control tokens (or `name="llama4"`), else plain."""
    has_llama4 = all(tokenizer.token_to_id(s) is not None for s in LLAMA4_SPECIALS)
    name = name or ("llama4" if has_llama4 else "plain")
    if name == "llama4":
        if not has_llama4:
            missing = [s for s in LLAMA4_SPECIALS if tokenizer.token_to_id(s) is None]
            raise ValueError(f"chat format llama4: the tokenizer lacks {', '.join(missing)}")
        stops = tuple(i for s in LLAMA4_STOPS if (i := tokenizer.token_to_id(s)) is not None)
        return ChatFormat("llama4", tokenizer, stops, ())
    if name == "plain":
        return ChatFormat("plain", tokenizer, (tokenizer.eos_id,), ("\n",))
    raise ValueError(f"chat format {name!r}: expected 'llama4' or 'plain'")


def _parts(content: str | list) -> list[str | list[int]]:
    if isinstance(content, str):
        return [content]
    return [p["text"] if p["type"] == "text" else list(p["ids"]) for p in content]


def _valid_content(content: object) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, Mapping) and ((p.get("type") == "text" and isinstance(p.get("text"), str))
                                    or (p.get("type") == "tokens" and isinstance(p.get("ids"), list)))
        for p in content)


def _check(messages: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not _valid_content(m.get("content")):
            raise ValueError(f"messages[{i}]: needs a 'role' and a 'content' (a string or a list of parts)")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role={m['role']!r}: expected one of {', '.join(ROLES)}")
    if not msgs:
        raise ValueError("messages: empty")
    return msgs

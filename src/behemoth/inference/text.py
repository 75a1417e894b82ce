"""Token ids -> text, incrementally, with stop strings.

Text can be emitted only once it is final: a byte-level token may end in the middle of a UTF-8
character (decoding then ends in U+FFFD), and the tail of the text may be the start of a stop string
that the next token completes. `TextStream` holds such tails back; what it has emitted is always a
prefix of the final text.
"""

from __future__ import annotations

from behemoth.data.tokenizer import Tokenizer


class TextStream:
    """Feed token ids one at a time with `push`; each call returns the newly final text.

    After a stop string appears, `stopped` is True and the text ends just before it (the stop string
    is not part of the output); call `finish()` at the end to get any held-back remainder. `lstrip`
    drops leading whitespace (a chat answer that starts with the space after "A:").
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...] | list[str] = (), lstrip: bool = False):
        self.tokenizer, self.lstrip = tokenizer, lstrip
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.text = ""  # final text emitted so far
        self.stopped = False
        self._full = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        self._full = self.tokenizer.decode(self.ids)
        if self.lstrip:
            self._full = self._full.lstrip()
        hits = [i for s in self.stop_strings if (i := self._full.find(s)) >= 0]
        if hits:
            self.stopped = True
            return self._emit(min(hits))
        end = len(self._full.rstrip("\ufffd"))  # an incomplete UTF-8 character: wait for its other bytes
        end -= max((_overlap(self._full[:end], s) for s in self.stop_strings), default=0)
        return self._emit(max(end, len(self.text)))

    def finish(self) -> str:
        """The rest of the text once generation has ended (nothing more after a stop string)."""
        return "" if self.stopped else self._emit(len(self._full))

    def _emit(self, end: int) -> str:
        delta = self._full[len(self.text):end]
        self.text = self._full[:end]
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0

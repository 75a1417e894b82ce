"""Token ids -> text, incrementally, with stop strings.

Text can be emitted only once it is final: a byte-level token may end in the middle of a UTF-8
character (decoding then ends in U+FFFD), and the tail of the text may be the start of a stop string
that the next token completes. `TextStream` holds such tails back; what it has emitted is always a
prefix of the final text.
"""

from __future__ import annotations

from dataclasses import dataclass

from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (fp32, at temperature 1, before any top-k/top-p filtering), and
    the `top` most likely tokens at its position with theirs, most likely first (as many as were asked for)."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    """Generated text, its tokens, and why it ended: "stop" (a stop token or string) or "length". Where asked for
    (`engine.Request`): `logprob`, the summed log-probability of the sampled tokens; `token_logprobs`, one entry per
    sampled token (a stop token included, so a completion of n sampled tokens has n); `prompt_logprobs`, one per
    prompt token, the first None (nothing precedes it)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprob: float | None = None
    token_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


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


class Completer:
    """One completion in the making: the one place that decides when generation ends and what text it
    gave. Each sampled token ends it (a stop id: not part of the text; a stop string: the text ends just
    before it; the `max_new_tokens` budget) or adds text; `push` returns the text that became final and
    `reason` is set once it has ended. `generate`, `chat` and the serving engine all finish through it.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, stop_strings: tuple[str, ...] = (),
                 lstrip: bool = False):
        self.text = TextStream(tokenizer, stop_strings, lstrip)
        self.stop_ids, self.max_new_tokens = frozenset(params.stop_ids), params.max_new_tokens
        self.generated = 0  # tokens sampled, stop ids included
        self.reason: str | None = None  # "stop" or "length" once ended

    def push(self, token: int) -> str:
        self.generated += 1
        if token in self.stop_ids:
            self.reason = "stop"
            return ""
        piece = self.text.push(token)
        if self.text.stopped:
            self.reason = "stop"
        elif self.generated >= self.max_new_tokens:
            self.reason = "length"
        return piece

    def end(self, reason: str) -> None:
        """Ended outside `push` (e.g. at a stop id the generator already dropped), unless it had ended."""
        self.reason = self.reason or reason

    def finish(self) -> str:
        """The held-back rest of the text, once generation has ended."""
        return self.text.finish()

    def completion(self) -> Completion:
        return Completion(self.text.text, self.text.ids, self.reason or "length")


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0

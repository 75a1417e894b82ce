"""Final answers out of generated text, and whether one equals a reference: the verifier of teacher-written
data (`behemoth synthesize`) for prompts that come with a reference answer.

Extraction rules (`--extract`):

  marker       the text after the first "####" up to the end of its line (the built-in tasks' format, and
               GSM8K's)
  boxed        the content of the last \\boxed{...} (braces nested inside are kept; the MATH convention)
  last-number  the last integer or decimal number in the text (thousands separators allowed)
  re:PATTERN   the first match of a regular expression: its first group, or the whole match without one

Two answers are equal when their normalised forms are: surrounding whitespace, a trailing full stop and
enclosing `$` dropped; numbers compare by value ("1,000" = "1000" = "1000.0"), anything else as text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from behemoth.data.tasks import extract_answer

RULES = ("marker", "boxed", "last-number", "re:PATTERN")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def extractor(rule: str) -> Callable[[str], str | None]:
    """The extraction function of `rule` (one of `RULES`); `ValueError` naming the rule otherwise."""
    if rule == "marker":
        return extract_answer
    if rule == "boxed":
        return _last_boxed
    if rule == "last-number":
        return lambda text: (found[-1] if (found := _NUMBER.findall(text)) else None)
    if rule.startswith("re:"):
        try:
            pattern = re.compile(rule[3:])
        except re.error as e:
            raise ValueError(f"--extract {rule!r}: not a regular expression ({e})") from None
        return lambda text: (None if (m := pattern.search(text)) is None
                             else m.group(1) if pattern.groups else m.group(0))
    raise ValueError(f"--extract {rule!r}: must be one of {', '.join(RULES)}")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed


def normalise(answer: str) -> str:
    """The form two answers are compared in (module docstring)."""
    a = answer.strip().rstrip(".").strip().strip("$").strip()
    try:
        value = Decimal(a.replace(",", "")) if _NUMBER.fullmatch(a) else None
    except InvalidOperation:
        value = None
    return a if value is None else format(value.normalize(), "f")


def matches(generated: str, reference: str, rule: str | Callable[[str], str | None] = "marker") -> bool:
    """Whether the answer `rule` extracts from `generated` equals `reference` (normalised, module docstring)."""
    extract = extractor(rule) if isinstance(rule, str) else rule
    got = extract(generated)
    return got is not None and normalise(got) == normalise(reference)

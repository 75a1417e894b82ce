"""What the server refuses before any handler runs, and how it words a refusal.

`BodyGuard` (ASGI middleware) refuses a body over `MAX_BODY` bytes (413) or nested deeper than `MAX_DEPTH` (400)
before a JSON parser sees it, so that no body can exhaust the parser's stack or the server's memory; a body sent
without Content-Length is read to its end (up to `DRAIN_LIMIT`) before the 413, so that the client, still
sending, reads the answer instead of a reset connection. `validation_error` turns pydantic's report on a bad body
into one sentence naming the field.
"""

from __future__ import annotations

import itertools
import json
import re

from fastapi.exceptions import RequestValidationError

from behemoth.inference.openai_api import APIError

MAX_BODY = 32 << 20  # bytes (base64 images included)
DRAIN_LIMIT = 8 * MAX_BODY  # an oversized body sent without Content-Length is read and dropped up to this
MAX_DEPTH = 64  # nesting of JSON arrays and objects in a body

# Field descriptions for validation errors, so that a wrong value gets a sentence rather than pydantic's report.
EXPECTED = {
    "model": "a string", "prompt": "a string, a list of strings, a list of token ids or a list of lists of them",
    "temperature": "a number in [0, 2]", "top_p": "a number in (0, 1]", "top_k": "an integer >= -1",
    "max_tokens": "an integer >= 0", "max_completion_tokens": "an integer >= 0", "n": "an integer in [1, 16]",
    "seed": "a 64-bit integer", "stop": "a string or a list of up to 16 strings", "stream": "a boolean",
    "echo": "a boolean", "logprobs": "an integer in [0, 20] (a boolean for chat)",
    "top_logprobs": "an integer in [0, 20]", "ignore_eos": "a boolean", "presence_penalty": "0 (not supported)",
    "frequency_penalty": "0 (not supported)", "logit_bias": "empty (not supported)", "suffix": "null (not supported)",
    "best_of": "an integer equal to n", "messages": "a non-empty list of {role, content} messages",
    "tokens": "a list of token ids", "add_special_tokens": "a boolean",
}


def _depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text, brackets inside strings not counted (C-speed: the
    strings are cut out by a regular expression, then only brackets are kept)."""
    # an unterminated string runs to the end (the optional closing quote keeps the match linear in its length)
    strings_cut = re.sub(rb'"(?:[^"\\]|\\.)*"?', b"", raw)
    brackets = strings_cut.translate(None, delete=bytes(b for b in range(256) if b not in b"[]{}"))
    return max(itertools.accumulate(1 if b in b"[{" else -1 for b in brackets), default=0)


class BodyGuard:
    """ASGI middleware: refuses a request body over `MAX_BODY` (413, from Content-Length or while reading) or
    nested deeper than `MAX_DEPTH` (400) before any parser sees it, then hands the body on unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            status = 413 if length.isdigit() else 400
            return await _send_error(send, APIError(status, f"request body of {length.decode()} bytes is over the "
                                                            f"limit of {MAX_BODY}" if status == 413 else
                                                    "invalid Content-Length header"))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size <= MAX_BODY:
                chunks.append(message.get("body", b""))
            elif size > DRAIN_LIMIT or not message.get("more_body"):  # read to its end (up to a bound), so that
                # the client, still sending, gets the answer rather than a reset connection
                chunks.clear()
                return await _send_error(send, APIError(413, f"request body is over the limit of {MAX_BODY} bytes"))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if _depth(body) > MAX_DEPTH:
            return await _send_error(send, APIError(400, f"the body nests arrays/objects deeper than {MAX_DEPTH}"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


async def _send_error(send, e: APIError) -> None:
    data = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first complaint -> one sentence naming the field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
    if not loc:
        return APIError(400, "the body must be a JSON object" if err.get("type") in ("model_attributes_type",
                                                                                     "dict_type") else err["msg"])
    field, rest = loc[0], [x for x in loc[1:] if not _is_type_tag(x)]
    path = field + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in rest)
    if err.get("type") == "missing":
        return APIError(400, f"'{path}' is required", field)
    if field in EXPECTED and not rest:
        return APIError(400, f"'{field}' must be {EXPECTED[field]}, got {err.get('input')!r}"[:500], field)
    return APIError(400, f"'{path}': {err['msg']}"[:500], field)


def _is_type_tag(x: str) -> bool:
    """A union member's name in an error location ("str", "list[int]", "function-after[...]"), not a field."""
    return "[" in x or x in ("str", "int", "float", "bool", "list", "dict", "text", "image_url") or x.endswith("Part")

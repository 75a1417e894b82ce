"""An OpenAI-compatible HTTP server over the continuous-batching engine (standard library only).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`;
`"stream": true` answers as server-sent events (`data: {chunk}` lines, then `data: [DONE]`).

Each connection has its own thread, which validates the request, submits it to the engine and
forwards its events; all requests in flight are decoded together by the engine. A client that
disconnects (streaming or not) is noticed at the next write or within half a second while waiting,
and its request is cancelled, freeing its slot.

Errors are JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body or an
invalid value (`max_tokens` above the server's limit, a prompt longer than the context), 404 for an
unknown model or path, 413 for an oversized body. Defaults follow the OpenAI API: temperature 1,
top_p 1, `max_tokens` 16 for completions and the rest of the context (up to the limit) for chat.
Extensions (as in vLLM): `top_k`, and `ignore_eos` (generate exactly `max_tokens`, for benchmarks).
Chat messages may carry OpenAI `image_url` parts with `data:` URLs (base64); remote URLs are refused,
never fetched.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import select
import socket
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from behemoth.inference.engine import Engine, Request
from behemoth.inference.runner import Runner
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.text import Completion

MAX_BODY = 32 << 20  # bytes (base64 images included)
MAX_IMAGES = 8  # per request


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- request parsing ----------------------------------------------------------------------------------

def _get(body: dict, name: str, types: type | tuple, default=None, check=None, why: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {why or types}, got {value!r}", name)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {why or getattr(types, '__name__', types)}, got {value!r}", name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
    return tuple(stop)


class API:
    """Turns request bodies into engine requests and engine results into OpenAI responses."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int):
        self.engine, self.runner = engine, engine.runner
        self.model_name, self.max_tokens_limit = model_name, max_tokens_limit
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "behemoth"}]}

    def health(self) -> dict:
        st = self.engine.stats
        return {"status": "ok", "model": self.model_name, "active": self.engine.active,
                "waiting": self.engine.waiting.qsize(), "completed": st.completed, "cancelled": st.cancelled,
                "tokens": st.tokens, "steps": st.steps, "max_active": st.max_active}

    def _common(self, body: dict, prompt_len: int, default_max: int) -> tuple[SamplingParams, tuple[str, ...]]:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string)", "model")
        if model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server has {self.model_name!r}", "model",
                           "model_not_found")
        if _get(body, "n", int, 1) != 1:
            raise APIError(400, "'n' must be 1", "n")
        limit = self.max_tokens_limit
        max_tokens = _get(body, "max_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"'max_tokens' is {max_tokens}, above this server's limit of {limit}", "max_tokens")
        room = self.engine.max_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {self.engine.max_len}",
                           "messages" if "messages" in body else "prompt", "context_length_exceeded")
        max_tokens = max_tokens if max_tokens is not None else min(default_max, room, limit)
        if prompt_len + max_tokens > self.engine.max_len:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{self.engine.max_len} tokens", "max_tokens", "context_length_exceeded")
        number = (int, float)
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=float(_get(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")),
                top_p=float(_get(body, "top_p", number, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")),
                top_k=_get(body, "top_k", int, None, lambda v: v >= 1, "an integer >= 1"),
                seed=_get(body, "seed", int, None),
                stop_ids=() if _get(body, "ignore_eos", bool, False) else
                self.runner.chat.stop_ids if "messages" in body else (self.runner.tokenizer.eos_id,))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return params, _stops(body)

    def completion_requests(self, body: dict) -> list[Request]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            prompts = [prompt]
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt")
        ids = [self._encode(p) for p in prompts]
        reqs = []
        for p in ids:
            params, stops = self._common(body, len(p), 16)
            reqs.append(Request(p, params, stops))
        return reqs

    def chat_request(self, body: dict) -> Request:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        flat, pixels = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", "messages")
            content = m.get("content")
            if isinstance(content, list):
                content = [self._part(c, f"messages[{i}].content[{j}]", pixels) for j, c in enumerate(content)]
            flat.append({"role": m.get("role"), "content": content})
        try:
            ids = self.runner.encode_chat(flat)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        params, stops = self._common(body, len(ids), self.max_tokens_limit)
        return Request(ids, params, stops + self.runner.chat.stop_strings, lstrip=True,
                       pixel_values=torch.cat(pixels) if pixels else None)

    def _part(self, part: object, where: str, pixels: list[torch.Tensor]) -> dict:
        """One OpenAI content part -> a chat part: text as is; an image (a `data:` URL, base64) as its
        token block, its tiles appended to `pixels`. Remote URLs are never fetched."""
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            return {"type": "text", "text": part["text"]}
        if not (isinstance(part, dict) and part.get("type") == "image_url"):
            raise APIError(400, f"{where}: expected a 'text' or 'image_url' part", "messages")
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise APIError(400, f"{where}: image_url needs a 'url'", "messages")
        if len(pixels) == MAX_IMAGES:  # refused before decoding any more
            raise APIError(400, f"more than {MAX_IMAGES} images: at most {MAX_IMAGES} per request", "messages")
        if not url.startswith("data:"):
            raise APIError(400, f"{where}: remote image URLs are not fetched; send the image inline as a "
                                "data: URL (base64)", "messages")
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{where}: the data: URL must be base64 (data:image/...;base64,...)", "messages")
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise APIError(400, f"{where}: invalid base64 ({e})", "messages") from None
        try:
            block, tiles = self.runner.image(raw, where)
        except ValueError as e:  # no vision tower, no image tokens, or not a readable image
            raise APIError(400, str(e), "messages") from None
        pixels.append(tiles)
        return {"type": "tokens", "ids": block}

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            vocab = self.runner.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"'prompt' token ids must be in [0, {vocab})", "prompt")
            return list(prompt)
        try:
            return self.runner.encode_prompt(prompt)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None

    def submit(self, req: Request) -> Request:
        try:
            return self.engine.submit(req)
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None


def _events(req: Request, client_gone=lambda: False, timeout: float = 600.0) -> Iterator[tuple[str, object]]:
    """A request's events. Twice a second it checks whether the client has left (then the request is
    cancelled and `ConnectionResetError` raised) and whether `timeout` has passed (then a 503)."""
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 0.5
    while True:
        try:
            kind, value = req.events.get(timeout=0.5)
        except queue.Empty:
            kind, value = None, None
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.5
            if client_gone():
                req.cancel()
                raise ConnectionResetError("the client closed the connection")
            if now > deadline:
                req.cancel()
                raise APIError(503, "generation timed out")
        if kind is None:
            continue
        if kind == "error":
            raise APIError(500, f"generation failed: {value}")
        yield kind, value
        if kind == "done":
            return


def _usage(req: Request, done: Completion) -> dict:
    n = len(req.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": len(done.token_ids), "total_tokens": n + len(done.token_ids)}


# ---- HTTP -------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "behemoth"
    api: API  # set on the subclass made by `make_server`
    quiet = False

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # a client closed its keep-alive connection: nothing to answer
            pass

    def log_message(self, fmt: str, *args) -> None:
        if not self.quiet:
            super().log_message(fmt, *args)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        routes = {"/health": self.api.health, "/v1/models": self.api.models}
        path = self.path.rstrip("/")
        self._handle(lambda: self._json(200, routes[path]()) if path in routes else self._not_found())

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.rstrip("/")
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        self._handle(lambda: routes[path](self._body()) if path in routes else self._not_found())

    def _not_found(self) -> None:
        raise APIError(404, f"no route {self.command} {self.path}")

    def _handle(self, fn) -> None:
        try:
            fn()
        except APIError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
        if n > MAX_BODY:
            self.close_connection = True
            raise APIError(413, f"request body of {n} bytes is over the limit of {MAX_BODY}")
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ---- the two generation endpoints -------------------------------------------------------------

    def _completions(self, body: dict) -> None:
        reqs = [self.api.submit(r) for r in self.api.completion_requests(body)]
        try:
            self._answer_completions(body, reqs)
        except ConnectionError:
            for r in reqs:  # the client left: the other prompts of its request stop too
                r.cancel()
            raise

    def _answer_completions(self, body: dict, reqs: list[Request]) -> None:
        rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.api.model_name

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if body.get("stream"):
            return self._stream(reqs, lambda i, kind, v: chunk(i, v if kind == "text" else "",
                                                                 v.finish_reason if kind == "done" else None))
        results = [self._collect(r) for r in reqs]
        usage = [_usage(r, d) for r, d in zip(reqs, results, strict=True)]
        total = {k: sum(u[k] for u in usage) for k in usage[0]}
        resp = chunk(0, "", None)
        resp["choices"] = [{"index": i, "text": d.text, "logprobs": None, "finish_reason": d.finish_reason}
                           for i, d in enumerate(results)]
        resp["usage"] = total
        self._json(200, resp)

    def _chat(self, body: dict) -> None:
        req = self.api.submit(self.api.chat_request(body))
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.api.model_name
        if body.get("stream"):
            def chunk(i: int, kind: str, v) -> dict:
                delta = {"content": v} if kind == "text" else {}
                if kind == "start":
                    delta = {"role": "assistant", "content": ""}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": v.finish_reason if kind == "done" else None}]}
            return self._stream([req], chunk, start=True)
        done = self._collect(req)
        self._json(200, {"id": rid, "object": "chat.completion", "created": created, "model": model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                      "logprobs": None, "finish_reason": done.finish_reason}],
                         "usage": _usage(req, done)})

    def _client_gone(self) -> bool:
        """True once the client has closed its side (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _collect(self, req: Request) -> Completion:
        for kind, value in _events(req, self._client_gone):
            if kind == "done":
                return value
        raise AssertionError("unreachable")

    def _stream(self, reqs: list[Request], chunk, start: bool = False) -> None:
        """Server-sent events, chunked transfer encoding; cancels every request if the client leaves."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if start:
                self._sse(chunk(0, "start", None))
            for i, req in enumerate(reqs):
                for kind, value in _events(req, self._client_gone):
                    self._sse(chunk(i, kind, value))
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
        except APIError as e:
            self._sse(e.body())
            self._write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError, OSError):
            for r in reqs:
                r.cancel()
            self.close_connection = True

    def _sse(self, obj: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def make_server(runner: Runner, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                max_tokens_limit: int = 1024, model_name: str | None = None, quiet: bool = False,
                max_len: int | None = None, compile: bool = False) -> tuple[ThreadingHTTPServer, Engine]:
    """A ready server (call `serve_forever`) and its engine; port 0 picks a free port."""
    engine = Engine(runner, max_batch=max_batch, max_len=max_len, compile=compile)
    api = API(engine, model_name or runner.name, max_tokens_limit)
    handler = type("BoundHandler", (Handler,), {"api": api, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server, engine

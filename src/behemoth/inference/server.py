"""An OpenAI-compatible HTTP server over the continuous-batching engine: a FastAPI (ASGI) app on uvicorn.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `POST /tokenize`,
`POST /detokenize`, `GET /tokenizer_info`, and `GET /openapi.json` (the schema of all of them, from the typed
bodies in `openai_schema.py`). `"stream": true` answers as server-sent events (`data: {chunk}` lines, then
`data: [DONE]`). What each field means is in `openai_api.py`.

Handlers run on the event loop and never touch the model: they submit requests to the engine, whose thread
decodes all requests in flight together, and wait for the events it queues (it wakes the loop through
`Request.on_event`). A client that disconnects, streaming or not, is noticed within half a second and its
requests are cancelled, freeing their slots.

Errors are JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for a malformed body (invalid JSON,
nested deeper than `MAX_DEPTH`, a wrong type or value, a prompt longer than the context), 404 for an unknown
model or path, 405 for a wrong method, 413 for a body over `MAX_BODY`. Both guards run before the body is
parsed, so no body can exhaust the parser. Chat messages may carry `image_url` parts with `data:` URLs (base64);
remote URLs are refused, never fetched.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from behemoth.inference.engine import Engine, Request
from behemoth.inference.http_guards import BodyGuard, validation_error
from behemoth.inference.openai_api import API, APIError
from behemoth.inference.openai_schema import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    Health,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from behemoth.inference.runner import Runner
from behemoth.inference.text import Completion

POLL_S = 0.5  # how often a waiting handler checks that its client is still there
TIMEOUT_S = 600.0  # a request still unfinished after this is cancelled (503)


# ---- the app --------------------------------------------------------------------------------------------------

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413)}
# `"stream": true` answers with server-sent events: `data: {chunk}` lines (the JSON of a chunk, or of an error), then
# `data: [DONE]`; the events' schema is not published
STREAMED = {200: {"content": {"text/event-stream": {"schema": {
    "description": "server-sent events: a JSON chunk per event, then [DONE]"}}}}} | ERRORS


def make_app(api: API) -> BodyGuard:
    """The ASGI app: the FastAPI app (`.app`, whose `openapi()` is the published schema) behind `BodyGuard`."""
    app = FastAPI(title="behemoth", version="1", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible completions and chat, with vLLM's tokenizer endpoints.")

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = validation_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ConnectionResetError)
    async def _client_left(_, e: ConnectionResetError):  # its requests are cancelled; nobody reads the answer
        return Response(status_code=499)  # nginx's "client closed request", for the access log

    @app.exception_handler(HTTPException)
    async def _http(request: HTTPRequest, e: HTTPException):
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.get("/health", response_model=Health)
    async def health():
        return api.health()

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return api.models()

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info():
        return api.tokenizer_info()

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest):
        return api.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest):
        return api.detokenize(body)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED)
    async def completions(body: CompletionRequest, http: HTTPRequest):
        return await _completions(api, body, http)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
    async def chat(body: ChatCompletionRequest, http: HTTPRequest):
        return await _chat(api, body, http)

    return BodyGuard(app)


# ---- waiting for the engine -------------------------------------------------------------------------------------

class _Waiter:
    """The events of some engine requests, awaited on the event loop: the engine thread wakes it per event."""

    def __init__(self, reqs: list[Request], every_event: bool):
        """`every_event` False: woken only when a request ends (a whole answer needs nothing in between)."""
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.reqs = reqs
        for r in reqs:
            r.on_event = self._wake if every_event else self._wake_at_end

    def _wake(self, kind: str) -> None:
        self.loop.call_soon_threadsafe(self.wake.set)

    def _wake_at_end(self, kind: str) -> None:
        if kind != "text":
            self.loop.call_soon_threadsafe(self.wake.set)

    async def events(self, req: Request, http: HTTPRequest) -> AsyncIterator[tuple[str, object]]:
        """One request's events until "done"; cancels every request of the call if the client leaves (then
        raises `ConnectionResetError`) or the timeout passes (503)."""
        deadline = time.monotonic() + TIMEOUT_S
        next_check = time.monotonic() + POLL_S
        while True:
            now = time.monotonic()
            if now >= next_check:  # checked on a clock, not only when idle: a busy request gets events all along
                next_check = now + POLL_S
                if await http.is_disconnected():
                    self.cancel()
                    raise ConnectionResetError("the client closed the connection")
                if now > deadline:
                    self.cancel()
                    raise APIError(503, "generation timed out")
            self.wake.clear()
            try:
                kind, value = req.events.get_nowait()
            except queue.Empty:
                try:
                    await asyncio.wait_for(self.wake.wait(), POLL_S)
                except asyncio.TimeoutError:
                    pass
                continue
            if kind == "error":
                raise APIError(500, f"generation failed: {value}")
            yield kind, value
            if kind == "done":
                return

    async def result(self, req: Request, http: HTTPRequest) -> Completion:
        async for kind, value in self.events(req, http):
            if kind == "done":
                return value
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancel()


def _submit(api: API, reqs: list[Request], stream: bool) -> _Waiter:
    waiter = _Waiter(reqs, every_event=stream)
    try:
        for r in reqs:
            api.submit(r)
    except APIError:
        waiter.cancel()
        raise
    return waiter


async def _collect(waiter: _Waiter, reqs: list[Request], http: HTTPRequest) -> list[Completion]:
    try:
        return [await waiter.result(r, http) for r in reqs]
    except (ConnectionResetError, asyncio.CancelledError):
        waiter.cancel()
        raise


def _sse(obj: BaseModel | dict) -> bytes:
    data = obj.model_dump_json().encode() if isinstance(obj, BaseModel) else json.dumps(obj).encode()
    return b"data: " + data + b"\n\n"


def _stream(waiter: _Waiter, produce, http: HTTPRequest) -> StreamingResponse:
    """Server-sent events from the async generator `produce()`; every request is cancelled if the client leaves."""

    async def body():
        try:
            async for chunk in produce():
                yield _sse(chunk)
            yield b"data: [DONE]\n\n"
        except APIError as e:
            yield _sse(e.body())
        except (ConnectionResetError, asyncio.CancelledError):
            waiter.cancel()
            raise
        finally:
            waiter.cancel()  # a no-op for finished requests

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- the two generation endpoints ---------------------------------------------------------------------------------

async def _completions(api: API, body: CompletionRequest, http: HTTPRequest):
    ids, texts, reqs = api.completion_requests(body)
    waiter = _submit(api, reqs, body.stream)
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.n
    as_id = body.return_tokens_as_token_ids

    def prompt_of(i: int) -> tuple[list[int], str]:
        return ids[i // n], texts[i // n]

    if not body.stream:
        results = await _collect(waiter, reqs, http)
        choices = []
        for i, (req, done) in enumerate(zip(reqs, results, strict=True)):
            _, text = prompt_of(i)
            choices.append(CompletionChoice(index=i, text=(text if body.echo else "") + done.text,
                                            logprobs=api.completion_choice_logprobs(req, done, text, body.echo,
                                                                                    as_id),
                                            finish_reason=done.finish_reason))
        return CompletionResponse(id=rid, created=created, model=api.model_name, choices=choices,
                                  usage=api.usage(ids, results))

    def chunk(i: int, text: str, logprobs=None, finish: str | None = None) -> CompletionResponse:
        return CompletionResponse(id=rid, created=created, model=api.model_name, choices=[
            CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish)])

    async def produce():
        results = []
        for i, req in enumerate(reqs):
            prompt_ids, prompt_text = prompt_of(i)
            # the sampled tokens listed so far (the engine may have sampled ahead of the text sent: a token's
            # offset is where its text starts in the final text, after the text of the tokens before it)
            base, listed, echoed = len(prompt_text) if body.echo else 0, [], not body.echo
            async for kind, value in waiter.events(req, http):
                if not echoed:
                    echoed = True
                    lp = None if req.top_logprobs is None else api.completion_logprobs(
                        req.prompt_scores or [None] * len(prompt_ids), prompt_ids, 0, as_id)
                    yield chunk(i, prompt_text, lp)
                text = value if kind == "text" else ""
                lp = None
                if req.top_logprobs is not None:
                    new = req.sampled[len(listed):] if kind == "text" else \
                        (value.token_logprobs or [])[len(listed):]
                    start = base + len(api.tokenizer.decode(listed))
                    listed += [e.id for e in new]
                    lp = api.completion_logprobs(new, [e.id for e in new], start, as_id) if new else None
                if kind == "done":
                    results.append(value)
                    yield chunk(i, "", lp, value.finish_reason)
                elif text or lp is not None:
                    yield chunk(i, text, lp)
        if body.stream_options and body.stream_options.include_usage:
            usage = api.usage(ids, results)
            yield CompletionResponse(id=rid, created=created, model=api.model_name, choices=[], usage=usage)

    return _stream(waiter, produce, http)


async def _chat(api: API, body: ChatCompletionRequest, http: HTTPRequest):
    images = [0]  # images so far in this request
    reqs = api.chat_requests(body, lambda m, i: api.content(m, i, images))
    waiter = _submit(api, reqs, body.stream)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        results = await _collect(waiter, reqs, http)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=d.text),
                              logprobs=api.chat_choice_logprobs(r, d, body.return_tokens_as_token_ids),
                              finish_reason=d.finish_reason)
                   for i, (r, d) in enumerate(zip(reqs, results, strict=True))]
        return ChatCompletionResponse(id=rid, created=created, model=api.model_name, choices=choices,
                                      usage=api.usage([reqs[0].prompt_ids], results))

    def chunk(i: int, delta: dict, logprobs=None, finish: str | None = None, usage=None) -> dict:
        choices = [] if i < 0 else [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": api.model_name,
               "choices": choices}
        return out | ({"usage": usage} if usage is not None else {})

    async def produce():
        results = []
        for i, req in enumerate(reqs):
            yield chunk(i, {"role": "assistant", "content": ""})
            seen, stop_ids = 0, set(req.params.stop_ids)
            async for kind, value in waiter.events(req, http):
                lp = None
                if req.top_logprobs is not None:  # the answer's tokens: what was sampled, less the stop token
                    new = [e for e in req.sampled[seen:] if e.id not in stop_ids] if kind == "text" else \
                        (value.token_logprobs or [])[seen:len(value.token_ids)]
                    seen += len(new)
                    lp = api.chat_logprobs(new, body.return_tokens_as_token_ids).model_dump() if new else None
                if kind == "text":
                    yield chunk(i, {"content": value}, lp)
                else:
                    results.append(value)
                    yield chunk(i, {}, lp, value.finish_reason)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk(-1, {}, usage=api.usage([reqs[0].prompt_ids], results).model_dump())

    return _stream(waiter, produce, http)


# ---- the server ------------------------------------------------------------------------------------------------

class Server:
    """uvicorn serving the app on a socket bound at construction (port 0 picks a free one): `server_address`,
    `serve_forever()` (blocks; on the main thread Ctrl-C and SIGTERM stop it), `shutdown()` from another thread,
    `server_close()`."""

    def __init__(self, app, api: API, host: str, port: int, quiet: bool):
        import uvicorn

        self.api = api
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (accepted ones
        # inherit it), and without it each keep-alive answer written in two parts waits 40 ms for a delayed ACK
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)
        self.server_address = self.socket.getsockname()
        config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                                timeout_keep_alive=30, lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            self._uvicorn.install_signal_handlers = lambda: None  # older uvicorn; newer ones check the thread
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._done.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()


def make_server(runner: Runner, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                max_tokens_limit: int = 1024, model_name: str | None = None, quiet: bool = False,
                max_len: int | None = None, compile: bool = False,
                prefill_chunk: int | None = None, prefix_cache_bytes: int = 1 << 30,
                draft: torch.nn.Module | None = None, draft_k: int = 4) -> tuple[Server, Engine]:
    """A ready server (call `serve_forever`) and its engine; port 0 picks a free port. `prefill_chunk`: prompts
    longer than this are prefilled in chunks between decode steps; `prefix_cache_bytes`: the budget of the prefix
    cache (default 1 GiB, as `serve`; 0: none); `draft`: decode speculatively with it, `draft_k` proposals a step
    (`Engine`)."""
    engine = Engine(runner, max_batch=max_batch, max_len=max_len, compile=compile, prefill_chunk=prefill_chunk,
                    prefix_cache_bytes=prefix_cache_bytes, draft=draft, draft_k=draft_k)
    api = API(engine, model_name or runner.name, max_tokens_limit)
    return Server(make_app(api), api, host, port, quiet), engine

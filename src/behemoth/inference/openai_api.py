"""The OpenAI API's meaning, apart from HTTP: validated request bodies -> engine requests, finished or running
requests -> response bodies (with log-probabilities in the completions and chat formats), and the tokenizer
endpoints. `server.py` carries these over HTTP.

Semantics follow the OpenAI API, and vLLM's where OpenAI's leave off (token-id prompts, `echo` with
`max_tokens` 0 to score a text, `top_k`, `ignore_eos`, the tokenizer endpoints):

* a completion choice with `logprobs` k lists every token it sampled, a stop token included (its text is empty),
  with k alternatives; with `echo` the prompt's tokens come first, the first one's log-probability null. Choices
  are ordered prompt by prompt, `n` per prompt; the i-th sample of a seeded request uses seed + i.
* log-probabilities are the model's own (fp32 log-softmax at temperature 1, before top-k/top-p), so they equal a
  full forward pass over the same tokens within fp32 rounding.
* a token's text is its decoded text; a token that decodes to nothing printable on its own (a special token, part
  of a UTF-8 character) is shown by its vocabulary name. Two alternatives with the same text keep the likelier.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import time
from dataclasses import replace

import tokenizers
import torch

from behemoth.data.token_bytes import TokenBytes
from behemoth.data.tokenizer import Tokenizer
from behemoth.inference.engine import Engine, Request
from behemoth.inference.openai_schema import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Health,
    Model,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenLogprobInfo,
    TopLogprob,
    Usage,
)
from behemoth.inference.sampling import SamplingParams
from behemoth.inference.text import Completion, TokenLogprob

MAX_IMAGES = 8  # per request


class APIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class API:
    """Turns request bodies into engine requests and engine results into OpenAI responses."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int):
        self.engine, self.runner = engine, engine.runner
        self.tokenizer: Tokenizer = engine.runner.tokenizer
        self.model_name, self.max_tokens_limit = model_name, max_tokens_limit
        self.created = int(time.time())
        # `/tokenize` reads special-token strings in a text as the special tokens (as vLLM's does, so a client can
        # find the BOS/EOS ids from their names); prompts sent for generation keep them as plain text.
        self._tokenize_hf = tokenizers.Tokenizer.from_str(self.tokenizer.hf.to_str())
        self._tokenize_hf.encode_special_tokens = False
        self._piece_cache: dict[int, str] = {}

    # ---- the simple endpoints -------------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[Model(id=self.model_name, created=self.created, owned_by="behemoth",
                                     max_model_len=self.engine.max_len)])

    def health(self) -> Health:
        st = self.engine.stats
        return Health(status="ok", model=self.model_name, active=self.engine.active,
                      waiting=self.engine.waiting.qsize(), completed=st.completed, cancelled=st.cancelled,
                      tokens=st.tokens, steps=st.steps, max_active=st.max_active)

    def tokenizer_info(self) -> TokenizerInfo:
        tok = self.tokenizer

        def name(i: int) -> str | None:
            return tok.hf.id_to_token(i)

        return TokenizerInfo(tokenizer_class="tokenizers.Tokenizer", vocab_size=tok.vocab_size,
                             model_max_length=self.engine.max_len, bos_token=name(tok.bos_id),
                             eos_token=name(tok.eos_id), pad_token=name(tok.pad_id), add_bos_token=tok.add_bos,
                             chat_template=self.runner.chat.jinja, fingerprint=tok.fingerprint)

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self._check_model(body.model)
        if body.messages is not None:
            ids = self._encode_chat([m.model_dump() for m in body.messages])
        else:
            try:
                ids = self._tokenize_hf.encode(body.prompt, add_special_tokens=body.add_special_tokens).ids
            except Exception as e:  # the Rust library's error (e.g. a character a fixed vocabulary lacks)
                raise APIError(400, str(self.tokenizer._encode_error(body.prompt, e)), "prompt") from None
            if body.add_special_tokens and self.tokenizer.add_bos and ids[:1] != [self.tokenizer.bos_id]:
                ids = [self.tokenizer.bos_id, *ids]
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_len, tokens=ids,
                                token_strs=[self.piece(i) for i in ids])

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model)
        self._check_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    # ---- requests -----------------------------------------------------------------------------------------

    def completion_requests(self, body: CompletionRequest) -> tuple[list[list[int]], list[str], list[Request]]:
        """The prompts' ids and texts, and `n` engine requests per prompt (in choice order)."""
        self._check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "'best_of' must equal 'n' (best-of sampling is not supported)", "best_of")
        prompt = body.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        ids = [self._encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        k = body.logprobs
        reqs = []
        for p in ids:
            params = self._params(body, len(p), 16, body.max_tokens, chat=False)
            for j in range(body.n):
                reqs.append(Request(p, _seeded(params, j), self._stops(body), top_logprobs=k,
                                    prompt_logprobs=body.echo and k is not None))
        return ids, texts, reqs

    def chat_requests(self, body: ChatCompletionRequest, parts) -> list[Request]:
        """`n` engine requests for a chat body; `parts(message, index)` turns a message's content into chat parts
        and image tiles (`content`, with a count of the request's images)."""
        self._check_model(body.model)
        flat, pixels = [], []
        for i, m in enumerate(body.messages):
            content, tiles = parts(m, i)
            flat.append({"role": m.role, "content": content})
            pixels += tiles
        ids = self._encode_chat(flat)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens == 0:
            raise APIError(400, "'max_tokens' must be >= 1 for chat", "max_tokens")
        params = self._params(body, len(ids), self.max_tokens_limit, max_tokens, chat=True)
        k = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        tiles = torch.cat(pixels) if pixels else None
        return [Request(ids, _seeded(params, j), self._stops(body) + self.runner.chat.stop_strings, lstrip=True,
                        pixel_values=tiles, top_logprobs=k) for j in range(body.n)]

    def content(self, m: ChatMessage, i: int, images: list[int]) -> tuple[str | list[dict], list[torch.Tensor]]:
        """A message's content as chat parts, and the tiles of its images (`data:` URLs, base64); `images[0]` counts
        the request's images so far, at most `MAX_IMAGES`."""
        if m.content is None or isinstance(m.content, str):
            return m.content or "", []
        parts, tiles = [], []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            if images[0] == MAX_IMAGES:  # refused before decoding any more
                raise APIError(400, f"more than {MAX_IMAGES} images: at most {MAX_IMAGES} per request", "messages")
            images[0] += 1
            if not url.startswith("data:"):
                raise APIError(400, f"{where}: remote image URLs are not fetched; send the image inline as a data: URL "
                                    "(base64)", "messages")
            header, _, data = url.partition(",")
            if not header.endswith(";base64"):
                raise APIError(400, f"{where}: the data: URL must be base64 (data:image/...;base64,...)", "messages")
            try:
                raw = base64.b64decode(data, validate=True)
            except binascii.Error as e:
                raise APIError(400, f"{where}: invalid base64 ({e})", "messages") from None
            try:
                block, image_tiles = self.runner.image(raw, where)
            except ValueError as e:  # no vision tower, no image tokens, or not a readable image
                raise APIError(400, str(e), "messages") from None
            parts.append({"type": "tokens", "ids": block})
            tiles.append(image_tiles)
        return parts, tiles

    def submit(self, req: Request) -> Request:
        try:
            return self.engine.submit(req)
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server has {self.model_name!r}", "model",
                           "model_not_found")

    def _params(self, body, prompt_len: int, default_max: int, max_tokens: int | None, chat: bool) -> SamplingParams:
        limit = self.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"'max_tokens' is {max_tokens}, above this server's limit of {limit}", "max_tokens")
        room = self.engine.max_len - prompt_len
        if room < (0 if max_tokens == 0 else 1):
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context is {self.engine.max_len}",
                           "messages" if chat else "prompt", "context_length_exceeded")
        max_tokens = max_tokens if max_tokens is not None else min(default_max, room, limit)
        if prompt_len + max_tokens > self.engine.max_len:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{self.engine.max_len} tokens", "max_tokens", "context_length_exceeded")
        stop_ids = () if body.ignore_eos else self.runner.chat.stop_ids if chat else (self.tokenizer.eos_id,)
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p,
                              top_k=body.top_k if body.top_k not in (None, -1, 0) else None, seed=body.seed,
                              stop_ids=stop_ids)

    @staticmethod
    def _stops(body) -> tuple[str, ...]:
        stop = body.stop
        return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            self._check_ids(prompt, "prompt")
            return list(prompt)
        try:
            return self.runner.encode_prompt(prompt)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None

    def _encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            return self.runner.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.runner.model.config.vocab_size
        if not all(0 <= t < vocab for t in ids):
            raise APIError(400, f"'{param}' token ids must be in [0, {vocab})", param)

    # ---- responses ----------------------------------------------------------------------------------------

    def piece(self, token: int, as_id: bool = False) -> str:
        """A token's text for log-probability listings (see the module docstring); `as_id`: 'token_id:{id}'."""
        if as_id:
            return f"token_id:{token}"
        text = self._piece_cache.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            if not text or "\ufffd" in text:
                text = self.tokenizer.hf.id_to_token(token) or text
            self._piece_cache[token] = text
        return text

    def _top(self, top: list[tuple[int, float]], as_id: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, lp in top:  # most likely first: a later token with the same text is the less likely
            out.setdefault(self.piece(t, as_id), lp)
        return out

    def completion_logprobs(self, entries: list[TokenLogprob | None], ids: list[int], start: int,
                            as_id: bool = False) -> CompletionLogprobs:
        """Log-probabilities of the tokens `ids` (one `entries` item each, None for a prompt's first token);
        `start`: the offset in the choice's text where the text of `ids` begins."""
        offsets = self.offsets(ids, start)
        tops = []
        for e in entries:  # the token itself is always listed among its alternatives (k + 1 where it is not in the k)
            top = None if e is None else self._top(e.top, as_id)
            if top is not None:
                top.setdefault(self.piece(e.id, as_id), e.logprob)
            tops.append(top)
        return CompletionLogprobs(
            tokens=[self.piece(t, as_id) for t in ids],
            token_logprobs=[None if e is None else e.logprob for e in entries],
            top_logprobs=tops, text_offset=offsets)

    def offsets(self, ids: list[int], start: int) -> list[int]:
        """The character offset where each token's text begins, counting from `start`: the characters completed by
        the bytes of the tokens before it (`data.token_bytes`), fed to an incremental UTF-8 decoder (linear in the
        tokens). A tokenizer whose tokens do not spell bytes one by one falls back to decoding each prefix."""
        table = self._byte_table()
        if table is None:
            return [start + len(self.tokenizer.decode(ids[:i])) for i in range(len(ids))]
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out, at = [], start
        for t in ids:
            out.append(at)
            at += len(decoder.decode(table[t] if t < len(table) else b""))
        return out

    def token_bytes(self, token: int) -> list[int]:
        """The UTF-8 bytes a token adds to the text (part of a character for some byte-level tokens)."""
        table = self._byte_table()
        if table is None or token >= len(table):
            return list(self.piece(token).encode("utf-8"))
        return list(table[token])

    def _byte_table(self) -> list[bytes] | None:
        if not hasattr(self, "_table"):
            try:
                self._table = TokenBytes.of(self.tokenizer).table
            except ValueError:  # a tokenizer whose tokens do not spell text one by one (WordPiece)
                self._table = None
        return self._table

    def completion_choice_logprobs(self, req: Request, done: Completion, prompt_text: str, echo: bool,
                                   as_id: bool = False) -> CompletionLogprobs | None:
        if req.top_logprobs is None:
            return None
        sampled = done.token_logprobs or []
        ids = [e.id for e in sampled]
        gen = self.completion_logprobs(sampled, ids, len(prompt_text) if echo else 0, as_id)
        if not echo:
            return gen
        prompt = self.completion_logprobs(done.prompt_logprobs or [None] * len(req.prompt_ids), req.prompt_ids, 0,
                                          as_id)
        return CompletionLogprobs(tokens=prompt.tokens + gen.tokens,
                                  token_logprobs=prompt.token_logprobs + gen.token_logprobs,
                                  top_logprobs=prompt.top_logprobs + gen.top_logprobs,
                                  text_offset=prompt.text_offset + gen.text_offset)

    def chat_logprobs(self, entries: list[TokenLogprob], as_id: bool = False) -> ChatLogprobs:
        def info(t: int, lp: float) -> TopLogprob:
            return TopLogprob(token=self.piece(t, as_id), logprob=lp, bytes=self.token_bytes(t))

        return ChatLogprobs(content=[TokenLogprobInfo(**info(e.id, e.logprob).model_dump(),
                                                      top_logprobs=[info(t, lp) for t, lp in e.top])
                                     for e in entries])

    def chat_choice_logprobs(self, req: Request, done: Completion, as_id: bool = False) -> ChatLogprobs | None:
        if req.top_logprobs is None:
            return None
        return self.chat_logprobs((done.token_logprobs or [])[:len(done.token_ids)], as_id)  # the answer's tokens

    @staticmethod
    def usage(prompts: list[list[int]], results: list[Completion]) -> Usage:
        n_prompt = sum(len(p) for p in prompts)
        n_gen = sum(len(d.token_ids) for d in results)
        return Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen)


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th sample's parameters: a seeded request's i-th sample uses seed + i."""
    if i == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + i)

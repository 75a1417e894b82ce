"""The OpenAI API's request and response bodies, as typed models (pydantic): what the server accepts, what it
answers, and what `/openapi.json` publishes.

Requests are validated strictly (a string is not a number, `true` is not 1) and unknown fields are ignored, as
OpenAI's and vLLM's servers do. Fields the server reads but does not implement are declared so that a value it
cannot honour is refused with a 400 naming the field, never silently ignored. Extensions from vLLM: `top_k`,
`ignore_eos`, and the tokenizer endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`), which let evaluation
clients such as lm-evaluation-harness count tokens with the server's own tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20  # alternatives per token (vLLM's default limit; OpenAI's is 5 for completions, 20 for chat)
MAX_N = 16  # samples per prompt
MAX_STOPS = 16  # stop strings per request


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---- requests ---------------------------------------------------------------------------------------------

class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """What completions and chat completions share. `None` means the default (OpenAI's: temperature 1, top_p 1)."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 or 0 keeps every token")
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_N, description="a 64-bit integer")
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: generate exactly max_tokens")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM extension: log-probability listings name "
                                                                "tokens as 'token_id:{id}'")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="not supported: 0 only")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="not supported: 0 only")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="not supported")
    user: str | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, a list of token ids, or a list of lists of token ids")
    echo: bool = Field(False, description="return the prompt before the completion (its tokens' log-probabilities "
                                          "too, with `logprobs`); with max_tokens 0 this scores a text")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="per token: its log-probability and this many most likely alternatives")
    best_of: int | None = Field(None, ge=1, description="only equal to n")
    suffix: None = Field(None, description="not supported")

    @model_validator(mode="after")
    def _non_empty(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise ValueError("'prompt' must not be empty")
        return self


class ImageURL(_Body):
    url: str = Field(description="a data: URL (base64); remote URLs are not fetched")
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, description="the newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Body):
    """vLLM's: a text (or chat messages, formatted with the chat template) to token ids."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="what the tokenizer adds to a prompt (e.g. BOS)")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- responses --------------------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The completions API's (legacy) format: per token, its text, log-probability (null for the first prompt
    token), its most likely alternatives by text, and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobInfo] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Health(BaseModel):
    status: str
    model: str
    active: int
    waiting: int
    completed: int
    cancelled: int
    tokens: int
    steps: int
    max_active: int


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a client needs to tokenize as the server does (vLLM's `/tokenizer_info` fields)."""

    tokenizer_class: str
    vocab_size: int
    model_max_length: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None = None
    fingerprint: str

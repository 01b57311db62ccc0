"""Request bodies of the OpenAI-compatible API and the builders of its response objects."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

from server.sampler import TokenLogprob
from server.tokenizer import TextOffsets, TextTokenizer, TokenBytes

MAX_N = 16
MAX_LOGPROBS = 20
INT64 = (-(2**63), 2**63 - 1)  # the seed's range, as OpenAI's; choice j of n samples with seed + j


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = None
    # StrictFloat: a number (an int too), never a string such as "0.5"
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=-1)
    min_p: StrictFloat = Field(default=0.0, ge=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: StrictFloat = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: StrictBool = False
    # not implemented: accepted empty, refused otherwise (routes._refuse_unsupported), since a
    # client that biases tokens (or bans them with -100) must not get unbiased text silently
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


MAX_PROMPTS = 2048  # prompts in one completions request, as OpenAI allows


PromptShape = str | list[str] | list[int] | list[list[int]]  # what the schema shows; _prompt_shape checks it


def _prompt_shape(value: Any) -> PromptShape:
    """A completions prompt: a string, or a list of strings, of token ids, or of token-id lists.

    Checked in one pass rather than as a pydantic union: the union tried every member against
    every element, and 2.5 MB of one-token lists took 2.5-4.8 s of validation that held the
    event loop (every other stream stalled that long)."""

    def token_ids(items: Any) -> bool:
        return isinstance(items, list) and all(type(t) is int for t in items)

    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if token_ids(value):
        return value
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
    if all(isinstance(p, str) for p in value) or all(token_ids(p) for p in value):
        return value
    raise ValueError("a list prompt must hold only strings, only token ids, or only lists of token ids")


class CompletionRequest(_Request):
    prompt: Annotated[PromptShape, PlainValidator(_prompt_shape, json_schema_input_type=PromptShape)]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # OpenAI fields this server does not implement: accepted at their defaults, refused otherwise
    # (routes.unsupported_completion_fields) rather than silently ignored
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _null_is_default(cls, value: object) -> object:
        """``"max_tokens": null`` means the default (16), as in OpenAI's completions API."""
        return 16 if value is None else value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    """A chat message; ``developer`` is OpenAI's newer name for ``system``, and content may be a
    list of text parts (joined), as OpenAI's SDKs send it."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        """An image or audio part: say so (the union's own error was "Input should be a valid string")."""
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not supported: this server takes "
                                     f"text parts only")
        return value

    def template_dict(self) -> dict[str, str]:
        """The message as the chat template takes it: a role it knows, one string of content."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[StrictInt]


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI-style fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """What every error answers (``error_body``), as OpenAI's API does; for the schema."""

    error: ErrorDetail


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class LogprobFormatter:
    """Token log-probabilities in the completions or the chat shape.

    Tokens are shown by their real text and bytes (``TokenBytes``), never by the tokenizer's
    internal symbols ('Ġ', 'âĢ', '▁', '<0x97>').
    """

    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer

    @property
    def tokens(self) -> TokenBytes:
        return self._tokenizer.token_bytes  # built on the first request that asks for logprobs

    def offsets(self) -> TextOffsets:
        """A fresh ``text_offset`` count, for one choice's text from its start."""
        return self.tokens.offsets()

    def completion(self, entries: list[TokenLogprob], offsets: TextOffsets | None = None) -> dict[str, Any]:
        """``offsets``: the choice's count so far, for the next chunk of a stream (moved past
        ``entries``); by default the entries are the whole text from its start."""
        text, count = self.tokens.text, offsets if offsets is not None else self.offsets()
        return {"tokens": [text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries],
                "text_offset": [count.push(e.token) for e in entries]}

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        def item(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.tokens.text(token), "logprob": logprob,
                    "bytes": list(self.tokens.token_bytes(token))}

        return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}

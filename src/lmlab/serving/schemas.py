"""The request bodies lmlab serve accepts, and OpenAI's error shape.

Every field is typed strictly ("5" is not an integer, 1 is not a boolean) and an unknown field
is an error: a parameter lmlab would not honour is refused with a 400 that names it, never
dropped. OpenAI parameters lmlab does not implement are listed in UNSUPPORTED so that the error
says so; set to null they mean "not used" and are accepted.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 405: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """What both endpoints take: OpenAI's sampling parameters and lmlab's extras."""

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    # int64, as OpenAI's; row i's generator takes seed + 1,000,003 · i (n <= 128), which
    # torch.Generator.manual_seed accepts up to 2**64 - 1
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    # lmlab's extras (vLLM's names), sent as extra body fields
    top_k: int | None = Field(default=None, ge=1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # bounded so that scores / penalty stays finite (NaN in one row fails the whole step)
    repetition_penalty: float | None = Field(default=None, ge=1e-6, le=1e6)
    no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


# OpenAI parameters that lmlab does not implement: named in the error as such.
UNSUPPORTED = {
    "completions": {"suffix"},
    "chat": {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
             "response_format", "audio", "modalities", "metadata", "store", "service_tier",
             "prediction", "reasoning_effort", "web_search_options", "verbosity",
             "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "moderation"},
}


def parse(model: type[Strict], body: Any, *, endpoint: str) -> Strict:
    """`body` (parsed JSON) as `model`, or an APIError 400 naming the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unsupported = UNSUPPORTED[endpoint]
    for name in sorted(unsupported & body.keys()):
        if body[name] is not None:
            raise APIError(400, f"{name} is not supported by lmlab serve; remove it",
                           param=name, code="unsupported_parameter")
    body = {k: v for k, v in body.items() if k not in unsupported}
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        loc, kind = first["loc"], first["type"]
        # Union members' tags (str, list[int], …) are not names: keep fields and indices.
        named = [p for i, p in enumerate(loc) if i == 0 or isinstance(p, int)
                 or p in NESTED_FIELDS or (kind == "extra_forbidden" and i == len(loc) - 1)]
        param = ".".join(str(p) for p in named)
        if kind == "extra_forbidden":
            raise APIError(400, f"unknown parameter: {param}", param=param,
                           code="unknown_parameter") from None
        if kind == "missing":
            raise APIError(400, f"missing required parameter: {param}", param=param,
                           code="missing_required_parameter") from None
        field = next(p for p in reversed(named) if isinstance(p, str))
        if field in UNION_SHAPES and len(loc) > len(named):  # a union none of whose shapes fit
            message = f"{param} must be {UNION_SHAPES[field]}"
        else:
            message = f"{param}: {first['msg']}"
        raise APIError(400, f"{message} (got {first.get('input')!r})"[:500], param=param,
                       code="invalid_value") from None


NESTED_FIELDS = {"role", "content", "type", "text", "include_usage"}
UNION_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}

"""The OpenAI API's request and response shapes, as far as the server takes them.

Requests are read from the raw body (so that bad JSON, a wrong type or an unsupported field each become one
OpenAI-shaped 4xx error naming the field) into pydantic models; fields the server does not use are accepted and
ignored, except those whose meaning it cannot honour (`n` > 1, `logprobs`, `tools`, ...), which are refused.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOPS = 16


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with HTTP `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[bool] = False


class Sampling(BaseModel):
    """What chat and text completions share: the model, sampling, length, stop strings, streaming."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=1)  # not OpenAI's; vLLM and others take it
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = Field(1, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Union[bool, int]] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stop for stop in stops if stop)

    def length(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n {self.n}: only one choice per request is supported (n = 1)", param="n")
        if self.logprobs:
            raise ApiError(400, "logprobs: not supported by this server", param="logprobs")
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            raise ApiError(400, f"{name}: tool calling is not supported by this server", param=name)
        if len(self.stops()) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request (got a list of {len(self.prompt)})",
                               param="prompt")
            return self.prompt[0]
        return self.prompt

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix:
            name = "echo" if self.echo else "suffix"
            raise ApiError(400, f"{name}: not supported by this server", param=name)


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """The request body as `model`; any fault is a 400 naming the field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


# ---- answers ----


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(finish: str) -> str:
    """Ours (eos, stop, length) as OpenAI's: an end-of-sequence token or a stop string is "stop"."""
    return "length" if finish == "length" else "stop"


def chat_completion(id: str, model: str, text: str, finish: str, prompt_tokens: int, new_tokens: int) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason(finish)}],
        "usage": usage(prompt_tokens, new_tokens),
    }


def text_completion(id: str, model: str, text: str, finish: str, prompt_tokens: int, new_tokens: int) -> dict:
    return {
        "id": id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(finish)}],
        "usage": usage(prompt_tokens, new_tokens),
    }


def chat_chunk(id: str, model: str, delta: dict, finish: Optional[str] = None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason(finish) if finish else None}]}


def text_chunk(id: str, model: str, text: str, finish: Optional[str] = None) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason(finish) if finish else None}]}


def usage_chunk(id: str, model: str, object: str, prompt_tokens: int, new_tokens: int) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, new_tokens)}


def sse(data: Union[dict, str]) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()

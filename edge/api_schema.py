"""The local API's request bodies and errors, as OpenAI's API defines them (the fields this edge honours).

A body that does not validate (a NaN or infinite ``temperature``, ``n > 1``, a content part
that is not text...) is answered 400 with an OpenAI error object, as OpenAI answers it;
fields this edge does not know are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

ErrorKind = Literal["invalid_request_error", "not_found_error", "rate_limit_error", "server_error", "timeout_error"]


class ApiError(Exception):
    """An HTTP error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: ErrorKind = "invalid_request_error",
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage and no choices


class SamplingBody(BaseModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None or the id /v1/models lists
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(default=0, ge=0)  # extension: not in OpenAI's API
    seed: int | None = None  # None: a fresh random seed per request (sampling is random, as OpenAI's)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    mode: Literal["lossless", "gated", "local", "cloud"] | None = None  # extension: per-request decoding mode

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(SamplingBody):
    """``POST /v1/completions`` (OpenAI's default ``max_tokens`` is 16)."""

    prompt: str | list[str] = ""


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        """The message as a chat template reads it; text parts are joined by newlines (as vLLM does)."""
        if isinstance(self.content, list):
            others = sorted({p.type for p in self.content if p.type != "text"})
            if others:
                raise ApiError(400, f"only text content parts are supported; got {', '.join(others)}")
            content = "\n".join(p.text or "" for p in self.content)
        else:
            content = self.content or ""
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatBody(SamplingBody):
    """``POST /v1/chat/completions`` (no ``max_tokens`` means up to the daemon's ``max_request_tokens``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)  # OpenAI's successor of max_tokens

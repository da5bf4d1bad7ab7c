"""The edge daemon's local API: OpenAI-compatible completions over FastAPI + uvicorn.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with ``"stream": true`` as server-sent events, one event per decoded token),
``GET /health`` and ``GET /metrics`` (Prometheus). Apps on the device talk to this API;
the daemon decides where tokens come from (drafter, verifier, or both) and reports it in
an extra ``tandem_stats`` field of each non-streamed response.

The edge holds one drafter, so generations run one at a time (a lock), each on a worker
thread; streamed tokens cross to the event loop through a queue. A client that goes away
mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeRuntime
from tandemspec.edge.stats import GenerationResult
from tandemspec.types import SamplingParams

logger = logging.getLogger(__name__)

_END = object()


class GenerationCancelled(Exception):
    """The HTTP client went away; the generation stops."""


class CompletionBody(BaseModel):
    """``POST /v1/completions`` (the OpenAI fields this edge honours; others are ignored)."""

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(default=16, ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension: not in OpenAI's API
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    mode: Literal["lossless", "gated", "local", "cloud"] | None = None  # extension: per-request decoding mode


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(CompletionBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain-text rendering of a conversation (the reference models have no chat template)."""
    lines = [f"{m.role}: {m.content}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


@dataclass
class EdgeMetrics:
    """Prometheus metrics of one API instance (its own registry, so tests can run several)."""

    registry: CollectorRegistry
    requests: Counter
    tokens: Counter
    fallbacks: Counter
    bytes: Counter
    drafted: Counter
    accepted: Counter
    latency: Histogram
    cloud_up: Gauge

    @classmethod
    def create(cls) -> EdgeMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("tandem_edge_requests", "API requests", ["endpoint"], registry=registry),
            tokens=Counter("tandem_edge_generated_tokens", "generated tokens", ["mode"], registry=registry),
            fallbacks=Counter("tandem_edge_fallbacks", "generations that fell back to local", registry=registry),
            bytes=Counter("tandem_edge_wire_bytes", "serialized gRPC frame bytes", ["direction"], registry=registry),
            drafted=Counter("tandem_edge_drafted_tokens", "draft tokens judged by the cloud", registry=registry),
            accepted=Counter("tandem_edge_accepted_tokens", "draft tokens the cloud accepted", registry=registry),
            latency=Histogram("tandem_edge_generation_seconds", "wall time per generation", registry=registry),
            cloud_up=Gauge("tandem_edge_cloud_up", "1 when the last generation reached the cloud", registry=registry),
        )

    def observe(self, result: GenerationResult) -> None:
        s = result.stats
        self.tokens.labels(mode=s.mode_used).inc(s.num_generated)
        self.fallbacks.inc(int(s.fell_back_to_local))
        self.bytes.labels(direction="up").inc(s.bytes_up)
        self.bytes.labels(direction="down").inc(s.bytes_down)
        self.drafted.inc(s.num_drafted)
        self.accepted.inc(s.num_accepted)
        self.latency.observe(s.wall_s)
        if s.mode_requested != "local":
            self.cloud_up.set(0 if s.fell_back_to_local else 1)


class EdgeApi:
    """Turns HTTP requests into generations on one :class:`EdgeRuntime`."""

    def __init__(self, runtime: EdgeRuntime, model_id: str | None = None) -> None:
        self.runtime = runtime
        self.model_id = model_id or f"tandem-{runtime.bundle.manifest.source or runtime.bundle.manifest.family}"
        self.metrics = EdgeMetrics.create()
        self._lock = threading.Lock()  # one drafter: one generation at a time

    def request_for(self, prompt: str, body: CompletionBody) -> GenerationRequest:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            sampling = SamplingParams(
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed or 0
            )
        except ValueError as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        return GenerationRequest(
            prompt_ids=self.runtime.tokenizer.encode_prompt(prompt),
            sampling=sampling,
            max_new_tokens=16 if body.max_tokens is None else body.max_tokens,
            stop_strings=tuple(stops),
            mode=body.mode,
        )

    def generate(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> GenerationResult:
        """Run one generation (blocking; call from a worker thread)."""

        def on_tokens(ids: list[int], text: str) -> None:
            if cancelled is not None and cancelled.is_set():
                raise GenerationCancelled
            if on_text is not None and text:
                on_text(text)

        with self._lock:
            try:
                result = self.runtime.decoder.generate(request, on_tokens)
            except ValueError as error:
                raise HTTPException(status_code=400, detail=str(error)) from error
        self.metrics.observe(result)
        return result


def _prompt_text(body: CompletionBody) -> str:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise HTTPException(status_code=400, detail="exactly one prompt per request is supported")
        return body.prompt[0]
    return body.prompt


def _usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_chunk(base: dict[str, Any], delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def _stream_generation(
    api: EdgeApi,
    request: GenerationRequest,
    chunk: Callable[[str], dict[str, Any]],
    final: Callable[[GenerationResult], dict[str, Any]],
) -> AsyncIterator[bytes]:
    """Run a generation on a worker thread and yield one SSE event per text delta."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def on_text(text: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, text)

    def work() -> GenerationResult | BaseException:
        try:
            return api.generate(request, on_text, cancelled)
        except (GenerationCancelled, HTTPException) as error:
            return error
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    task = loop.run_in_executor(None, work)
    try:
        while isinstance(item := await queue.get(), str):
            yield _sse(chunk(item))
        outcome = await task
        if isinstance(outcome, GenerationResult):
            yield _sse(final(outcome))
        elif isinstance(outcome, HTTPException):  # headers are sent: report in-band, as OpenAI does
            yield _sse({"error": {"message": str(outcome.detail), "type": "invalid_request_error"}})
        yield _sse("[DONE]")
    finally:
        cancelled.set()  # the client disconnected, or we are done: stop generating either way


def create_app(api: EdgeApi) -> FastAPI:
    """The FastAPI application of one edge daemon."""
    app = FastAPI(title="tandemspec edge", version="1")

    @app.get("/health")
    def health() -> dict[str, Any]:
        manifest = api.runtime.bundle.manifest
        return {
            "status": "ok",
            "model": api.model_id,
            "bundle": str(api.runtime.bundle.path),
            "family": manifest.family,
            "cloud": api.runtime.config.cloud,
            "mode": api.runtime.config.mode,
        }

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(api.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        api.metrics.requests.labels(endpoint="models").inc()
        return {
            "object": "list",
            "data": [{"id": api.model_id, "object": "model", "created": 0, "owned_by": "tandemspec"}],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> JSONResponse | StreamingResponse:
        api.metrics.requests.labels(endpoint="completions").inc()
        request = api.request_for(_prompt_text(body), body)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": ident, "object": "text_completion", "created": created, "model": api.model_id}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        if body.stream:
            return StreamingResponse(
                _stream_generation(
                    api,
                    request,
                    lambda text: {**base, "choices": [choice(text, None)]},
                    lambda r: {**base, "choices": [choice("", r.finish_reason)], "usage": _usage(r)},
                ),
                media_type="text/event-stream",
            )
        result = await asyncio.get_running_loop().run_in_executor(None, api.generate, request)
        return JSONResponse(
            {
                **base,
                "choices": [choice(result.text, result.finish_reason)],
                "usage": _usage(result),
                "tandem_stats": result.stats.to_dict(),
            }
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody) -> JSONResponse | StreamingResponse:
        api.metrics.requests.labels(endpoint="chat").inc()
        request = api.request_for(chat_prompt(body.messages), body)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": ident, "created": created, "model": api.model_id}
        if body.stream:
            chunk_base = {**base, "object": "chat.completion.chunk"}
            return StreamingResponse(
                _stream_generation(
                    api,
                    request,
                    lambda text: _chat_chunk(chunk_base, {"role": "assistant", "content": text}, None),
                    lambda r: _chat_chunk(chunk_base, {}, r.finish_reason),
                ),
                media_type="text/event-stream",
            )
        result = await asyncio.get_running_loop().run_in_executor(None, api.generate, request)
        message = {"role": "assistant", "content": result.text}
        return JSONResponse(
            {
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
                "usage": _usage(result),
                "tandem_stats": result.stats.to_dict(),
            }
        )

    return app


class ApiHandle:
    """A local API served by uvicorn on a background thread (for tests and the demo)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, address: str) -> None:
        self._server = server
        self._thread = thread
        self.address = address  # "HOST:PORT"
        self.base_url = f"http://{address}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> ApiHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_api_in_thread(runtime: EdgeRuntime, host: str = "127.0.0.1", port: int = 0) -> ApiHandle:
    """Serve the API on ``host:port`` (0 = any free port) from a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    address = f"{host}:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(EdgeApi(runtime)), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tandem-edge-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the edge API did not start on {address}")
        time.sleep(0.01)
    return ApiHandle(server, thread, address)


def serve(runtime: EdgeRuntime, host: str, port: int) -> None:
    """Serve the API in the foreground until interrupted (``tandem edge serve``)."""
    app = create_app(EdgeApi(runtime))
    print(
        f"edge API on http://{host}:{port} (bundle {runtime.bundle.path}, cloud {runtime.config.cloud or 'none'})",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")

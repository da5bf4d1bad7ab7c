"""The edge daemon's local API: OpenAI-compatible completions over FastAPI + uvicorn.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with ``"stream": true`` as server-sent events, one event per decoded text delta),
``GET /health`` and ``GET /metrics`` (Prometheus). Apps on the device talk to this API;
the daemon decides where tokens come from (drafter, verifier, or both) and reports it in
an extra ``tandem_stats`` field of each non-streamed response.

Fidelity to the model and to OpenAI's API:

- a prompt is encoded as the model's ``AutoTokenizer`` encodes it, a conversation with the
  model's own chat template (``apply_chat_template(messages, add_generation_prompt=True)``),
  or, for a bundle without one, as "role: content" lines (:mod:`tandemspec.edge.chat`);
- no ``seed``: a fresh random seed per request, drawn here and sent to the verifier so that
  edge and cloud agree; a ``seed``: reproducible output;
- ``max_tokens`` defaults to 16 for completions (OpenAI's default) and, for chat (which has
  none), to the daemon's ``max_request_tokens``; a request may not ask for more (400);
- bad input answers 400 with an OpenAI error object, an unknown model 404, a request the
  verifier refused for its parameters 400, a tokenizer that differs from the verifier's 502
  (and ``/health`` shows both fingerprints); a refusal is never answered from the drafter alone.

Concurrency: up to ``max_concurrent`` generations run at once on worker threads, each with
a decoder of its own (a fork of the drafter: its own KV cache on the shared ONNX Runtime
session); up to ``max_queued`` more wait for one. Past that a request is answered 429, and
while the daemon shuts down 503, both with ``Retry-After``. A generation that runs past
``request_timeout_s`` (waiting included) is cancelled and answered 504.

Bundle versions: the daemon watches its bundle location (``--bundle OUT/current``) and
swaps to each newly published version that passes :mod:`tandemspec.edge.watch`'s checks; a
request is encoded and decoded by the version served when it arrived. ``/health``,
``/v1/models`` and each response's ``tandem_stats`` name the version; ``/metrics`` counts
swaps and refusals by reason (docs/deployment.md).

Streaming: the 200 and its SSE headers are sent only once the first text delta (or the
outcome) is known, so a refusal before the first token gets its own status. Streamed
tokens cross from the worker thread to the event loop through a queue; a client that goes
away mid-stream cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from tandemspec.edge.api_schema import ApiError, ChatBody, CompletionBody, SamplingBody
from tandemspec.edge.chat import ChatTemplateError
from tandemspec.edge.client import CloudRefused, CloudUnavailable, TokenizerMismatch
from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.edge.runtime import EdgeRuntime, LoadedBundle
from tandemspec.edge.stats import GenerationResult
from tandemspec.edge.tokenizer import check_text
from tandemspec.edge.watch import REFUSAL_REASONS, BundleWatcher, Refusal
from tandemspec.types import SamplingParams

logger = logging.getLogger(__name__)

_END = object()
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_SEED_MASK = (1 << 64) - 1  # the wire's seed is a uint64
_RETRY_AFTER_S = 1


class GenerationCancelled(Exception):
    """The HTTP client went away, the request timed out or the daemon stops: the generation ends."""


@dataclass
class EdgeMetrics:
    """Prometheus metrics of one API instance (its own registry, so tests can run several)."""

    registry: CollectorRegistry
    requests: Counter
    rejected: Counter
    tokens: Counter
    fallbacks: Counter
    bytes: Counter
    drafted: Counter
    accepted: Counter
    latency: Histogram
    cloud_up: Gauge
    running: Gauge
    waiting: Gauge
    bundle: Info
    swaps: Counter
    refusals: Counter

    @classmethod
    def create(cls) -> EdgeMetrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter("tandem_edge_requests", "API requests", ["endpoint"], registry=registry),
            rejected=Counter("tandem_edge_rejected", "requests answered with an error", ["status"], registry=registry),
            tokens=Counter("tandem_edge_generated_tokens", "generated tokens", ["mode"], registry=registry),
            fallbacks=Counter("tandem_edge_fallbacks", "generations that fell back to local", registry=registry),
            bytes=Counter("tandem_edge_wire_bytes", "serialized gRPC frame bytes", ["direction"], registry=registry),
            drafted=Counter("tandem_edge_drafted_tokens", "draft tokens judged by the cloud", registry=registry),
            accepted=Counter("tandem_edge_accepted_tokens", "draft tokens the cloud accepted", registry=registry),
            latency=Histogram("tandem_edge_generation_seconds", "wall time per generation", registry=registry),
            cloud_up=Gauge("tandem_edge_cloud_up", "1 when the last generation reached the cloud", registry=registry),
            running=Gauge("tandem_edge_generations_running", "generations in progress", registry=registry),
            waiting=Gauge("tandem_edge_generations_waiting", "admitted requests waiting for a slot", registry=registry),
            bundle=Info("tandem_edge_bundle", "the bundle version new requests get", registry=registry),
            swaps=Counter("tandem_edge_bundle_swaps", "switches to a newly published bundle", registry=registry),
            refusals=Counter(
                "tandem_edge_bundle_refusals", "published bundles refused, by reason", ["reason"], registry=registry
            ),
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


class ServedBundle:
    """A bundle version the API serves: the loaded bundle and one decoder per generation slot.

    A request takes the version served when it arrives (:meth:`EdgeApi.serving`), is encoded
    with its tokenizer and decoded by one of its decoders, so a swap never changes the
    version of a request in flight; an old version is dropped once its last request ends.
    """

    def __init__(
        self,
        loaded: LoadedBundle,
        slots: int,
        first: HybridDecoder | None = None,
        new_decoder: Callable[[], HybridDecoder] | None = None,
    ) -> None:
        self.loaded = loaded
        self.version = loaded.version
        new_decoder = new_decoder or loaded.new_decoder
        # A worker thread takes a decoder for each generation and gives it back.
        self.decoders: queue.SimpleQueue[HybridDecoder] = queue.SimpleQueue()
        self.decoders.put(first or new_decoder())
        for _ in range(slots - 1):
            self.decoders.put(new_decoder())


class EdgeApi:
    """Turns HTTP requests into generations on one :class:`EdgeRuntime`, a few at a time.

    With ``watch_interval_s > 0`` (default: the config's) a :class:`BundleWatcher` polls the
    bundle location and the API switches to each verified new version between requests.
    """

    def __init__(self, runtime: EdgeRuntime, model_id: str | None = None, watch_interval_s: float | None = None):
        self.runtime = runtime
        self.config = runtime.config
        self.model_id = model_id or f"tandem-{runtime.bundle.manifest.source or runtime.bundle.manifest.family}"
        self.metrics = EdgeMetrics.create()
        slots = self.config.max_concurrent
        self._served = ServedBundle(runtime.loaded, slots, runtime.decoder, runtime.new_decoder)
        self.num_swaps = 0
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="tandem-generation")
        self._lock = threading.Lock()
        self._num_admitted = 0  # generations waiting or running
        self._num_running = 0
        self._active: set[threading.Event] = set()  # cancel events of admitted generations
        self.closing = False
        self._show_bundle(self._served)
        for reason in REFUSAL_REASONS:
            self.metrics.refusals.labels(reason=reason)  # every reason exported, 0 until it happens
        interval = self.config.watch_interval_s if watch_interval_s is None else watch_interval_s
        self.watcher = BundleWatcher(runtime, runtime.loaded.bundle.path, self.swap, self._refused, interval)
        self.watcher.start()

    # -- bundle versions ------------------------------------------------------------------

    def serving(self) -> ServedBundle:
        """The version a request arriving now is decoded with."""
        with self._lock:
            return self._served

    def swap(self, loaded: LoadedBundle) -> None:
        """Serve ``loaded`` to requests from now on; those in flight finish on their version."""
        served = ServedBundle(loaded, self.config.max_concurrent)  # forks, built before taking the lock
        with self._lock:
            old, self._served = self._served, served
            self.num_swaps += 1
        self.metrics.swaps.inc()
        self._show_bundle(served)
        logger.info("bundle %s -> %s (%s)", old.version, served.version, loaded.bundle.path)

    def _refused(self, refusal: Refusal) -> None:
        self.metrics.refusals.labels(reason=refusal.reason).inc()
        logger.warning(
            "refused bundle %s at %s (%s): %s; still serving %s",
            refusal.version, refusal.path, refusal.reason, refusal.message, self.serving().version,
        )  # fmt: skip

    def _show_bundle(self, served: ServedBundle) -> None:
        self.metrics.bundle.info({"version": served.version, "path": str(served.loaded.bundle.path)})

    # -- requests -> generations ----------------------------------------------------------

    def check_model(self, body: SamplingBody) -> None:
        if body.model is not None and body.model != self.model_id:
            raise ApiError(
                404, f"the model {body.model!r} does not exist; this daemon serves {self.model_id!r}",
                "not_found_error", "model_not_found",
            )  # fmt: skip

    def request_for(self, prompt_ids: tuple[int, ...], body: SamplingBody, max_tokens: int | None) -> GenerationRequest:
        """The generation a request asks for; raises :class:`ApiError` (400) for what it may not ask."""
        limit = self.config.max_request_tokens
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this daemon allows at most {limit} (max_request_tokens)")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        seed = secrets.randbits(64) if body.seed is None else body.seed & _SEED_MASK
        try:
            for stop in stops:
                check_text(stop, "a stop string")
            sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=seed)
        except ValueError as error:
            raise ApiError(400, str(error)) from error
        return GenerationRequest(
            prompt_ids=prompt_ids,
            sampling=sampling,
            max_new_tokens=limit if max_tokens is None else max_tokens,
            stop_strings=tuple(stops),
            mode=body.mode,
        )

    def admit(self, cancelled: threading.Event) -> None:
        """Take a place for one generation (running or waiting); 503 while closing, 429 when full."""
        with self._lock:
            if self.closing:
                raise ApiError(503, "the edge daemon is shutting down", "server_error", retry_after_s=_RETRY_AFTER_S)
            capacity = self.config.max_concurrent + self.config.max_queued
            if self._num_admitted >= capacity:
                raise ApiError(
                    429, f"too many requests: {self._num_admitted} generations running or waiting (at most {capacity})",
                    "rate_limit_error", retry_after_s=_RETRY_AFTER_S,
                )  # fmt: skip
            self._num_admitted += 1
            self._active.add(cancelled)
            self._update_gauges()

    def _release(self, cancelled: threading.Event) -> None:
        with self._lock:
            self._num_admitted -= 1
            self._active.discard(cancelled)
            self._update_gauges()

    def _update_gauges(self) -> None:  # with the lock held
        self.metrics.running.set(self._num_running)
        self.metrics.waiting.set(self._num_admitted - self._num_running)

    def generate(
        self,
        served: ServedBundle,
        request: GenerationRequest,
        on_text: Callable[[str], None] | None,
        cancelled: threading.Event,
    ) -> GenerationResult:
        """Run one admitted generation on this worker thread with a decoder of its own (of ``served``)."""
        try:
            if cancelled.is_set():  # timed out or the client left while it waited
                raise GenerationCancelled

            def on_tokens(ids: list[int], text: str) -> None:
                if cancelled.is_set():
                    raise GenerationCancelled
                if on_text is not None and text:
                    on_text(text)

            decoder = served.decoders.get()  # never waits: each version has as many decoders as worker threads
            with self._lock:
                self._num_running += 1
            try:
                result = decoder.generate(request, on_tokens)
            finally:
                served.decoders.put(decoder)
                with self._lock:
                    self._num_running -= 1
        finally:
            self._release(cancelled)
        self.metrics.observe(result)
        return result

    def close(self) -> None:
        """Refuse new requests (503), cancel the admitted ones and stop the worker threads (and the watcher)."""
        self.watcher.stop()
        with self._lock:
            self.closing = True
            for cancelled in self._active:
                cancelled.set()
        self._executor.shutdown(wait=True)

    # -- one generation on a worker thread ------------------------------------------------

    async def start(self, served: ServedBundle, request: GenerationRequest, stream: bool) -> _Run:
        """Admit and start a generation on ``served`` (raises :class:`ApiError` 429/503 when it cannot)."""
        run = _Run(asyncio.get_running_loop(), self.config.request_timeout_s)
        self.admit(run.cancelled)
        try:
            run.future = asyncio.wrap_future(
                self._executor.submit(self._work, served, run, request, run.put_text if stream else None)
            )
        except RuntimeError as error:  # the executor shut down between admit() and here
            self._release(run.cancelled)
            raise ApiError(
                503, "the edge daemon is shutting down", "server_error", retry_after_s=_RETRY_AFTER_S
            ) from error
        return run

    def _work(
        self, served: ServedBundle, run: _Run, request: GenerationRequest, on_text: Callable[[str], None] | None
    ) -> object:
        try:
            return self.generate(served, request, on_text, run.cancelled)
        except (GenerationCancelled, CloudRefused, ValueError) as error:
            return error
        except Exception as error:  # the worker's boundary: answered 500, the daemon keeps serving
            logger.exception("generation failed")
            return error
        finally:
            run.put_end()


class _Run:
    """One generation seen from the event loop: its text deltas as they come, then its outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self.deadline = loop.time() + timeout_s
        self.cancelled = threading.Event()
        self.items: asyncio.Queue[object] = asyncio.Queue()
        self.future: asyncio.Future[object] | None = None
        self.timed_out = False

    def put_text(self, text: str) -> None:  # on the worker thread
        self._loop.call_soon_threadsafe(self.items.put_nowait, text)

    def put_end(self) -> None:  # on the worker thread
        self._loop.call_soon_threadsafe(self.items.put_nowait, _END)

    def _remaining_s(self) -> float:
        return max(0.0, self.deadline - self._loop.time())

    async def next_text(self) -> str | None:
        """The next text delta, or None once the generation ended (or timed out: it is cancelled)."""
        try:
            item = await asyncio.wait_for(self.items.get(), self._remaining_s())
        except TimeoutError:
            self.timed_out = True
            self.cancelled.set()
            return None
        return item if isinstance(item, str) else None

    async def outcome(self) -> GenerationResult:
        """The result, once the generation ended; raises :class:`ApiError` for anything else."""
        assert self.future is not None
        if self.timed_out:  # cancelled; do not wait for the worker to notice
            raise _error_for(GenerationCancelled(), timed_out=True)
        try:
            value = await asyncio.wait_for(asyncio.shield(self.future), self._remaining_s())
        except TimeoutError:
            self.timed_out = True
            self.cancelled.set()
            value = GenerationCancelled()
        if isinstance(value, GenerationResult):
            return value
        raise _error_for(value, self.timed_out)


def _error_for(error: object, timed_out: bool) -> ApiError:
    """The HTTP error a failed generation is answered with."""
    if isinstance(error, TokenizerMismatch):
        return ApiError(502, str(error.message), "server_error", "tokenizer_mismatch")
    if isinstance(error, CloudRefused):
        if error.is_invalid_request:
            return ApiError(400, f"the verifier refused the request: {error.message}")
        return ApiError(502, f"the verifier refused the request: {error}", "server_error", "verifier_refused")
    if isinstance(error, GenerationCancelled):
        if timed_out:
            return ApiError(504, "the request timed out (request_timeout_s); its generation was cancelled",
                            "timeout_error", "timeout")  # fmt: skip
        return ApiError(503, "the generation was cancelled", "server_error")
    if isinstance(error, ValueError):
        return ApiError(400, str(error))
    return ApiError(500, f"internal error: {error!r}", "server_error")


# -- OpenAI shapes ---------------------------------------------------------------------------


def _usage(result: GenerationResult) -> dict[str, int]:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


@dataclass(frozen=True)
class _Shape:
    """How one endpoint writes its chunks and its response."""

    base: dict[str, Any]  # id, object, created, model
    chunk: Callable[[str, bool], dict[str, Any]]  # (text, first) -> a streamed chunk's choice
    finish: Callable[[str], dict[str, Any]]  # finish_reason -> the last streamed choice
    response: Callable[[GenerationResult], dict[str, Any]]  # the non-streamed choice


def _completion_shape(model: str) -> _Shape:
    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    return _Shape(
        base={"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
              "model": model},
        chunk=lambda text, first: choice(text, None),
        finish=lambda reason: choice("", reason),
        response=lambda r: choice(r.text, r.finish_reason),
    )  # fmt: skip


def _chat_shape(model: str) -> _Shape:
    def delta(text: str, first: bool) -> dict[str, Any]:
        content = {"role": "assistant", "content": text} if first else {"content": text}  # role: first chunk only
        return {"index": 0, "delta": content, "finish_reason": None}

    return _Shape(
        base={"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model},
        chunk=delta,
        finish=lambda reason: {"index": 0, "delta": {}, "finish_reason": reason},
        response=lambda r: {
            "index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason
        },
    )  # fmt: skip


async def _respond(
    api: EdgeApi, served: ServedBundle, request: GenerationRequest, body: SamplingBody, shape: _Shape, chat: bool
) -> Any:
    """Run the generation and answer: one JSON response, or SSE once the first delta is known."""
    run = await api.start(served, request, body.stream)
    if not body.stream:
        result = await run.outcome()
        kind = "chat.completion" if chat else shape.base["object"]
        return JSONResponse(
            {**shape.base, "object": kind, "choices": [shape.response(result)], "usage": _usage(result),
             "tandem_stats": result.stats.to_dict()}
        )  # fmt: skip
    first = await run.next_text()
    if first is None:
        await run.outcome()  # a refusal, a timeout or an error before any text: its own status
    return StreamingResponse(_events(run, first, body, shape, chat), media_type="text/event-stream")


async def _events(run: _Run, first: str | None, body: SamplingBody, shape: _Shape, chat: bool) -> AsyncIterator[bytes]:
    """The SSE events of a started generation whose first delta (None: none) is known."""
    base = {**shape.base, "object": "chat.completion.chunk"} if chat else shape.base
    extra = {"usage": None} if body.include_usage else {}
    try:
        text, is_first = first, True
        while text is not None:
            yield _sse({**base, "choices": [shape.chunk(text, is_first and chat)], **extra})
            text, is_first = await run.next_text(), False
        try:
            result = await run.outcome()
        except ApiError as error:  # headers are sent: report in-band, as OpenAI does
            yield _sse(error.body())
        else:
            if is_first and chat:  # no text at all: the role still comes in a first chunk
                yield _sse({**base, "choices": [shape.chunk("", True)], **extra})
            yield _sse({**base, "choices": [shape.finish(result.finish_reason)], **extra})
            if body.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(result)})
        yield _sse("[DONE]")
    finally:
        run.cancelled.set()  # the client disconnected, or we are done: stop generating either way


# -- the application ----------------------------------------------------------------------


def _verifier_health(api: EdgeApi, served: ServedBundle) -> dict[str, Any] | None:
    client = api.runtime.client
    if client is None:
        return None
    edge = served.loaded.bundle.manifest.tokenizer_fingerprint
    try:
        info = client.ensure_connected()
    except (CloudUnavailable, CloudRefused) as error:
        return {"reachable": False, "error": str(error), "edge_fingerprint": edge}
    return {
        "reachable": True,
        "tokenizer_match": info.tokenizer_fingerprint == edge,
        "edge_fingerprint": edge,
        "cloud_fingerprint": info.tokenizer_fingerprint,
        "model": info.model_name,
    }


def _prompt_text(body: CompletionBody) -> str:
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported")
        return body.prompt[0]
    return body.prompt


def create_app(api: EdgeApi) -> FastAPI:
    """The FastAPI application of one edge daemon."""
    app = FastAPI(title="tandemspec edge", version="1")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        api.metrics.rejected.labels(status=str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in error.errors())
        return await api_error(request, ApiError(400, f"invalid request: {problems}"))

    @app.get("/health")
    def health() -> dict[str, Any]:
        served = api.serving()
        manifest = served.loaded.bundle.manifest
        verifier = _verifier_health(api, served)
        refusal = api.watcher.refusal
        status = "ok"
        if verifier is not None and not verifier["reachable"]:
            status = "degraded"  # generations continue locally
        elif verifier is not None and not verifier["tokenizer_match"]:
            status = "error"  # every cloud-backed request is refused (502)
        return {
            "status": "shutting_down" if api.closing else status,
            "model": api.model_id,
            "bundle": str(served.loaded.bundle.path),
            "bundle_version": served.version,
            "bundle_location": str(api.runtime.bundle_location),
            "bundle_swaps": api.num_swaps,
            # The bundle the location names and this daemon refused (null when it serves what the location names).
            "bundle_refused": refusal.to_dict() if refusal is not None else None,
            "family": manifest.family,
            "cloud": api.runtime.config.cloud,
            "mode": api.runtime.config.mode,
            "verifier": verifier,
        }

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(api.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        api.metrics.requests.labels(endpoint="models").inc()
        return {
            "object": "list",
            "data": [
                {
                    "id": api.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "tandemspec",
                    "bundle_version": api.serving().version,
                }
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> Any:
        api.metrics.requests.labels(endpoint="completions").inc()
        api.check_model(body)
        served = api.serving()
        try:
            prompt_ids = served.loaded.tokenizer.encode_prompt(_prompt_text(body))
        except ValueError as error:
            raise ApiError(400, str(error)) from error
        max_tokens = _COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        request = api.request_for(prompt_ids, body, max_tokens)
        return await _respond(api, served, request, body, _completion_shape(api.model_id), chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody) -> Any:
        api.metrics.requests.labels(endpoint="chat").inc()
        api.check_model(body)
        messages = [m.as_template_input() for m in body.messages]
        served = api.serving()
        try:
            prompt_ids = served.loaded.tokenizer.encode_chat(messages)
        except (ValueError, ChatTemplateError) as error:
            raise ApiError(400, str(error)) from error
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = api.request_for(prompt_ids, body, max_tokens)
        return await _respond(api, served, request, body, _chat_shape(api.model_id), chat=True)

    return app


class ApiHandle:
    """A local API served by uvicorn on a background thread (for tests and the demo)."""

    def __init__(self, api: EdgeApi, server: uvicorn.Server, thread: threading.Thread, address: str) -> None:
        self.api = api
        self._server = server
        self._thread = thread
        self.address = address  # "HOST:PORT"
        self.base_url = f"http://{address}"

    def stop(self) -> None:
        self.api.close()
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> ApiHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_api_in_thread(
    runtime: EdgeRuntime, host: str = "127.0.0.1", port: int = 0, watch_interval_s: float = 0.0
) -> ApiHandle:
    """Serve the API on ``host:port`` (0 = any free port) from a background thread.

    The bundle location is watched every ``watch_interval_s`` (0 = not polled; ``api.watcher.check()`` looks once).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    address = f"{host}:{sock.getsockname()[1]}"
    api = EdgeApi(runtime, watch_interval_s=watch_interval_s)
    config = uvicorn.Config(create_app(api), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tandem-edge-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the edge API did not start on {address}")
        time.sleep(0.01)
    return ApiHandle(api, server, thread, address)


def serve(runtime: EdgeRuntime, host: str, port: int) -> None:
    """Serve the API in the foreground until interrupted (``tandem edge serve``)."""
    api = EdgeApi(runtime)
    app = create_app(api)
    interval = api.watcher.interval_s
    watching = f", watching {runtime.bundle_location} every {interval:g} s" if interval > 0 else ""
    print(
        f"edge API on http://{host}:{port} (bundle {api.serving().version} at {runtime.bundle.path}, "
        f"cloud {runtime.config.cloud or 'none'}, {runtime.config.max_concurrent} generations at once{watching})",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        api.close()

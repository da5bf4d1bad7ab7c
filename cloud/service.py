"""The ``tandemspec.v1.Verifier`` service: ``Info`` and the ``Decode`` session loop.

One ``Decode`` call is one session::

    read SessionOpen -> validate -> admit -> prefill -> SessionReady
    VERIFY:   per DraftFrame, in order: stale? -> validate -> target step -> judge -> Verdict
    GENERATE: per token: target step -> choose -> GeneratedTokens ... -> SessionDone

A reader task parses incoming frames into a small bounded inbox (so gRPC flow control
still applies), which lets the session time out when idle and notice a ``SessionClose``
while generating. Any :class:`SessionError` ends that session with an ``Error`` frame and
its status code; nothing a client sends can end the server.

A session ends *logically* (its slot and KV reservation go back to admission) before its
last frame (``SessionDone`` or ``Error``) is written, so an edge that opens its next session
as soon as it reads that frame always finds the slot free. Two clocks end a session with
``DEADLINE_EXCEEDED`` (a transport-class status: the edge falls back to local decoding):
``session_idle_s``, the longest wait for the edge's next message (a handshake or a frame;
a GENERATE session waits on nothing once open), and ``session_ttl_s``, the whole session's
limit from its admission. A write that fails because the edge has gone is the edge's
cancel, never an INTERNAL error, and after the logical end it is not an error at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TypeAlias

import grpc

from tandemspec.cloud.metrics import VerifierMetrics
from tandemspec.cloud.scheduler import BatchScheduler
from tandemspec.cloud.session import (
    AdmissionBook,
    Session,
    SessionError,
    SessionRules,
    client_key,
    invalid,
    session_token_budget,
    validate_frame,
    validate_open,
)
from tandemspec.cloud.target import ForwardRow
from tandemspec.cloud.verify import generate_token, judge_frame
from tandemspec.cloud.wire import parse_edge_frame
from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import (
    DraftFrame,
    GeneratedTokens,
    ServerInfo,
    SessionClose,
    SessionDone,
    SessionKind,
    SessionOpen,
    SessionReady,
    Verdict,
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "tandemspec.v1.Verifier"
_INBOX_FRAMES = 8  # frames read ahead of the session loop (pipelining needs a few)


class _EndOfStream:
    """The edge half-closed its side of the stream."""


_END = _EndOfStream()
_InboxItem: TypeAlias = SessionOpen | DraftFrame | SessionClose | SessionError | _EndOfStream


class _StreamGone(Exception):
    """Writing to the stream failed: the edge cancelled or disconnected."""


class VerifierService:
    """Serves sessions on one target through one scheduler."""

    def __init__(
        self,
        info: ServerInfo,
        rules: SessionRules,
        scheduler: BatchScheduler,
        admission: AdmissionBook,
        metrics: VerifierMetrics,
        kv_bytes_per_token: int,
        session_idle_s: float,
        session_ttl_s: float,
        authenticated: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._info = info
        self._rules = rules
        self._scheduler = scheduler
        self._admission = admission
        self._metrics = metrics
        self._kv_bytes_per_token = kv_bytes_per_token
        self._idle_s = session_idle_s
        self._ttl_s = session_ttl_s
        self._authenticated = authenticated  # every call carries the bearer token (the interceptor checked)
        self._clock = clock

    async def info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        """Model, tokenizer fingerprint, limits and capabilities."""
        return codec.encode_info(self._info)

    async def decode(self, requests: object, context: grpc.aio.ServicerContext) -> None:
        """One session on a bidirectional stream of raw ``EdgeFrame`` bytes."""
        inbox: asyncio.Queue[_InboxItem] = asyncio.Queue(maxsize=_INBOX_FRAMES)
        reader = asyncio.create_task(_read_frames(context, inbox))
        try:
            await self._serve_session(inbox, context)
        except SessionError as error:
            await self._fail(context, error)
        except _StreamGone as gone:  # the edge cancelled mid-session: its choice, not a failure
            self._metrics.session_errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
            logger.info("session cancelled by the client: %s", gone)
        except Exception as error:  # a bug or a failed forward: end this session only, say so
            if context.cancelled():  # the edge went away mid-write: routine, not a failure
                logger.info("session cancelled by the client: %s", error)
                return
            logger.exception("session failed")
            await self._fail(context, SessionError(grpc.StatusCode.INTERNAL, f"internal error: {error}"))
        finally:
            reader.cancel()

    async def _serve_session(self, inbox: asyncio.Queue[_InboxItem], context: grpc.aio.ServicerContext) -> None:
        first = await self._next(inbox)
        if isinstance(first, _EndOfStream):
            return
        if not isinstance(first, SessionOpen):
            raise invalid(f"the first frame must be a SessionOpen handshake, got a {type(first).__name__}")
        message = validate_open(first, self._rules)
        session = await self._admit(message, client_key(context.peer(), message.client_id, self._authenticated))
        try:
            await self._prefill(session, context)
            self._scheduler.session_started()
            session.stepping = True
            if session.kind is SessionKind.VERIFY:
                await self._verify_loop(session, inbox, context)
            else:
                await self._generate_loop(session, inbox, context)
        finally:
            self._end(session)

    async def _admit(self, message: SessionOpen, client: str | None) -> Session:
        budget = session_token_budget(message, self._rules.limits)
        reserve = budget * self._kv_bytes_per_token
        try:
            await self._admission.admit(client, reserve)
        except SessionError:
            self._metrics.sessions_refused.inc()
            raise
        session = Session(message, budget, reserve, client=client, expires_s=self._clock() + self._ttl_s)
        self._metrics.sessions.labels(kind=message.kind.value).inc()
        self._metrics.sessions_active.inc()
        logger.info(
            "session %s opened: %s, %d prompt tokens, client %r (%s)",
            session.id,
            message.kind.value,
            session.prompt_length,
            message.client_id,
            client,
        )
        return session

    def _end(self, session: Session) -> None:
        """The session's logical end (idempotent): free its slot and reservation, now."""
        if session.ended:
            return
        session.ended = True
        if session.stepping:
            self._scheduler.session_ended()
        self._admission.release(session.client, session.reserved_bytes)
        self._metrics.sessions_active.dec()
        logger.info("session %s ended at %d tokens", session.id, session.committed_length)

    async def _finish(self, session: Session, context: grpc.aio.ServicerContext, done: SessionDone) -> None:
        """End the session, then say so; the edge may already be gone, which is fine now."""
        self._end(session)
        try:
            await _write(context, codec.encode_cloud_frame(done))
        except _StreamGone as gone:
            logger.debug("session %s: SessionDone not delivered: %s", session.id, gone)

    async def _prefill(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        start = time.perf_counter()
        prefill_ids = session.prefill_ids()
        if prefill_ids:
            session.kv = await self._scheduler.prefill(prefill_ids)
        prefill_ms = (time.perf_counter() - start) * 1e3
        ready = SessionReady(session_id=session.id, prompt_length=session.prompt_length, prefill_ms=prefill_ms)
        await _write(context, codec.encode_cloud_frame(ready))

    async def _verify_loop(
        self, session: Session, inbox: asyncio.Queue[_InboxItem], context: grpc.aio.ServicerContext
    ) -> None:
        while True:
            item = await self._next(inbox, session)
            if isinstance(item, _EndOfStream | SessionClose):
                await self._finish(session, context, SessionDone(reason="closed"))
                return
            if isinstance(item, SessionOpen):
                raise invalid("a second SessionOpen in one session")
            verdict = await self._verify(session, item)
            await _write(context, codec.encode_cloud_frame(verdict))

    async def _verify(self, session: Session, frame: DraftFrame) -> Verdict:
        """prefill'd context + frame -> target step -> judge -> rollback: the verdict."""
        self._metrics.frames.inc()
        if frame.epoch < session.epoch:
            self._metrics.stale_frames.inc()
            return session.stale_verdict(frame)
        validate_frame(frame, session, self._rules)
        output = await self._scheduler.step(session.step_row(frame))
        start = time.perf_counter()
        outcome = judge_frame(output.logits, frame, session.open.sampling, session.open.return_top_k)
        compute_ms = output.compute_ms + (time.perf_counter() - start) * 1e3
        self._metrics.verified_tokens.inc(len(frame.draft_ids))
        self._metrics.accepted_tokens.inc(outcome.num_accepted)
        self._metrics.committed_tokens.inc(len(frame.committed_ids))
        return session.apply_verdict(frame, outcome, output.kv, compute_ms)

    async def _generate_loop(
        self, session: Session, inbox: asyncio.Queue[_InboxItem], context: grpc.aio.ServicerContext
    ) -> None:
        while (reason := session.generation_done()) is None:
            if _close_requested(inbox):
                reason = "cancelled"
                break
            if self._clock() >= session.expires_s:
                raise self._expired()
            output = await self._scheduler.step(ForwardRow(session.kv, session.pending_ids(), num_logits=1))
            token = generate_token(output.logits[-1], session.open.sampling, position=session.committed_length)
            session.append_generated(token, output.kv)
            self._metrics.generated_tokens.inc()
            await _write(context, codec.encode_cloud_frame(GeneratedTokens(ids=(token,), compute_ms=output.compute_ms)))
        await self._finish(session, context, SessionDone(reason=reason, num_generated=session.num_generated))

    async def _next(
        self, inbox: asyncio.Queue[_InboxItem], session: Session | None = None
    ) -> codec.EdgeMessage | _EndOfStream:
        """The next edge message; a session silent for ``session_idle_s`` or past its TTL is ended."""
        remaining_s = math.inf if session is None else session.expires_s - self._clock()
        if remaining_s <= 0:
            raise self._expired()
        try:
            item = await asyncio.wait_for(inbox.get(), min(self._idle_s, remaining_s))
        except TimeoutError as error:
            if remaining_s <= self._idle_s:
                raise self._expired() from error
            raise SessionError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the edge sent nothing for {self._idle_s:g} s (session_idle_s): session reclaimed",
            ) from error
        if isinstance(item, SessionError):
            raise item
        return item

    def _expired(self) -> SessionError:
        return SessionError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the session reached its {self._ttl_s:g} s limit (session_ttl_s): continue in a new session",
        )

    async def _fail(self, context: grpc.aio.ServicerContext, error: SessionError) -> None:
        """Send an ``Error`` frame, then end the call with the error's status."""
        self._metrics.session_errors.labels(code=error.code.name).inc()
        logger.info("session refused or ended: %s: %s", error.code.name, error.message)
        try:
            await _write(context, codec.encode_error(error.code.value[0], error.message, error.seq))
        except _StreamGone as gone:
            logger.debug("could not send the Error frame: %s", gone)
        context.set_code(error.code)
        context.set_details(error.message)


async def _write(context: grpc.aio.ServicerContext, frame: pb.CloudFrame) -> None:
    """Write one frame; a stream the edge has left raises :class:`_StreamGone`."""
    try:
        await context.write(frame)
    except Exception as error:  # grpc raises several types here (ExecuteBatchError, UsageError, ...)
        raise _StreamGone(f"{type(error).__name__}: {error}") from error


def _close_requested(inbox: asyncio.Queue[_InboxItem]) -> bool:
    """GENERATE sessions: has the edge sent ``SessionClose``? (A half-close is not a cancel.)"""
    while not inbox.empty():
        item = inbox.get_nowait()
        if isinstance(item, SessionClose):
            return True
        if isinstance(item, SessionError):
            raise item
        if isinstance(item, DraftFrame | SessionOpen):
            raise invalid(f"a GENERATE session takes no {type(item).__name__}")
    return False


async def _read_frames(context: grpc.aio.ServicerContext, inbox: asyncio.Queue[_InboxItem]) -> None:
    """Parse the edge's frames into ``inbox`` until the stream ends or a frame is malformed."""
    while True:
        try:
            raw = await context.read()
        except (grpc.RpcError, RuntimeError, asyncio.InvalidStateError) as error:
            await inbox.put(SessionError(grpc.StatusCode.CANCELLED, f"reading the stream failed: {error}"))
            return
        if raw is grpc.aio.EOF:
            await inbox.put(_END)
            return
        try:
            message = parse_edge_frame(raw)
        except SessionError as error:
            await inbox.put(error)
            return
        await inbox.put(message)

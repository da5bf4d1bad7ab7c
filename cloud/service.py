"""The ``tandemspec.v1.Verifier`` service: ``Info`` and the ``Decode`` session loop.

One ``Decode`` call is one session::

    read SessionOpen -> validate -> admit -> prefill -> SessionReady
    VERIFY:   per DraftFrame, in order: stale? -> validate -> target step -> judge -> Verdict
    GENERATE: per token: target step -> choose -> GeneratedTokens ... -> SessionDone

A reader task parses incoming frames into a small bounded inbox (so gRPC flow control
still applies), which lets the session time out when idle and notice a ``SessionClose``
while generating. Any :class:`SessionError` ends that session with an ``Error`` frame and
its status code; nothing a client sends can end the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TypeAlias

import grpc

from tandemspec.cloud.metrics import VerifierMetrics
from tandemspec.cloud.scheduler import BatchScheduler
from tandemspec.cloud.session import (
    AdmissionBook,
    Session,
    SessionError,
    SessionRules,
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
        session_ttl_s: float,
    ) -> None:
        self._info = info
        self._rules = rules
        self._scheduler = scheduler
        self._admission = admission
        self._metrics = metrics
        self._kv_bytes_per_token = kv_bytes_per_token
        self._ttl_s = session_ttl_s

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
        session = self._admit(validate_open(first, self._rules))
        try:
            await self._prefill(session, context)
            self._scheduler.session_started()
            try:
                if session.kind is SessionKind.VERIFY:
                    await self._verify_loop(session, inbox, context)
                else:
                    await self._generate_loop(session, inbox, context)
            finally:
                self._scheduler.session_ended()
        finally:
            self._release(session)

    def _admit(self, message: SessionOpen) -> Session:
        budget = session_token_budget(message, self._rules.limits)
        reserve = budget * self._kv_bytes_per_token
        try:
            self._admission.admit(reserve)
        except SessionError:
            self._metrics.sessions_refused.inc()
            raise
        session = Session(message, budget, reserve)
        self._metrics.sessions.labels(kind=message.kind.value).inc()
        self._metrics.sessions_active.inc()
        logger.info(
            "session %s opened: %s, %d prompt tokens, client %r",
            session.id,
            message.kind.value,
            session.prompt_length,
            message.client_id,
        )
        return session

    def _release(self, session: Session) -> None:
        self._admission.release(session.reserved_bytes)
        self._metrics.sessions_active.dec()
        logger.info("session %s ended at %d tokens", session.id, session.committed_length)

    async def _prefill(self, session: Session, context: grpc.aio.ServicerContext) -> None:
        start = time.perf_counter()
        prefill_ids = session.prefill_ids()
        if prefill_ids:
            output = await self._scheduler.prefill(prefill_ids)
            session.kv = output.kv
        prefill_ms = (time.perf_counter() - start) * 1e3
        ready = SessionReady(session_id=session.id, prompt_length=session.prompt_length, prefill_ms=prefill_ms)
        await context.write(codec.encode_cloud_frame(ready))

    async def _verify_loop(
        self, session: Session, inbox: asyncio.Queue[_InboxItem], context: grpc.aio.ServicerContext
    ) -> None:
        while True:
            item = await self._next(inbox)
            if isinstance(item, _EndOfStream | SessionClose):
                await context.write(codec.encode_cloud_frame(SessionDone(reason="closed")))
                return
            if isinstance(item, SessionOpen):
                raise invalid("a second SessionOpen in one session")
            verdict = await self._verify(session, item)
            await context.write(codec.encode_cloud_frame(verdict))

    async def _verify(self, session: Session, frame: DraftFrame) -> Verdict:
        """prefill'd context + frame -> target step -> judge -> rollback: the verdict."""
        self._metrics.frames.inc()
        if frame.epoch < session.epoch:
            self._metrics.stale_frames.inc()
            return session.stale_verdict(frame)
        validate_frame(frame, session, self._rules)
        output = await self._scheduler.step(ForwardRow(session.kv, session.pending_ids(frame)))
        start = time.perf_counter()
        num_judged = 1 + frame.num_tokens  # the pending token, then committed and draft tokens
        outcome = judge_frame(output.logits[-num_judged:], frame, session.open.sampling, session.open.return_top_k)
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
            output = await self._scheduler.step(ForwardRow(session.kv, session.pending_ids()))
            token = generate_token(output.logits[-1], session.open.sampling, position=session.committed_length)
            session.append_generated(token, output.kv)
            self._metrics.generated_tokens.inc()
            await context.write(codec.encode_cloud_frame(GeneratedTokens(ids=(token,), compute_ms=output.compute_ms)))
        done = SessionDone(reason=reason, num_generated=session.num_generated)
        await context.write(codec.encode_cloud_frame(done))

    async def _next(self, inbox: asyncio.Queue[_InboxItem]) -> codec.EdgeMessage | _EndOfStream:
        """The next edge message; an idle session past its TTL is ended."""
        try:
            item = await asyncio.wait_for(inbox.get(), self._ttl_s)
        except TimeoutError as error:
            raise SessionError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"session idle for more than {self._ttl_s:g} s"
            ) from error
        if isinstance(item, SessionError):
            raise item
        return item

    async def _fail(self, context: grpc.aio.ServicerContext, error: SessionError) -> None:
        """Send an ``Error`` frame, then end the call with the error's status."""
        self._metrics.session_errors.labels(code=error.code.name).inc()
        logger.info("session refused or ended: %s: %s", error.code.name, error.message)
        try:
            await context.write(codec.encode_error(error.code.value[0], error.message, error.seq))
        except (grpc.RpcError, RuntimeError, asyncio.InvalidStateError) as write_error:
            logger.debug("could not send the Error frame: %s", write_error)
        context.set_code(error.code)
        context.set_details(error.message)


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

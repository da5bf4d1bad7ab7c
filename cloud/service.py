"""The ``tandemspec.v1.Verifier`` service: ``Info`` and the ``Decode`` session loop.

One ``Decode`` call is one session::

    read SessionOpen -> validate -> admit -> prefill -> SessionReady
    VERIFY:   per DraftFrame, in order: stale? -> validate -> target step -> judge -> Verdict
              (a queued continuation shares its predecessor's step: two verdicts, in order)
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
import dataclasses
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
    check_branch,
    client_key,
    invalid,
    session_token_budget,
    split_merged,
    validate_frame,
    validate_open,
)
from tandemspec.cloud.target import ForwardRow
from tandemspec.cloud.verify import Stream, generate_token, judge_frame, merge_frames
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


class _Inbox:
    """A session's inbox with one message of lookahead (a queued continuation is read early)."""

    def __init__(self, queue: asyncio.Queue[_InboxItem]) -> None:
        self.queue = queue
        self.held: _InboxItem | None = None

    def peek(self) -> _InboxItem | None:
        """The next message if one has arrived, left to be read."""
        if self.held is None and not self.queue.empty():
            self.held = self.queue.get_nowait()
        return self.held

    def take(self) -> _InboxItem | None:
        """The message :meth:`peek` returned, now read."""
        held, self.held = self.held, None
        return held


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
        queue: asyncio.Queue[_InboxItem] = asyncio.Queue(maxsize=_INBOX_FRAMES)
        reader = asyncio.create_task(_read_frames(context, queue))
        inbox = _Inbox(queue)
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

    async def _serve_session(self, inbox: _Inbox, context: grpc.aio.ServicerContext) -> None:
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

    async def _verify_loop(self, session: Session, inbox: _Inbox, context: grpc.aio.ServicerContext) -> None:
        while True:
            item = await self._next(inbox, session)
            if isinstance(item, _EndOfStream | SessionClose):
                await self._finish(session, context, SessionDone(reason="closed"))
                return
            if isinstance(item, SessionOpen):
                raise invalid("a second SessionOpen in one session")
            for verdict in await self._verify(session, item, inbox):
                await _write(context, codec.encode_cloud_frame(verdict))

    async def _verify(self, session: Session, frame: DraftFrame, inbox: _Inbox) -> list[Verdict]:
        """prefill'd context + frame (+ its queued continuation) -> target step -> judge -> rollback: the verdicts."""
        taken = time.perf_counter()
        self._metrics.frames.inc()
        if frame.branch_of is not None:
            check_branch(frame, session)
            rebased = session.rebase_branch(frame)
            self._metrics.branch_frames.labels(outcome="miss" if rebased is None else "hit").inc()
            if rebased is None:  # a wrong guess: no pass, and the bonus rule still holds for the next frame
                return [session.stale_verdict(frame)]
        else:
            rebased = session.rebase_on_bonus(frame) if frame.epoch >= session.epoch else None
            if rebased is None:  # an older epoch's frame, or a continuation that does not start with the bonus
                session.bonus_kept = False
                self._metrics.stale_frames.inc()
                return [session.stale_verdict(frame)]
        session.bonus_kept = False
        first = rebased.frame
        validate_frame(first, session, self._rules)
        merged: list[tuple[DraftFrame, DraftFrame, tuple[Stream, ...]]] = []

        def regrow() -> ForwardRow | None:
            """When the step's batch is taken: merge the continuation if it has arrived meanwhile."""
            later = self._queued_continuation(session, first, inbox)
            if later is None:
                return None
            judged, streams = merge_frames(first, later)
            merged.append((judged, later, streams))
            return session.step_row(judged)

        output = await self._scheduler.step(session.step_row(first), regrow if first.expects_continuation else None)
        judged, later, streams = merged[0] if merged else (first, None, ())
        start = time.perf_counter()
        sampling, top_k = session.open.sampling, session.open.return_top_k
        defer = session.defers_bonus(judged)
        outcome = judge_frame(output.logits, judged, sampling, top_k, defer_bonus=defer, streams=streams)
        compute_ms = output.compute_ms + (time.perf_counter() - start) * 1e3
        self._metrics.verified_tokens.inc(len(judged.draft_ids))
        self._metrics.accepted_tokens.inc(outcome.num_accepted)
        self._metrics.committed_tokens.inc(len(judged.committed_ids))
        epoch_before = session.epoch
        verdict = session.apply_verdict(judged, outcome, output.kv, compute_ms)
        if judged.expects_continuation and outcome.fully_accepted and not defer:
            session.bonus_kept = True  # the next frame may be a continuation drafted before this bonus
            self._metrics.bonus_kept.inc()
        session.last_judged_seq = frame.seq
        verdict = dataclasses.replace(verdict, server_ms=(time.perf_counter() - taken) * 1e3)
        if later is None:
            return [rebased.verdict_for_sent(verdict, frame)]
        verdicts = split_merged(verdict, first, later, epoch_before)
        if verdicts[1].stale:  # its predecessor was not fully accepted
            self._metrics.stale_frames.inc()
        else:
            self._metrics.merged_frames.inc()
            session.last_judged_seq = later.seq
        return [rebased.verdict_for_sent(verdicts[0], frame), verdicts[1]]

    def _queued_continuation(self, session: Session, first: DraftFrame, inbox: _Inbox) -> DraftFrame | None:
        """The continuation of ``first`` if it has already arrived and may share its pass (read from the inbox)."""
        if not first.expects_continuation:
            return None
        later = inbox.peek()
        if not isinstance(later, DraftFrame) or not session.is_continuation(later, first):
            return None
        if first.position + first.num_tokens + later.num_tokens + 1 > session.max_tokens:
            return None  # the pass would feed past the session's budget (a tree's off-tip nodes)
        try:
            validate_frame(later, session, self._rules, position=later.position)
        except SessionError:
            return None  # refused in its own turn, after its predecessor's verdict
        inbox.take()
        self._metrics.frames.inc()
        return later

    async def _generate_loop(self, session: Session, inbox: _Inbox, context: grpc.aio.ServicerContext) -> None:
        while (reason := session.generation_done()) is None:
            if _close_requested(inbox.queue):
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

    async def _next(self, inbox: _Inbox, session: Session | None = None) -> codec.EdgeMessage | _EndOfStream:
        """The next edge message; a session silent for ``session_idle_s`` or past its TTL is ended."""
        remaining_s = math.inf if session is None else session.expires_s - self._clock()
        if remaining_s <= 0:
            raise self._expired()
        try:
            held = inbox.take()
            wait_s = min(self._idle_s, remaining_s)
            item = held if held is not None else await asyncio.wait_for(inbox.queue.get(), wait_s)
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

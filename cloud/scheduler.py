"""Cross-session batching: gather ready steps from many sessions into one target forward.

Policy (after SpecEdge's lessons, docs/architecture.md "Cloud verifier"):

* a batch opens when the first step arrives and closes after ``window_s`` or earlier,
  when it is full or when every active session already has a step in it (waiting longer
  could add nothing); it pads only to what is in it;
* prefills of new sessions never join a step batch that others wait on: they run as their
  own forward passes of at most ``prefill_chunk_tokens`` tokens between step batches, so a
  long prompt delays a batch by at most one chunk; while both wait, prefill chunks get as
  much forward time as the step batch before them had (a busy verifier keeps admitting:
  under a churn of short sessions prefills would otherwise pile up behind the steps);
* among waiting prefills the one with the fewest tokens left goes next (shortest remaining
  first), so a short handshake waits for at most one chunk of the long prompts ahead of it,
  not for all of them; a prefill waiting longer than ``prefill_max_wait_s`` goes first
  (oldest first), so no prompt is starved by a stream of shorter ones;
* a step may be *regrown* when its batch is taken (``step(row, regrow)``): the verify loop
  merges a continuation that arrived while the step waited (docs/architecture.md "Pipelining");
* the target runs in one worker thread, so the event loop keeps serving streams while it
  computes, and forward passes never overlap.

With batching off every step is its own forward pass (still serialised on the worker).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tandemspec.cloud.metrics import VerifierMetrics
from tandemspec.cloud.target import ForwardOutput, ForwardRow, SessionKV, TargetModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """How the scheduler forms batches."""

    enabled: bool = True
    window_s: float = 0.002
    max_batch_size: int = 32
    prefill_chunk_tokens: int = 128
    prefill_max_wait_s: float = 0.5  # past this wait a prefill is served oldest-first, whatever its length


Regrow = Callable[[], ForwardRow | None]  # a step's replacement row when its batch is taken, or None


@dataclass(frozen=True)
class _Job:
    row: ForwardRow
    future: asyncio.Future[ForwardOutput]
    arrived_s: float
    regrow: Regrow | None = None

    def final_row(self) -> ForwardRow:
        """The row to run: :attr:`regrow`'s replacement, if any, else the submitted one."""
        return (self.regrow() if self.regrow is not None else None) or self.row


@dataclass
class _Prefill:
    """A prompt being fed chunk by chunk; ``kv`` holds what has been fed so far."""

    input_ids: tuple[int, ...]
    future: asyncio.Future[SessionKV]
    arrived_s: float
    kv: SessionKV = field(default_factory=SessionKV.empty)

    @property
    def num_remaining(self) -> int:
        return len(self.input_ids) - self.kv.length


class BatchScheduler:
    """Runs sessions' forward passes on the target, batching steps across sessions."""

    def __init__(
        self,
        target: TargetModel,
        policy: BatchPolicy,
        metrics: VerifierMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._steps: collections.deque[_Job] = collections.deque()
        self._prefills: list[_Prefill] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-target")
        self._task: asyncio.Task[None] | None = None
        self._active_sessions = 0

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tandem-scheduler")

    async def close(self) -> None:
        """Stop the loop, fail what is still queued, and release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in self._steps:
            job.future.cancel()
        for prefill in self._prefills:
            prefill.future.cancel()
        self._steps.clear()
        self._prefills.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def session_started(self) -> None:
        """A session may now submit steps (used to close a batch early)."""
        self._active_sessions += 1

    def session_ended(self) -> None:
        self._active_sessions -= 1

    async def prefill(self, input_ids: Sequence[int]) -> SessionKV:
        """Feed a new session's prompt (chunked, between step batches; no logits); returns its cache."""
        if self._task is None:
            raise RuntimeError("the scheduler is not running")
        future: asyncio.Future[SessionKV] = asyncio.get_running_loop().create_future()
        self._prefills.append(_Prefill(tuple(input_ids), future, self._clock()))
        self._wake.set()
        return await future

    async def step(self, row: ForwardRow, regrow: Regrow | None = None) -> ForwardOutput:
        """One verify or generate step of a session, batched with others' steps.

        ``regrow``: called once when the step's batch is taken; a row it returns runs instead of ``row``.
        """
        if self._task is None:
            raise RuntimeError("the scheduler is not running")
        future: asyncio.Future[ForwardOutput] = asyncio.get_running_loop().create_future()
        self._steps.append(_Job(row=row, future=future, arrived_s=self._clock(), regrow=regrow))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._steps and not self._prefills:
                self._wake.clear()
                await self._wake.wait()
                continue
            step_s = 0.0
            if self._steps:
                batch = await self._gather()
                if batch:
                    step_s = await self._execute(batch)
            prefill_s = 0.0
            while self._prefills and (prefill_s == 0.0 or prefill_s < step_s):
                prefill_s += await self._prefill_chunk()

    async def _prefill_chunk(self) -> float:
        """Feed one chunk of the next waiting prompt; returns the forward's seconds (0 when none ran).

        Next: the oldest prompt that has waited ``prefill_max_wait_s``, else the one with the
        fewest tokens left (ties: the oldest).
        """
        self._prefills = [job for job in self._prefills if not job.future.done()]  # drop cancelled sessions'
        if not self._prefills:
            return 0.0
        now = self._clock()
        overdue = [j for j in self._prefills if now - j.arrived_s >= self._policy.prefill_max_wait_s]
        if overdue:
            job = min(overdue, key=lambda j: j.arrived_s)
        else:
            job = min(self._prefills, key=lambda j: (j.num_remaining, j.arrived_s))
        start = job.kv.length
        chunk = job.input_ids[start : start + self._policy.prefill_chunk_tokens]
        started = self._clock()
        try:
            (output,) = await self._forward([ForwardRow(job.kv, chunk, num_logits=0)], phase="prefill")
        except Exception as error:  # a failed forward fails its session, not the server
            self._prefills.remove(job)
            if not job.future.done():
                job.future.set_exception(error)
            return self._clock() - started
        job.kv = output.kv
        if job.num_remaining == 0:
            self._prefills.remove(job)
            if not job.future.done():
                job.future.set_result(job.kv)
        return max(self._clock() - started, 1e-9)  # > 0: a chunk ran

    async def _gather(self) -> list[_Job]:
        """Wait for the batch window (unless the batch is full), then take up to a batch of live steps."""
        policy = self._policy
        if policy.enabled:
            deadline = self._steps[0].arrived_s + policy.window_s
            while not self._batch_complete() and (remaining := deadline - self._clock()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
        limit = policy.max_batch_size if policy.enabled else 1
        batch: list[_Job] = []
        while self._steps and len(batch) < limit:
            job = self._steps.popleft()
            if not job.future.done():  # a cancelled session's step is dropped
                batch.append(job)
        return batch

    def _batch_complete(self) -> bool:
        live = sum(1 for job in self._steps if not job.future.done())
        return live >= self._policy.max_batch_size or live >= self._active_sessions

    async def _execute(self, batch: list[_Job]) -> float:
        """Run one step batch; returns its forward's seconds."""
        started = self._clock()
        try:
            outputs = await self._forward([job.final_row() for job in batch], phase="step")
        except Exception as error:  # a failed forward fails its sessions, not the server
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return self._clock() - started
        for job, output in zip(batch, outputs, strict=True):
            if not job.future.done():
                job.future.set_result(output)
        return self._clock() - started

    async def _forward(self, rows: list[ForwardRow], phase: str) -> list[ForwardOutput]:
        """One target forward pass on the worker thread (``phase``: prefill or step), recorded."""
        start = self._clock()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._target.forward, rows)
        except Exception:
            logger.exception("target forward of %d rows failed", len(rows))
            raise
        self._metrics.observe_forward(phase, len(rows), self._clock() - start)
        return outputs

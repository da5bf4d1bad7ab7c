"""Cross-session batching: gather ready steps from many sessions into one target forward.

Policy (after SpecEdge's lessons, docs/architecture.md "Cloud verifier"):

* a batch opens when the first step arrives and closes after ``window_s`` or earlier,
  when it is full or when every active session already has a step in it (waiting longer
  could add nothing); it pads only to what is in it;
* prefills of new sessions never join a step batch that others wait on: they run as their
  own forward passes, one between step batches, so a long prompt delays a batch by at most
  one prefill;
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
from dataclasses import dataclass

from tandemspec.cloud.metrics import VerifierMetrics
from tandemspec.cloud.target import ForwardOutput, ForwardRow, SessionKV, TargetModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """How the scheduler forms batches."""

    enabled: bool = True
    window_s: float = 0.002
    max_batch_size: int = 32


@dataclass(frozen=True)
class _Job:
    row: ForwardRow
    future: asyncio.Future[ForwardOutput]
    arrived_s: float


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
        self._prefills: collections.deque[_Job] = collections.deque()
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
        for job in (*self._steps, *self._prefills):
            job.future.cancel()
        self._steps.clear()
        self._prefills.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def session_started(self) -> None:
        """A session may now submit steps (used to close a batch early)."""
        self._active_sessions += 1

    def session_ended(self) -> None:
        self._active_sessions -= 1

    async def prefill(self, input_ids: Sequence[int]) -> ForwardOutput:
        """Feed a new session's prompt in its own forward pass."""
        return await self._submit(self._prefills, ForwardRow(kv=SessionKV.empty(), input_ids=tuple(input_ids)))

    async def step(self, row: ForwardRow) -> ForwardOutput:
        """One verify or generate step of a session, batched with others' steps."""
        return await self._submit(self._steps, row)

    async def _submit(self, queue: collections.deque[_Job], row: ForwardRow) -> ForwardOutput:
        if self._task is None:
            raise RuntimeError("the scheduler is not running")
        future: asyncio.Future[ForwardOutput] = asyncio.get_running_loop().create_future()
        queue.append(_Job(row=row, future=future, arrived_s=self._clock()))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._steps and not self._prefills:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._steps:
                batch = await self._gather()
                if batch:
                    await self._execute(batch, phase="step")
            if self._prefills:
                job = self._prefills.popleft()
                if not job.future.done():
                    await self._execute([job], phase="prefill")

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

    async def _execute(self, batch: list[_Job], phase: str) -> None:
        rows = [job.row for job in batch]
        loop = asyncio.get_running_loop()
        start = self._clock()
        try:
            outputs = await loop.run_in_executor(self._executor, self._target.forward, rows)
        except Exception as error:  # a failed forward fails its sessions, not the server
            logger.exception("target forward of %d rows failed", len(rows))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self._metrics.observe_forward(phase, len(rows), self._clock() - start)
        for job, output in zip(batch, outputs, strict=True):
            if not job.future.done():
                job.future.set_result(output)

"""The scheduler's order of work: long prefills are chunked and cannot stall a short handshake."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tandemspec.cloud.metrics import VerifierMetrics
from tandemspec.cloud.scheduler import BatchPolicy, BatchScheduler
from tandemspec.cloud.target import ForwardOutput, ForwardRow, SessionKV, TargetModel


class RecordingTarget:
    """A real target that records each forward pass as (number of rows, tokens of row 0)."""

    def __init__(self, target: TargetModel) -> None:
        self.target = target
        self.passes: list[tuple[int, int]] = []

    def forward(self, rows: Sequence[ForwardRow]) -> list[ForwardOutput]:
        self.passes.append((len(rows), len(rows[0].input_ids)))
        return self.target.forward(rows)


def test_a_short_prefill_waits_for_one_chunk_not_for_every_long_prompt(llama_target_dir: Path) -> None:
    """8 prompts of 500 tokens, then one of 6: the short one is done after at most two forward
    passes (one 128-token chunk may already run), and each long prompt's cache equals an
    unchunked prefill's."""
    target = TargetModel.load(llama_target_dir, "cpu")
    recording = RecordingTarget(target)
    long_prompts = [tuple((7 * i + j) % 380 + 3 for j in range(500)) for i in range(8)]
    short_prompt = (5, 9, 11, 40, 41, 42)

    async def run() -> tuple[list[SessionKV], int]:
        scheduler = BatchScheduler(recording, BatchPolicy(), VerifierMetrics())  # type: ignore[arg-type]
        scheduler.start()
        try:
            long_tasks = [asyncio.create_task(scheduler.prefill(prompt)) for prompt in long_prompts]
            await asyncio.sleep(0)  # the long prompts are queued (and one may start) first
            short_kv = await scheduler.prefill(short_prompt)
            passes_before_short = len(recording.passes)
            assert short_kv.length == len(short_prompt)
            return list(await asyncio.gather(*long_tasks)), passes_before_short
        finally:
            await scheduler.close()

    long_kvs, passes_before_short = asyncio.run(run())
    assert passes_before_short <= 2, recording.passes
    assert max(tokens for _, tokens in recording.passes) <= 128
    assert len(recording.passes) == 8 * 4 + 1  # ceil(500 / 128) chunks per long prompt, one short
    for prompt, kv in zip(long_prompts[:2], long_kvs[:2], strict=True):
        whole = target.prefill(prompt).kv
        assert kv.length == whole.length == len(prompt)
        for (k1, v1), (k2, v2) in zip(kv.layers, whole.layers, strict=True):
            torch.testing.assert_close(k1, k2, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(v1, v2, atol=1e-4, rtol=1e-4)


def test_a_prefill_past_its_longest_wait_goes_first(llama_target_dir: Path) -> None:
    """Shortest-first alone starves a long prompt behind a stream of short ones; once a prompt
    has waited ``prefill_max_wait_s`` it goes first (oldest first)."""
    target = TargetModel.load(llama_target_dir, "cpu")
    long_prompt = tuple(j % 380 + 3 for j in range(400))
    short_prompts = [(5, 9, 11 + i) for i in range(5)]

    def finishing_order(clock: Callable[[], float]) -> list[str]:
        async def run() -> list[str]:
            policy = BatchPolicy(prefill_max_wait_s=0.5)
            scheduler = BatchScheduler(target, policy, VerifierMetrics(), clock=clock)
            scheduler.start()
            order: list[str] = []

            async def prefill(name: str, prompt: tuple[int, ...]) -> None:
                await scheduler.prefill(prompt)
                order.append(name)

            try:
                tasks = [asyncio.create_task(prefill("long", long_prompt))]
                await asyncio.sleep(0)
                tasks += [asyncio.create_task(prefill(f"short{i}", p)) for i, p in enumerate(short_prompts)]
                await asyncio.gather(*tasks)
            finally:
                await scheduler.close()
            return order

        return asyncio.run(run())

    frozen = finishing_order(lambda: 0.0)  # nobody is ever overdue: shortest first
    assert frozen[-1] == "long"
    ticks = iter(range(10**6))
    aging = finishing_order(lambda: float(next(ticks)))  # a second per reading: the long prompt is overdue
    assert aging.index("long") < len(short_prompts)  # it no longer waits for every shorter one

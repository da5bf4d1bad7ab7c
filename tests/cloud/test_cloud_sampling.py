"""Sampling through the server follows the target's distribution; cloud-only generation works.

Losslessness test (after vLLM's rejection-sampler test): many sessions with different
seeds each verify one token drafted from a deliberately different drafter q. The token the
edge ends up with at the first new position (the accepted draft, else the correction)
must be distributed as the target's processed p. The empirical total variation of N samples
over K outcomes has expectation at most 0.5 * sqrt(K / N), and by McDiarmid's inequality
exceeds that by more than sqrt(ln(1 / delta) / (2 N)) with probability at most delta.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cloud_driver import DecodeStream, next_logits, open_message, target_greedy

from tandemspec.sampling import process_logits, sample, truncate
from tandemspec.types import (
    DraftFrame,
    GeneratedTokens,
    SamplingParams,
    SessionClose,
    SessionDone,
    SessionKind,
    Verdict,
)

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
NUM_SESSIONS = 600
CONCURRENCY = 16
DELTA = 1e-4  # allowed false-failure probability


def tv_bound(num_outcomes: int, num_samples: int, delta: float = DELTA) -> float:
    """Total variation an exact sampler exceeds with probability at most ``delta``."""
    return 0.5 * math.sqrt(num_outcomes / num_samples) + math.sqrt(math.log(1 / delta) / (2 * num_samples))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def test_sampling_verification_follows_the_target_distribution(
    llama_server: Any,
    llama_target_dir: Path,
    tiny_model_dir: Callable[..., Path],
    load_model: Callable[[Path], Any],
    fingerprint: str,
) -> None:
    sampling = SamplingParams(temperature=1.0, top_k=6)
    p = process_logits(next_logits(load_model(llama_target_dir), PROMPT)[None], sampling)[0]  # [vocab]
    drafter_probs = process_logits(next_logits(load_model(tiny_model_dir("llama", 1, 0.05)), PROMPT)[None], sampling)
    q = truncate(drafter_probs[0], max_support=6)  # the drafter's exact q
    q_dense = np.zeros_like(p)
    q_dense[list(q.ids)] = q.probs
    bound = tv_bound(num_outcomes=int(np.count_nonzero(p + q_dense)), num_samples=NUM_SESSIONS)
    assert total_variation(p, q_dense) > 2 * bound, "the drafter must differ from the target for the test to bite"

    async def one_session(channel: grpc.aio.Channel, seed: int, gate: asyncio.Semaphore) -> tuple[int, bool]:
        async with gate:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint, SamplingParams(1.0, 1.0, 6, seed)))
            draft = sample(q, np.random.default_rng([seed, 99]))
            await stream.send(DraftFrame(seq=0, epoch=0, position=len(PROMPT), draft_ids=(draft,), draft_dists=(q,)))
            verdict = await stream.receive()
            assert isinstance(verdict, Verdict) and len(verdict.labels) == 1
            assert await stream.finish() == grpc.StatusCode.OK
            if verdict.num_accepted == 1:
                return draft, True
            assert verdict.next_token is not None
            return verdict.next_token, False

    async def run() -> list[tuple[int, bool]]:
        gate = asyncio.Semaphore(CONCURRENCY)
        async with grpc.aio.insecure_channel(llama_server.address) as channel:
            return await asyncio.gather(*(one_session(channel, seed, gate) for seed in range(NUM_SESSIONS)))

    outcomes = asyncio.run(run())
    counts = Counter(token for token, _ in outcomes)
    empirical = np.zeros_like(p)
    for token, count in counts.items():
        empirical[token] = count / NUM_SESSIONS
    accepted = sum(ok for _, ok in outcomes)
    assert 0 < accepted < NUM_SESSIONS  # both acceptance and residual sampling were exercised
    assert set(counts) <= set(np.flatnonzero(p).tolist())  # never outside the target's support
    assert total_variation(empirical, p) < bound


async def _generate(
    address: str, fingerprint: str, sampling: SamplingParams, max_new: int, stop_ids: tuple[int, ...] = ()
) -> tuple[list[int], SessionDone]:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = DecodeStream(channel)
        await stream.open(open_message(PROMPT, fingerprint, sampling, SessionKind.GENERATE, max_new, stop_ids=stop_ids))
        await stream.call.done_writing()  # a half-close does not cancel generation
        tokens: list[int] = []
        while True:
            message = await stream.receive()
            if isinstance(message, GeneratedTokens):
                tokens.extend(message.ids)
                continue
            assert isinstance(message, SessionDone), message
            assert await stream.call.code() == grpc.StatusCode.OK
            return tokens, message


def test_generate_greedy_equals_target_greedy(
    llama_server: Any, llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    expected = target_greedy(load_model(llama_target_dir), PROMPT, 12)[len(PROMPT) :]
    tokens, done = asyncio.run(_generate(llama_server.address, fingerprint, SamplingParams(), 12))
    assert tokens == expected
    assert done.reason == "length" and done.num_generated == 12
    # A stop id ends the generation right after it is emitted.
    stopped, done = asyncio.run(_generate(llama_server.address, fingerprint, SamplingParams(), 12, (expected[3],)))
    assert stopped == expected[: expected.index(expected[3]) + 1] and done.reason == "stop"


def test_generate_sampling_is_seeded(llama_server: Any, fingerprint: str) -> None:
    def run(seed: int) -> list[int]:
        return asyncio.run(_generate(llama_server.address, fingerprint, SamplingParams(1.0, 0.9, 0, seed), 10))[0]

    first, again, other = run(3), run(3), run(4)
    assert first == again and len(first) == 10
    assert first != other


def test_session_close_cancels_generation(llama_server: Any, fingerprint: str) -> None:
    async def run() -> SessionDone:
        async with grpc.aio.insecure_channel(llama_server.address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint, kind=SessionKind.GENERATE, max_new_tokens=400))
            await stream.send(SessionClose(reason="user cancelled"))
            while not isinstance(message := await stream.receive(), SessionDone):
                assert isinstance(message, GeneratedTokens)
            assert await stream.call.code() == grpc.StatusCode.OK
            return message

    done = asyncio.run(run())
    assert done.reason == "cancelled" and done.num_generated < 400

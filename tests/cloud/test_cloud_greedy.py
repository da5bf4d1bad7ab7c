"""Greedy verification through a real server gives exactly the target-alone greedy tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_driver import DecodeStream, open_message, speculate_greedy, target_greedy, torch_greedy_drafter

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.types import DraftFrame, SessionReady, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
MAX_NEW = 24
DRAFT_LEN = 4
DRAFTER_NOISE = 0.02  # agrees with the target often, not always


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_speculative_greedy_equals_target_greedy(
    family: str, tiny_model_dir: Callable[..., Path], load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """Plain rounds (bonus tokens) and pipelined rounds (deferred bonuses, stale frames) alike."""
    target_dir = tiny_model_dir(family, 0)
    drafter = torch_greedy_drafter(load_model(tiny_model_dir(family, 1, DRAFTER_NOISE)))
    expected = target_greedy(load_model(target_dir), PROMPT, MAX_NEW)

    async def run(address: str, depth: int) -> Any:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint))
            return await speculate_greedy(stream, PROMPT, drafter, DRAFT_LEN, MAX_NEW, depth=depth)

    with serve_in_thread(CloudConfig(model_dir=target_dir)) as server:
        plain = asyncio.run(run(server.address, depth=1))
        pipelined = asyncio.run(run(server.address, depth=2))
        metrics = server.metrics.snapshot()

    assert plain.tokens[: len(expected)] == expected
    assert pipelined.tokens[: len(expected)] == expected
    assert plain.num_stale == 0 and plain.num_rejections > 0
    assert any(v.fully_accepted and v.next_token is not None for v in plain.verdicts)  # a bonus
    # Pipelining: rejections inside pipelined frames make the next frame stale.
    assert pipelined.num_rejections > 0 and pipelined.num_stale > 0
    assert any(v.fully_accepted and v.next_token is None for v in pipelined.verdicts)  # a deferred bonus
    assert metrics["stale_frames"] >= pipelined.num_stale  # finish() drains unrecorded frames
    assert metrics["sessions_active"] == 0


def test_committed_tokens_are_appended_and_labelled(
    llama_server: Any, llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """Committed tokens are never replaced, get argmax labels, and top-k rows when asked."""
    expected = target_greedy(load_model(llama_target_dir), PROMPT, 6)
    good = tuple(expected[len(PROMPT) : len(PROMPT) + 2])
    wrong = (good[1] + 1) % 300 + 3
    before = llama_server.metrics.snapshot()["committed_tokens"]

    async def run() -> tuple[Verdict, Verdict]:
        async with grpc.aio.insecure_channel(llama_server.address) as channel:
            stream = DecodeStream(channel)
            ready = await stream.open(open_message(PROMPT, fingerprint, return_top_k=3))
            assert isinstance(ready, SessionReady) and ready.prompt_length == len(PROMPT)
            # Two committed tokens (the second wrong), then one draft token after them.
            await stream.send(
                DraftFrame(seq=7, epoch=0, position=len(PROMPT), committed_ids=(good[0], wrong), draft_ids=(5,))
            )
            first = await stream.receive()
            assert isinstance(first, Verdict)
            position = first.committed_length
            await stream.send(DraftFrame(seq=8, epoch=first.epoch, position=position, committed_ids=(9,)))
            second = await stream.receive()
            assert isinstance(second, Verdict)
            assert await stream.finish() == grpc.StatusCode.OK
            return first, second

    first, second = asyncio.run(run())
    assert first.seq == 7 and first.num_committed == 2
    assert first.labels[:2] == (True, False)
    assert len(first.labels) == 3 and len(first.target_top_k) == 3
    assert all(len(d.ids) == 3 and abs(sum(d.probs) - 1) < 1e-5 for d in first.target_top_k)
    assert first.target_top_k[0].ids[0] == good[0]  # the argmax leads the top-k
    # Committed tokens stay even though the second is wrong; the draft token is judged after them.
    assert first.committed_length == len(PROMPT) + 2 + first.num_accepted + 1
    assert second.num_committed == 1 and second.num_accepted == 0 and second.next_token is not None
    assert second.committed_length == first.committed_length + 2
    assert llama_server.metrics.snapshot()["committed_tokens"] - before == 3

"""Pipelining that keeps the bonus: merged continuations and the greedy bonus rule, at the verifier."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_driver import (
    DecodeStream,
    SpecResult,
    open_message,
    speculate_greedy,
    target_greedy,
    torch_greedy_drafter,
)

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.cloud.session import split_merged
from tandemspec.cloud.verify import merge_frames
from tandemspec.types import DraftFrame, SessionOpen, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
P = len(PROMPT)
MAX_NEW = 24
DRAFT_LEN = 4
DRAFTER_NOISE = 0.02  # agrees with the target often, not always
MERGE_WINDOW_MS = 300.0  # with a second (idle) session open, every step waits this long: its continuation arrives


def test_merge_frames_hangs_the_continuation_under_the_tip() -> None:
    first = DraftFrame(seq=3, epoch=1, position=10, draft_ids=(5, 6), expects_continuation=True)
    later = DraftFrame(seq=4, epoch=1, position=12, draft_ids=(7, 8), expects_continuation=True)
    chain, streams = merge_frames(first, later)
    assert chain.draft_ids == (5, 6, 7, 8) and chain.parents == () and chain.expects_continuation
    assert (chain.seq, chain.position) == (3, 10) and streams == ((0, 10), (2, 12))
    tree = dataclasses.replace(first, draft_ids=(5, 9, 6), parents=(-1, -1, 0))  # tip 6 under 5
    forked = dataclasses.replace(later, position=12, draft_ids=(7, 8, 4), parents=(-1, -1, 0))
    merged, _ = merge_frames(tree, forked)
    assert merged.parents == (-1, -1, 0, 2, 2, 3)  # the continuation's roots under the tip (index 2)


def test_split_merged_gives_each_frame_its_verdict() -> None:
    first = DraftFrame(seq=3, epoch=1, position=10, draft_ids=(5, 6), expects_continuation=True)
    later = DraftFrame(seq=4, epoch=1, position=12, draft_ids=(7, 8))
    both = Verdict(seq=3, epoch=2, committed_length=14, num_accepted=3, next_token=9, labels=(True, True, True, False))
    own, continued = split_merged(both, first, later, epoch_before=1)
    assert (own.seq, own.epoch, own.committed_length, own.num_accepted, own.next_token) == (3, 1, 12, 2, None)
    assert own.fully_accepted and own.labels == (True, True) and not own.shared_pass
    assert (continued.seq, continued.epoch, continued.committed_length) == (4, 2, 14)
    assert continued.num_accepted == 1 and continued.next_token == 9 and continued.labels == (True, False)
    assert continued.shared_pass and not continued.fully_accepted
    short = Verdict(seq=3, epoch=2, committed_length=12, num_accepted=1, next_token=9, labels=(True, False, True, True))
    own, continued = split_merged(short, first, later, epoch_before=1)
    assert own.num_accepted == 1 and own.next_token == 9 and own.labels == (True, False) and own.epoch == 2
    assert continued.stale and continued.seq == 4 and continued.committed_length == 12


async def _speculate(address: str, fingerprint: str, drafter: Any, depth: int, hold_idle: bool) -> SpecResult:
    """The test edge on one session; ``hold_idle``: keep a second session open and silent meanwhile,
    so that every step waits for the batch window (and its pipelined continuation arrives)."""
    async with grpc.aio.insecure_channel(address) as channel:
        idle = None
        if hold_idle:
            idle = DecodeStream(channel)
            await idle.open(open_message(PROMPT, fingerprint))
        stream = DecodeStream(channel)
        await stream.open(open_message(PROMPT, fingerprint))
        result = await speculate_greedy(stream, PROMPT, drafter, DRAFT_LEN, MAX_NEW, depth=depth)
        if idle is not None:
            assert await idle.finish() == grpc.StatusCode.OK
        return result


def _as_sent(verdict: Verdict) -> Verdict:
    """A verdict without what only says how it was computed (and how long it took)."""
    return dataclasses.replace(verdict, compute_ms=0.0, server_ms=0.0, shared_pass=False)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_merged_continuations_make_the_sequential_verdicts(
    family: str, tiny_model_dir: Callable[..., Path], load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """A continuation queued while its predecessor's step waits shares that step: one target pass, and
    exactly the verdicts of the two frames judged one after the other (the first's bonus deferred),
    so the output is the target's greedy output."""
    target_dir = tiny_model_dir(family, 0)
    drafter = torch_greedy_drafter(load_model(tiny_model_dir(family, 1, DRAFTER_NOISE)))
    expected = target_greedy(load_model(target_dir), PROMPT, MAX_NEW)
    with serve_in_thread(CloudConfig(model_dir=target_dir)) as server:
        sequential = asyncio.run(_speculate(server.address, fingerprint, drafter, 2, hold_idle=False))
        plain = server.metrics.snapshot()
    with serve_in_thread(CloudConfig(model_dir=target_dir, batch_window_ms=MERGE_WINDOW_MS)) as server:
        merged = asyncio.run(_speculate(server.address, fingerprint, drafter, 2, hold_idle=True))
        metrics = server.metrics.snapshot()
    assert merged.tokens[: len(expected)] == expected
    assert [_as_sent(v) for v in merged.verdicts] == [_as_sent(v) for v in sequential.verdicts]
    # The frames still in flight at the end are judged too (the same ones: the edge saw the same verdicts).
    assert 0 < sum(v.shared_pass for v in merged.verdicts) <= metrics["merged_frames"] and plain["merged_frames"] == 0
    assert metrics["step_passes"] == plain["step_passes"] - metrics["merged_frames"]
    assert merged.num_stale > 0  # rejections inside merged passes made the continuation stale


def _bonus_open(fingerprint: str) -> SessionOpen:
    return dataclasses.replace(open_message(PROMPT, fingerprint), keeps_bonus=True)


def test_a_kept_bonus_keeps_the_continuation_that_starts_with_it(
    llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """Greedy, ``keeps_bonus``: a fully accepted pipelined frame gets its bonus; the frame after it
    is verified from the token after the bonus when it starts with the bonus, and is stale,
    with no target pass, when it does not. A session without ``keeps_bonus`` still defers."""
    target = list(target_greedy(load_model(llama_target_dir), PROMPT, 12)[P:])

    async def run(address: str, second_first: int, keeps_bonus: bool) -> list[Any]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            opened = _bonus_open(fingerprint) if keeps_bonus else open_message(PROMPT, fingerprint)
            await stream.open(opened)
            first = DraftFrame(seq=0, epoch=0, position=P, draft_ids=tuple(target[:3]), expects_continuation=True)
            later = (second_first, *target[4:6])  # drafted on the first frame's tip, before its bonus
            await stream.send(first)
            replies = [await stream.receive()]
            await stream.send(DraftFrame(seq=1, epoch=0, position=P + 3, draft_ids=later))
            replies.append(await stream.receive())
            await stream.finish()
            return replies

    with serve_in_thread(CloudConfig(model_dir=llama_target_dir)) as server:
        before = server.metrics.snapshot()["step_passes"]
        kept = asyncio.run(run(server.address, target[3], keeps_bonus=True))
        after_kept = server.metrics.snapshot()
        missed = asyncio.run(run(server.address, target[3] + 1, keeps_bonus=True))
        after_missed = server.metrics.snapshot()
        deferred = asyncio.run(run(server.address, target[3], keeps_bonus=False))
    first, second = kept
    assert first.fully_accepted and first.next_token == target[3] and first.committed_length == P + 4
    # The second frame's first token is the bonus: its path starts there and goes on.
    assert second.accepted_path[:1] == (0,) and second.labels[0] and not second.stale
    assert second.committed_length == P + 3 + second.num_accepted + 1 and second.num_accepted == 3
    assert second.next_token == target[6]
    assert after_kept["step_passes"] - before == 2 and after_kept["bonus_kept"] == 1
    first, second = missed
    assert first.next_token == target[3] and second.stale and second.committed_length == P + 4
    assert after_missed["step_passes"] - after_kept["step_passes"] == 1  # no pass for the stale frame
    first, second = deferred
    assert first.fully_accepted and first.next_token is None  # an older edge's protocol: unchanged
    assert second.num_accepted == 3 and second.next_token == target[6]

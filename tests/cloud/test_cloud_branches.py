"""Branch frames at the verifier: a guess of an awaited verdict that is verified when it came true
and answered stale, with no target pass, when it did not (docs/architecture.md "Branches")."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from cloud_driver import DecodeStream, open_message, target_greedy

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import DraftFrame, SamplingParams, SessionOpen, SparseDist, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
P = len(PROMPT)


GREEDY = SamplingParams()


def _bonus_open(fingerprint: str, sampling: SamplingParams = GREEDY) -> SessionOpen:
    return dataclasses.replace(open_message(PROMPT, fingerprint, sampling=sampling), keeps_bonus=True)


async def _exchange(address: str, opened: SessionOpen, frames: Sequence[DraftFrame]) -> tuple[list[Any], Any]:
    """Send the first frame, await its verdict, then send the others at once (as they would be queued
    behind it, unmerged: a lone session's step starts at once), read every reply, and the call's status."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = DecodeStream(channel)
        await stream.open(opened)
        await stream.send(frames[0])
        replies = [await stream.receive()]
        for frame in frames[1:]:
            await stream.send(frame)
        replies += [await stream.receive() for _ in frames[1:]]
        return replies, await stream.finish()


def _run(target_dir: Path, opened: SessionOpen, frames: Sequence[DraftFrame]) -> tuple[list[Any], Any, float]:
    with serve_in_thread(CloudConfig(model_dir=target_dir)) as server:
        replies, status = asyncio.run(_exchange(server.address, opened, frames))
        metrics = server.metrics.snapshot()
    return replies, status, metrics


def _target(llama_target_dir: Path, load_model: Callable[[Path], Any], n: int) -> list[int]:
    return list(target_greedy(load_model(llama_target_dir), PROMPT, n)[P:])


def test_a_branch_that_guessed_the_correction_is_verified_without_a_round_trip(
    llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """The frame is rejected at its second token; its continuation is stale; the branch that
    guessed that rejection and its correction is verified from its second token (its root is the
    correction), the one that guessed another correction is stale with no pass."""
    t = _target(llama_target_dir, load_model, 8)
    wrong = (t[1] + 1) % 256
    frames = [
        DraftFrame(seq=0, epoch=0, position=P, draft_ids=(t[0], wrong, t[2]), expects_continuation=True),
        DraftFrame(seq=1, epoch=0, position=P + 3, draft_ids=(t[3], t[4]), expects_continuation=True),
        DraftFrame(seq=2, epoch=1, position=P + 1, draft_ids=((t[1] + 2) % 256, t[2]), branch_of=0),
        DraftFrame(seq=3, epoch=1, position=P + 1, draft_ids=(t[1], t[2], t[3]), branch_of=0),
    ]
    replies, status, metrics = _run(llama_target_dir, _bonus_open(fingerprint), frames)
    first, continuation, miss, hit = replies
    assert status == grpc.StatusCode.OK
    assert first.num_accepted == 1 and first.next_token == t[1] and first.epoch == 1
    assert first.server_ms >= first.compute_ms > 0  # the verifier's own time, for the edge's link estimate
    assert continuation.stale and miss.stale
    assert isinstance(hit, Verdict) and not hit.stale
    assert hit.accepted_path == (0, 1, 2) and hit.labels == (True, True, True)  # the root first, then verified
    assert hit.next_token == t[4] and hit.committed_length == P + 5 and hit.epoch == 1
    assert metrics["step_passes"] == 2  # the frame and the branch: the misses cost nothing
    assert (metrics["branch_hits"], metrics["branch_misses"], metrics["stale_frames"]) == (1, 1, 1)


def test_a_branch_that_guessed_the_bonus_replaces_a_stale_continuation(
    llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """Fully accepted: the continuation, which guessed the bonus wrong, is stale by the bonus rule;
    the branch that guessed it right goes on in the same epoch."""
    t = _target(llama_target_dir, load_model, 8)
    frames = [
        DraftFrame(seq=0, epoch=0, position=P, draft_ids=tuple(t[:3]), expects_continuation=True),
        DraftFrame(seq=1, epoch=0, position=P + 3, draft_ids=((t[3] + 1) % 256, t[4]), expects_continuation=True),
        DraftFrame(seq=2, epoch=1, position=P + 1, draft_ids=((t[1] + 1) % 256, t[2]), branch_of=0),  # a rejection
        DraftFrame(seq=3, epoch=0, position=P + 3, draft_ids=(t[3], t[4], t[5]), branch_of=0),
    ]
    replies, status, metrics = _run(llama_target_dir, _bonus_open(fingerprint), frames)
    first, continuation, rejection, bonus = replies
    assert status == grpc.StatusCode.OK
    assert first.fully_accepted and first.next_token == t[3]
    assert continuation.stale and rejection.stale
    assert bonus.accepted_path == (0, 1, 2) and bonus.next_token == t[6] and bonus.committed_length == P + 7
    assert metrics["step_passes"] == 2 and metrics["branch_hits"] == 1


def test_branches_after_a_live_continuation_are_stale_and_keep_the_bonus_rule(
    llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """The continuation was right, so it is judged next and the frame's branches are stale even when
    one matches position and token; the stale branches between the continuation and its own
    continuation leave the bonus rule in force for that one."""
    t = _target(llama_target_dir, load_model, 12)
    frames = [
        DraftFrame(seq=0, epoch=0, position=P, draft_ids=tuple(t[:3]), expects_continuation=True),
        DraftFrame(seq=1, epoch=0, position=P + 3, draft_ids=tuple(t[3:6]), expects_continuation=True),
        DraftFrame(seq=2, epoch=0, position=P + 3, draft_ids=(t[3], t[4]), branch_of=0),  # the right bonus, too late
        DraftFrame(seq=3, epoch=1, position=P + 2, draft_ids=((t[2] + 1) % 256,), branch_of=0),
        DraftFrame(seq=4, epoch=0, position=P + 6, draft_ids=tuple(t[6:9])),  # continues frame 1 from its tip
    ]
    replies, status, metrics = _run(llama_target_dir, _bonus_open(fingerprint), frames)
    assert status == grpc.StatusCode.OK
    first, continuation, late, rejection, last = replies
    assert first.next_token == t[3] and continuation.accepted_path == (0, 1, 2) and continuation.next_token == t[6]
    assert late.stale and rejection.stale
    assert not last.stale and last.accepted_path == (0, 1, 2) and last.next_token == t[9]
    assert metrics["step_passes"] == 3 and metrics["branch_misses"] == 2


def test_malformed_branches_end_the_session_with_invalid_argument(
    llama_target_dir: Path, load_model: Callable[[Path], Any], fingerprint: str
) -> None:
    """Branches need a greedy session that keeps the bonus, draft tokens only, and an earlier frame."""
    t = _target(llama_target_dir, load_model, 4)
    first = DraftFrame(seq=0, epoch=0, position=P, draft_ids=tuple(t[:2]), expects_continuation=True)
    branch = DraftFrame(seq=1, epoch=1, position=P + 1, draft_ids=(t[1],), branch_of=0)
    sampled = SamplingParams(temperature=0.8, seed=1)
    cases = [
        (open_message(PROMPT, fingerprint), [first, branch], "keeps the bonus"),
        (_bonus_open(fingerprint), [first, dataclasses.replace(branch, branch_of=1)], "not an earlier one"),
        (_bonus_open(fingerprint), [first, dataclasses.replace(branch, committed_ids=(t[0],))], "draft tokens only"),
        (_bonus_open(fingerprint), [first, dataclasses.replace(branch, draft_ids=())], "draft tokens only"),
    ]
    with serve_in_thread(CloudConfig(model_dir=llama_target_dir)) as server:
        for opened, frames, reason in cases:
            replies, status = asyncio.run(_exchange(server.address, opened, frames))
            assert status == grpc.StatusCode.INVALID_ARGUMENT, reason
            assert isinstance(replies[1], pb.Error) and reason in replies[1].message and replies[1].seq == 1
        # sampling: refused too (the frames carry their q so only the branch is at fault)
        q = (SparseDist(ids=(t[0],), probs=(1.0,)), SparseDist(ids=(t[1],), probs=(1.0,)))
        sampled_first = dataclasses.replace(first, draft_dists=q)
        sampled_branch = dataclasses.replace(branch, draft_dists=q[1:])
        replies, status = asyncio.run(
            _exchange(server.address, _bonus_open(fingerprint, sampled), [sampled_first, sampled_branch])
        )
        assert status == grpc.StatusCode.INVALID_ARGUMENT and "keeps the bonus" in replies[1].message
        # and the server goes on serving
        replies, status = asyncio.run(_exchange(server.address, _bonus_open(fingerprint), [first]))
        assert status == grpc.StatusCode.OK and replies[0].fully_accepted

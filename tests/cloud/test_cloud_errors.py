"""Bad input ends that session with the right status and an Error frame; the server keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_driver import DecodeStream, open_message

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import DraftFrame, SamplingParams, SessionOpen, SparseDist, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
P = len(PROMPT)
VOCAB = 384
LIMITS = {
    "max_draft_tokens": 8,
    "max_support": 8,
    "max_return_top_k": 4,
    "max_context_tokens": 64,
    "max_new_tokens": 32,
}
SAMPLING = SamplingParams(temperature=1.0, seed=1)
Q = SparseDist(ids=(5, 6), probs=(0.5, 0.5))


@pytest.fixture(scope="module")
def strict_server(llama_target_dir: Path) -> Iterator[Any]:
    with serve_in_thread(CloudConfig(model_dir=llama_target_dir, **LIMITS)) as handle:
        yield handle


def _open(fingerprint: str, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "prompt_ids": PROMPT,
        "sampling": SamplingParams(),
        "max_new_tokens": 16,
        "tokenizer_fingerprint": fingerprint,
    }
    fields.update(changes)
    return codec.encode_edge_frame(SessionOpen(**fields)).SerializeToString()


def _frame(**changes: Any) -> bytes:
    fields: dict[str, Any] = {"seq": 0, "epoch": 0, "position": P, "draft_ids": (5, 6)}
    fields.update(changes)
    return codec.encode_edge_frame(DraftFrame(**fields)).SerializeToString()


def _cases(fp: str) -> dict[str, tuple[list[bytes], grpc.StatusCode]]:
    invalid, out_of_range = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
    sampling_open = _open(fp, sampling=SAMPLING)
    misaligned = pb.EdgeFrame(draft=pb.DraftFrame(position=P, draft_ids=[5, 6], draft_dists=[codec.encode_sparse(Q)]))
    wrong_nested = b"\x12\x03" + b"\x1a\x01x"  # DraftFrame.position (varint) sent length-delimited
    return {
        "fingerprint mismatch": ([_open("sha256:other")], grpc.StatusCode.FAILED_PRECONDITION),
        "prompt id outside vocab": ([_open(fp, prompt_ids=(1, VOCAB))], invalid),
        "empty prompt": ([_open(fp, prompt_ids=())], invalid),
        "max_new_tokens over limit": ([_open(fp, max_new_tokens=33)], invalid),
        "return_top_k over limit": ([_open(fp, return_top_k=5)], invalid),
        "frame before handshake": ([_frame()], invalid),
        "second handshake": ([_open(fp), _open(fp)], invalid),
        "draft id outside vocab": ([_open(fp), _frame(draft_ids=(5, VOCAB + 7))], invalid),
        "committed id outside vocab": ([_open(fp), _frame(committed_ids=(VOCAB,))], invalid),
        "oversize draft": ([_open(fp), _frame(draft_ids=tuple(range(3, 12)))], invalid),
        "position ahead": ([_open(fp), _frame(position=P + 1)], invalid),
        "position behind": ([_open(fp), _frame(position=P - 1)], invalid),
        "future epoch": ([_open(fp), _frame(epoch=1)], invalid),
        "malformed bytes": ([_open(fp), b"\x12\xff\xff"], invalid),
        "wrong wire type": ([_open(fp), b"\x10\x05"], invalid),
        "wrong wire type nested": ([_open(fp), wrong_nested], invalid),
        "empty edge frame": ([_open(fp), b""], invalid),
        "q missing in sampling mode": ([sampling_open, _frame()], invalid),
        "q misaligned": ([sampling_open, misaligned.SerializeToString()], invalid),
        "q support too large": (
            [sampling_open, _frame(draft_ids=(5,), draft_dists=(SparseDist(tuple(range(5, 14)), (1 / 9,) * 9),))],
            invalid,
        ),
        "q not a distribution": (
            [sampling_open, _frame(draft_ids=(5,), draft_dists=(SparseDist((5, 6), (0.9, 0.9)),))],
            invalid,
        ),
        "q id outside vocab": (
            [sampling_open, _frame(draft_ids=(5,), draft_dists=(SparseDist((5, VOCAB), (0.5, 0.5)),))],
            invalid,
        ),
        "draft token outside its q": ([sampling_open, _frame(draft_ids=(7,), draft_dists=(Q,))], invalid),
        "parent after its child": ([_open(fp), _frame(parents=(-1, 1))], invalid),
        "parent is the token itself": ([_open(fp), _frame(draft_ids=(5, 6, 7), parents=(-1, 0, 2))], invalid),
        "parent below -1": ([_open(fp), _frame(parents=(-1, -2))], invalid),
        "parents of the wrong count": ([_open(fp), _frame(parents=(-1,))], invalid),
        # The request's own length: OUT_OF_RANGE, never RESOURCE_EXHAUSTED (which reads as "busy").
        "context overflow": ([_open(fp, prompt_ids=(5,) * 60), _frame(position=60, draft_ids=(5,) * 8)], out_of_range),
        "prompt leaves no room for a frame": ([_open(fp, prompt_ids=(5,) * 63)], out_of_range),
    }


async def _raw_session(address: str, frames: list[bytes]) -> tuple[grpc.StatusCode, list[Any]]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            "/tandemspec.v1.Verifier/Decode",
            request_serializer=None,
            response_deserializer=pb.CloudFrame.FromString,
        )()
        for frame in frames:
            await call.write(frame)
        await call.done_writing()
        received = []
        try:
            while (reply := await call.read()) is not grpc.aio.EOF:
                received.append(codec.decode_cloud_frame(reply))
        except grpc.aio.AioRpcError:
            pass  # the call ended with an error status, checked below
        return await call.code(), received


async def _good_session(address: str, fingerprint: str) -> Verdict:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = DecodeStream(channel)
        await stream.open(open_message(PROMPT, fingerprint))
        await stream.send(DraftFrame(seq=1, epoch=0, position=P, draft_ids=(5, 6, 7)))
        verdict = await stream.receive()
        assert await stream.finish() == grpc.StatusCode.OK
        assert isinstance(verdict, Verdict)
        return verdict


@pytest.mark.parametrize("case", list(_cases("fp")))
def test_bad_input_ends_only_that_session(case: str, strict_server: Any, fingerprint: str) -> None:
    frames, expected = _cases(fingerprint)[case]
    code, received = asyncio.run(_raw_session(strict_server.address, frames))
    assert code == expected, (case, received)
    error = received[-1]
    assert isinstance(error, pb.Error), received
    assert error.status_code == expected.value[0] and error.message
    # The server still serves, and other sessions are unaffected.
    verdict = asyncio.run(_good_session(strict_server.address, fingerprint))
    assert verdict.committed_length > P
    assert strict_server.metrics.snapshot()["sessions_active"] == 0


def test_limits_on_sessions_and_memory(llama_target_dir: Path, fingerprint: str) -> None:
    """Over max_sessions or over the KV budget: RESOURCE_EXHAUSTED, then room again after a close."""
    from tandemspec.cloud.target import TargetModel

    target = TargetModel.load(llama_target_dir, "cpu")
    tokens_per_session = P + 16 + 32 + 1  # prompt + max_new_tokens + max_draft_tokens + 1
    budget = int(2.5 * tokens_per_session * target.kv_bytes_per_token)

    async def run(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            held = []
            for _ in range(2):
                stream = DecodeStream(channel)
                await stream.open(open_message(PROMPT, fingerprint, max_new_tokens=16))
                held.append(stream)
            refused = DecodeStream(channel)
            await refused.send(open_message(PROMPT, fingerprint, max_new_tokens=16))
            assert isinstance(await refused.receive(), pb.Error)
            assert await refused.call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await held[0].finish() == grpc.StatusCode.OK
            again = DecodeStream(channel)
            await again.open(open_message(PROMPT, fingerprint, max_new_tokens=16))
            for stream in (held[1], again):
                assert await stream.finish() == grpc.StatusCode.OK

    for limits in ({"max_sessions": 2}, {"memory_budget_bytes": budget}):
        with serve_in_thread(CloudConfig(model_dir=llama_target_dir, **limits), target=target) as server:
            asyncio.run(run(server.address))
            assert server.metrics.snapshot()["sessions_refused"] == 1


def test_idle_session_times_out(llama_target_dir: Path, fingerprint: str) -> None:
    async def run(address: str) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint))
            assert isinstance(await stream.receive(), pb.Error)  # nothing sent: the TTL ends it
            return await stream.call.code()

    with serve_in_thread(CloudConfig(model_dir=llama_target_dir, session_ttl_s=0.2)) as server:
        assert asyncio.run(run(server.address)) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_length_limits_are_the_requests_own_and_checked_before_prefill(strict_server: Any, fingerprint: str) -> None:
    """max_context_tokens 64: a 63-token prompt is refused at the handshake (no prefill runs);
    a 62-token prompt gets exactly one frame of one draft token, then OUT_OF_RANGE naming the budget."""
    before = strict_server.metrics.snapshot()
    code, received = asyncio.run(_raw_session(strict_server.address, [_open(fingerprint, prompt_ids=(5,) * 63)]))
    after = strict_server.metrics.snapshot()
    assert code == grpc.StatusCode.OUT_OF_RANGE and "max_context_tokens 64" in received[-1].message
    assert after["prefill_passes"] == before["prefill_passes"]  # refused before any target work
    assert (
        after["sessions_total"] == before["sessions_total"] and after["sessions_refused"] == before["sessions_refused"]
    )

    async def fill(address: str) -> tuple[Verdict, pb.Error, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message((5,) * 62, fingerprint, max_new_tokens=16))
            await stream.send(DraftFrame(seq=0, epoch=0, position=62, draft_ids=(5,)))
            verdict = await stream.receive()
            assert isinstance(verdict, Verdict)
            await stream.send(DraftFrame(seq=1, epoch=verdict.epoch, position=verdict.committed_length, draft_ids=(5,)))
            error = await stream.receive()
            assert isinstance(error, pb.Error)
            return verdict, error, await stream.call.code()

    verdict, error, code = asyncio.run(fill(strict_server.address))
    assert verdict.committed_length in (63, 64)  # the correction or the bonus fitted
    assert code == grpc.StatusCode.OUT_OF_RANGE and error.seq == 1 and "budget of 64 tokens" in error.message

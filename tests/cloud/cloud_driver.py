"""A test-side edge: speaks the Decode protocol to a real verifier over gRPC.

It drafts with any ``Drafter`` (a torch model, or an oracle), pipelines frames with
``expects_continuation`` and rolls back on rejections, like the real edge does, so the
tests exercise stale frames, deferred bonuses and corrections end to end.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.protos import tandem_pb2_grpc as pb_grpc
from tandemspec.types import (
    DraftFrame,
    SamplingParams,
    SessionClose,
    SessionKind,
    SessionOpen,
    SessionReady,
    Verdict,
)

Drafter = Callable[[Sequence[int], int], list[int]]  # context, k -> k greedy draft tokens
Metadata = tuple[tuple[str, str], ...]
GREEDY = SamplingParams()


def open_message(
    prompt: Sequence[int],
    fingerprint: str,
    sampling: SamplingParams = GREEDY,
    kind: SessionKind = SessionKind.VERIFY,
    max_new_tokens: int = 0,
    return_top_k: int = 0,
    stop_ids: tuple[int, ...] = (),
    client_id: str = "",
) -> SessionOpen:
    return SessionOpen(
        prompt_ids=tuple(prompt),
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        tokenizer_fingerprint=fingerprint,
        kind=kind,
        return_top_k=return_top_k,
        stop_ids=stop_ids,
        client_id=client_id,
    )


class DecodeStream:
    """One Decode call with typed send/receive."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Metadata | None = None) -> None:
        self.call = pb_grpc.VerifierStub(channel).Decode(metadata=metadata)

    async def send(self, message: SessionOpen | DraftFrame | SessionClose) -> None:
        await self.call.write(codec.encode_edge_frame(message))

    async def send_raw(self, frame: pb.EdgeFrame) -> None:
        await self.call.write(frame)

    async def receive(self) -> codec.CloudMessage | pb.Error | None:
        """The next cloud message, or None when the stream has ended (with any status)."""
        try:
            frame = await self.call.read()
        except grpc.aio.AioRpcError:
            return None
        if frame is grpc.aio.EOF:
            return None
        return codec.decode_cloud_frame(frame)

    async def open(self, message: SessionOpen) -> SessionReady:
        await self.send(message)
        ready = await self.receive()
        assert isinstance(ready, SessionReady), ready
        return ready

    async def finish(self) -> grpc.StatusCode:
        """Half-close, drain what is left, and return the call's status."""
        await self.call.done_writing()
        while await self.receive() is not None:
            pass
        return await self.call.code()


@dataclass
class SpecResult:
    """What a speculative session produced, as the edge sees it."""

    tokens: list[int]
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def num_stale(self) -> int:
        return sum(v.stale for v in self.verdicts)

    @property
    def num_rejections(self) -> int:
        return sum(not v.stale and not v.fully_accepted for v in self.verdicts)


@dataclass
class _InFlight:
    frame: DraftFrame
    doomed: bool = False  # a rejection before it makes its verdict stale


async def speculate_greedy(
    stream: DecodeStream,
    prompt: Sequence[int],
    drafter: Drafter,
    draft_len: int,
    max_new: int,
    depth: int = 2,
) -> SpecResult:
    """Greedy speculative decoding with up to ``depth`` frames in flight (1 = no pipelining)."""
    result = SpecResult(tokens=list(prompt))
    in_flight: collections.deque[_InFlight] = collections.deque()
    epoch, seq = 0, 0
    while len(result.tokens) - len(prompt) < max_new:
        while len(in_flight) < depth:
            base = result.tokens + [t for f in in_flight if not f.doomed for t in f.frame.draft_ids]
            frame = DraftFrame(
                seq=seq,
                epoch=epoch,
                position=len(base),
                draft_ids=tuple(drafter(base, draft_len)),
                expects_continuation=depth > 1,
            )
            await stream.send(frame)
            in_flight.append(_InFlight(frame))
            seq += 1
        verdict = await stream.receive()
        assert isinstance(verdict, Verdict), verdict
        flight = in_flight.popleft()
        result.verdicts.append(verdict)
        assert verdict.seq == flight.frame.seq
        assert verdict.stale == flight.doomed, (verdict, flight)
        if verdict.stale:
            continue
        result.tokens += list(flight.frame.draft_ids[: verdict.num_accepted])
        if verdict.next_token is not None:
            result.tokens.append(verdict.next_token)
        assert verdict.committed_length == len(result.tokens)
        if not verdict.fully_accepted:
            epoch = verdict.epoch
            for later in in_flight:
                later.doomed = True
    status = await stream.finish()
    assert status == grpc.StatusCode.OK, status
    return result


def torch_greedy_drafter(model: object) -> Drafter:
    """Drafts greedily with a torch causal LM (full forward per token: tiny models only)."""
    import torch

    def draft(context: Sequence[int], k: int) -> list[int]:
        ids = list(context)
        with torch.inference_mode():
            for _ in range(k):
                logits = model(torch.tensor([ids])).logits[0, -1]  # type: ignore[operator]
                ids.append(int(torch.argmax(logits)))
        return ids[len(context) :]

    return draft


def target_greedy(model: object, prompt: Sequence[int], n: int) -> list[int]:
    """The target alone, greedy, full forward per token: the reference output."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]  # type: ignore[operator]
            ids.append(int(torch.argmax(logits)))
    return ids


def next_logits(model: object, context: Sequence[int]) -> np.ndarray:
    """The model's logits for the token after ``context``: [vocab]."""
    import torch

    with torch.inference_mode():
        return model(torch.tensor([list(context)])).logits[0, -1].float().numpy()  # type: ignore[operator]

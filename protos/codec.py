"""Proto <-> domain codec: the only place that touches generated message classes.

``encode_*`` turn domain dataclasses into proto messages, ``decode_*`` the reverse.
Decoding checks what the proto cannot (parallel arrays of equal length, required parts
present, a known oneof) and raises :class:`CodecError`; session-level checks (vocabulary,
positions, limits) belong to the verifier.
"""

from __future__ import annotations

import math

from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import (
    DraftFrame,
    GeneratedTokens,
    Limits,
    SamplingParams,
    ServerInfo,
    SessionClose,
    SessionDone,
    SessionKind,
    SessionOpen,
    SessionReady,
    SparseDist,
    Verdict,
)

EdgeMessage = SessionOpen | DraftFrame | SessionClose
CloudMessage = SessionReady | Verdict | GeneratedTokens | SessionDone

_KIND_TO_PROTO = {SessionKind.VERIFY: pb.SESSION_KIND_VERIFY, SessionKind.GENERATE: pb.SESSION_KIND_GENERATE}
_KIND_FROM_PROTO = {value: key for key, value in _KIND_TO_PROTO.items()}
_KIND_FROM_PROTO[pb.SESSION_KIND_UNSPECIFIED] = SessionKind.VERIFY  # the proto default


class CodecError(ValueError):
    """A message is structurally invalid."""


def pack_bits(bits: tuple[bool, ...]) -> bytes:
    """Pack booleans into bytes, least significant bit first."""
    out = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        if bit:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def unpack_bits(data: bytes, count: int) -> tuple[bool, ...]:
    """Inverse of :func:`pack_bits` for the first ``count`` bits."""
    if len(data) * 8 < count:
        raise CodecError(f"label bitmap has {len(data) * 8} bits, {count} announced")
    return tuple(bool(data[i // 8] >> (i % 8) & 1) for i in range(count))


def encode_sparse(dist: SparseDist) -> pb.SparseDist:
    return pb.SparseDist(ids=dist.ids, probs=dist.probs)


def decode_sparse(message: pb.SparseDist) -> SparseDist:
    if len(message.ids) != len(message.probs):
        raise CodecError(f"sparse distribution has {len(message.ids)} ids but {len(message.probs)} probs")
    if any(not math.isfinite(p) or p < 0 for p in message.probs):
        raise CodecError("sparse distribution has a negative or non-finite probability")
    return SparseDist(ids=tuple(message.ids), probs=tuple(message.probs))


def encode_sampling(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed)


def decode_sampling(message: pb.SamplingParams) -> SamplingParams:
    if not math.isfinite(message.temperature) or not math.isfinite(message.top_p):
        raise CodecError("sampling parameters must be finite")
    top_p = message.top_p if message.top_p > 0 else 1.0  # proto default 0 means "off"
    try:
        return SamplingParams(temperature=message.temperature, top_p=top_p, top_k=message.top_k, seed=message.seed)
    except ValueError as error:
        raise CodecError(str(error)) from error


def encode_limits(limits: Limits) -> pb.Limits:
    return pb.Limits(
        max_context_tokens=limits.max_context_tokens,
        max_draft_tokens=limits.max_draft_tokens,
        max_new_tokens=limits.max_new_tokens,
        max_return_top_k=limits.max_return_top_k,
        max_support=limits.max_support,
    )


def decode_limits(message: pb.Limits) -> Limits:
    return Limits(
        max_context_tokens=message.max_context_tokens,
        max_draft_tokens=message.max_draft_tokens,
        max_new_tokens=message.max_new_tokens,
        max_return_top_k=message.max_return_top_k,
        max_support=message.max_support,
    )


def encode_info(info: ServerInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        model_name=info.model_name,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        vocab_size=info.vocab_size,
        limits=encode_limits(info.limits),
        capabilities=info.capabilities,
        server_version=info.server_version,
        device=info.device,
        dtype=info.dtype,
    )


def decode_info(message: pb.InfoResponse) -> ServerInfo:
    return ServerInfo(
        model_name=message.model_name,
        tokenizer_fingerprint=message.tokenizer_fingerprint,
        vocab_size=message.vocab_size,
        limits=decode_limits(message.limits),
        capabilities=tuple(message.capabilities),
        server_version=message.server_version,
        device=message.device,
        dtype=message.dtype,
    )


def encode_edge_frame(message: EdgeMessage) -> pb.EdgeFrame:
    """Wrap a domain edge message in an ``EdgeFrame``."""
    if isinstance(message, SessionOpen):
        return pb.EdgeFrame(
            open=pb.SessionOpen(
                prompt_ids=message.prompt_ids,
                sampling=encode_sampling(message.sampling),
                max_new_tokens=message.max_new_tokens,
                tokenizer_fingerprint=message.tokenizer_fingerprint,
                kind=_KIND_TO_PROTO[message.kind],
                return_top_k=message.return_top_k,
                stop_ids=message.stop_ids,
                client_id=message.client_id,
                keeps_bonus=message.keeps_bonus,
            )
        )
    if isinstance(message, DraftFrame):
        return pb.EdgeFrame(
            draft=pb.DraftFrame(
                seq=message.seq,
                epoch=message.epoch,
                position=message.position,
                committed_ids=message.committed_ids,
                draft_ids=message.draft_ids,
                draft_dists=[encode_sparse(d) for d in message.draft_dists],
                expects_continuation=message.expects_continuation,
                parents=message.parents,
                branch_of=message.branch_of,
            )
        )
    return pb.EdgeFrame(close=pb.SessionClose(reason=message.reason))


def decode_edge_frame(frame: pb.EdgeFrame) -> EdgeMessage:
    """Unwrap an ``EdgeFrame``; raises :class:`CodecError` on structural problems."""
    which = frame.WhichOneof("kind")
    if which == "open":
        message = frame.open
        if message.kind not in _KIND_FROM_PROTO:
            raise CodecError(f"unknown session kind {message.kind}")
        return SessionOpen(
            prompt_ids=tuple(message.prompt_ids),
            sampling=decode_sampling(message.sampling),
            max_new_tokens=message.max_new_tokens,
            tokenizer_fingerprint=message.tokenizer_fingerprint,
            kind=_KIND_FROM_PROTO[message.kind],
            return_top_k=message.return_top_k,
            stop_ids=tuple(message.stop_ids),
            client_id=message.client_id,
            keeps_bonus=message.keeps_bonus,
        )
    if which == "draft":
        draft = frame.draft
        dists = tuple(decode_sparse(d) for d in draft.draft_dists)
        if dists and len(dists) != len(draft.draft_ids):
            raise CodecError(f"{len(draft.draft_ids)} draft tokens but {len(dists)} draft distributions")
        if draft.parents and len(draft.parents) != len(draft.draft_ids):
            raise CodecError(f"{len(draft.draft_ids)} draft tokens but {len(draft.parents)} parent indices")
        return DraftFrame(
            seq=draft.seq,
            epoch=draft.epoch,
            position=draft.position,
            committed_ids=tuple(draft.committed_ids),
            draft_ids=tuple(draft.draft_ids),
            draft_dists=dists,
            expects_continuation=draft.expects_continuation,
            parents=tuple(draft.parents),
            branch_of=draft.branch_of if draft.HasField("branch_of") else None,
        )
    if which == "close":
        return SessionClose(reason=frame.close.reason)
    raise CodecError("edge frame carries no message")


def encode_cloud_frame(message: CloudMessage) -> pb.CloudFrame:
    """Wrap a domain cloud message in a ``CloudFrame``."""
    if isinstance(message, SessionReady):
        return pb.CloudFrame(
            ready=pb.SessionReady(
                session_id=message.session_id, prompt_length=message.prompt_length, prefill_ms=message.prefill_ms
            )
        )
    if isinstance(message, Verdict):
        verdict = pb.Verdict(
            seq=message.seq,
            epoch=message.epoch,
            committed_length=message.committed_length,
            num_committed=message.num_committed,
            num_accepted=message.num_accepted,
            labels=pack_bits(message.labels),
            num_labels=len(message.labels),
            target_top_k=[encode_sparse(d) for d in message.target_top_k],
            compute_ms=message.compute_ms,
            stale=message.stale,
            accepted_nodes=message.accepted_nodes,
            shared_pass=message.shared_pass,
            server_ms=message.server_ms,
        )
        if message.next_token is not None:
            verdict.next_token = message.next_token
        return pb.CloudFrame(verdict=verdict)
    if isinstance(message, GeneratedTokens):
        return pb.CloudFrame(tokens=pb.GeneratedTokens(ids=message.ids, compute_ms=message.compute_ms))
    return pb.CloudFrame(done=pb.SessionDone(reason=message.reason, num_generated=message.num_generated))


def encode_error(status_code: int, message: str, seq: int = 0) -> pb.CloudFrame:
    """The ``Error`` frame sent just before a call ends with ``status_code``."""
    return pb.CloudFrame(error=pb.Error(status_code=status_code, message=message, seq=seq))


def decode_cloud_frame(frame: pb.CloudFrame) -> CloudMessage | pb.Error:
    """Unwrap a ``CloudFrame``; an ``Error`` is returned as its proto message."""
    which = frame.WhichOneof("kind")
    if which == "ready":
        ready = frame.ready
        return SessionReady(session_id=ready.session_id, prompt_length=ready.prompt_length, prefill_ms=ready.prefill_ms)
    if which == "verdict":
        v = frame.verdict
        return Verdict(
            seq=v.seq,
            epoch=v.epoch,
            committed_length=v.committed_length,
            num_committed=v.num_committed,
            num_accepted=v.num_accepted,
            next_token=v.next_token if v.HasField("next_token") else None,
            labels=unpack_bits(v.labels, v.num_labels),
            target_top_k=tuple(decode_sparse(d) for d in v.target_top_k),
            compute_ms=v.compute_ms,
            stale=v.stale,
            accepted_nodes=tuple(v.accepted_nodes),
            shared_pass=v.shared_pass,
            server_ms=v.server_ms,
        )
    if which == "tokens":
        return GeneratedTokens(ids=tuple(frame.tokens.ids), compute_ms=frame.tokens.compute_ms)
    if which == "done":
        return SessionDone(reason=frame.done.reason, num_generated=frame.done.num_generated)
    if which == "error":
        return frame.error
    raise CodecError("cloud frame carries no message")

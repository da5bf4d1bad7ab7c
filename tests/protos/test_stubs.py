"""The generated stubs are current, import under the package, and the codec round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.protos.generate import GENERATED, PROTO_DIR, generate
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


def test_stubs_do_not_drift(tmp_path: Path) -> None:
    """Regenerating from tandem.proto gives byte-identical files to the committed ones."""
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (PROTO_DIR / name).read_text()
        assert fresh == committed, f"{name} is stale: run python -m tandemspec.protos.generate"


def test_grpc_stub_imports_its_sibling_under_the_package() -> None:
    from tandemspec.protos import tandem_pb2_grpc

    assert hasattr(tandem_pb2_grpc, "VerifierStub") and hasattr(tandem_pb2_grpc, "VerifierServicer")
    source = (PROTO_DIR / "tandem_pb2_grpc.py").read_text()
    assert "from tandemspec.protos import tandem_pb2" in source
    assert pb.DESCRIPTOR.package == "tandemspec.v1"
    service = pb.DESCRIPTOR.services_by_name["Verifier"]
    assert sorted(m.name for m in service.methods) == ["Decode", "Info"]


EDGE_MESSAGES = [
    SessionOpen(
        prompt_ids=(1, 500, 3),
        sampling=SamplingParams(temperature=0.5, top_p=0.9, top_k=40, seed=2**40 + 3),
        max_new_tokens=64,
        tokenizer_fingerprint="sha256:abc",
        kind=SessionKind.GENERATE,
        return_top_k=4,
        stop_ids=(2,),
        client_id="device-7",
    ),
    DraftFrame(
        seq=3,
        epoch=1,
        position=17,
        committed_ids=(5, 6),
        draft_ids=(7, 8),
        draft_dists=(SparseDist((7, 9), (0.75, 0.25)), SparseDist((8,), (1.0,))),
        expects_continuation=True,
        parents=(-1, 0),
    ),
    SessionClose(reason="done"),
]

CLOUD_MESSAGES = [
    SessionReady(session_id="s1", prompt_length=12, prefill_ms=1.5),
    Verdict(
        seq=3,
        epoch=2,
        committed_length=21,
        num_committed=2,
        num_accepted=1,
        next_token=42,
        labels=(True, False, True, False, True, True, True, False, True),
        target_top_k=(SparseDist((1, 2), (0.5, 0.25)),),
        compute_ms=0.25,
    ),
    Verdict(seq=4, epoch=2, committed_length=21, stale=True),
    # A tree's accepted path that is not the frame's first tokens.
    Verdict(
        seq=5, epoch=2, committed_length=24, num_accepted=2, next_token=7, labels=(True,) * 4, accepted_nodes=(1, 3)
    ),
    GeneratedTokens(ids=(4, 5), compute_ms=2.0),
    SessionDone(reason="max_new_tokens", num_generated=64),
]


@pytest.mark.parametrize("message", EDGE_MESSAGES, ids=lambda m: type(m).__name__)
def test_edge_frames_round_trip(message: codec.EdgeMessage) -> None:
    wire = codec.encode_edge_frame(message).SerializeToString()
    assert codec.decode_edge_frame(pb.EdgeFrame.FromString(wire)) == message


@pytest.mark.parametrize("message", CLOUD_MESSAGES, ids=lambda m: type(m).__name__)
def test_cloud_frames_round_trip(message: codec.CloudMessage) -> None:
    wire = codec.encode_cloud_frame(message).SerializeToString()
    decoded = codec.decode_cloud_frame(pb.CloudFrame.FromString(wire))
    if isinstance(message, Verdict):
        # float32 on the wire
        assert isinstance(decoded, Verdict)
        assert decoded.target_top_k == message.target_top_k
    assert decoded == message


def test_info_round_trips() -> None:
    info = ServerInfo(
        model_name="m",
        tokenizer_fingerprint="sha256:x",
        vocab_size=8192,
        limits=Limits(4096, 16, 1024, 20, 32),
        capabilities=("greedy", "sampling"),
        server_version="0.1.0",
        device="cpu",
        dtype="float32",
    )
    assert codec.decode_info(pb.InfoResponse.FromString(codec.encode_info(info).SerializeToString())) == info


def test_token_ids_are_packed_varints() -> None:
    """100 small ids cost about 100-200 bytes, not 100 tags + values."""
    frame = DraftFrame(seq=1, epoch=0, position=0, draft_ids=tuple(range(100, 200)))
    size = len(codec.encode_edge_frame(frame).SerializeToString())
    assert size < 2 * 100 + 16


def test_label_bits_pack_lsb_first() -> None:
    assert codec.pack_bits((True, False, False, False, False, False, False, False, True)) == b"\x01\x01"
    assert codec.unpack_bits(b"\x05", 3) == (True, False, True)
    with pytest.raises(codec.CodecError):
        codec.unpack_bits(b"\x01", 9)


@pytest.mark.parametrize(
    "frame, fragment",
    [
        (pb.EdgeFrame(), "no message"),
        (
            pb.EdgeFrame(draft=pb.DraftFrame(draft_ids=[1, 2], draft_dists=[pb.SparseDist(ids=[1], probs=[1.0])])),
            "2 draft tokens but 1",
        ),
        (
            pb.EdgeFrame(draft=pb.DraftFrame(draft_ids=[1], draft_dists=[pb.SparseDist(ids=[1, 2], probs=[1.0])])),
            "2 ids but 1 probs",
        ),
        (
            pb.EdgeFrame(draft=pb.DraftFrame(draft_ids=[1], draft_dists=[pb.SparseDist(ids=[1], probs=[-1.0])])),
            "negative",
        ),
        (pb.EdgeFrame(open=pb.SessionOpen(sampling=pb.SamplingParams(temperature=-1))), "temperature"),
        (pb.EdgeFrame(open=pb.SessionOpen(kind=7)), "unknown session kind"),
    ],
)
def test_structurally_invalid_frames_raise_codec_error(frame: pb.EdgeFrame, fragment: str) -> None:
    with pytest.raises(codec.CodecError, match=fragment):
        codec.decode_edge_frame(frame)

"""Pure pieces of the verifier: frame judgement, session bookkeeping, wire parsing, config."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from tandemspec.cloud.config import CloudConfig, default_model_dir
from tandemspec.cloud.session import AdmissionBook, Session, SessionError
from tandemspec.cloud.target import SessionKV
from tandemspec.cloud.verify import judge_frame
from tandemspec.cloud.wire import parse_edge_frame
from tandemspec.config import load_config
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import DraftFrame, SamplingParams, SessionOpen

VOCAB = 10


def _logits(argmaxes: list[int]) -> np.ndarray:
    """Rows whose argmax is given: [len, VOCAB]."""
    logits = np.zeros((len(argmaxes), VOCAB), dtype=np.float32)
    logits[np.arange(len(argmaxes)), argmaxes] = 5.0
    return logits


def test_judge_frame_labels_committed_then_draft() -> None:
    # Rows: pending -> c0, c0 -> c1, c1 -> d0, d0 -> d1, d1 -> d2, d2 -> bonus.
    logits = _logits([4, 9, 1, 2, 7, 3])
    frame = DraftFrame(seq=0, epoch=0, position=5, committed_ids=(4, 5), draft_ids=(1, 2, 3))
    outcome = judge_frame(logits, frame, SamplingParams(), return_top_k=2)
    assert outcome.labels == (True, False, True, True, False)
    assert outcome.num_committed == 2 and outcome.num_accepted == 2 and outcome.next_token == 7
    assert not outcome.fully_accepted
    assert [d.ids[0] for d in outcome.target_top_k] == [4, 9, 1, 2, 7]


def test_judge_frame_defers_the_bonus_only_when_fully_accepted() -> None:
    frame = DraftFrame(seq=0, epoch=0, position=5, draft_ids=(1, 2), expects_continuation=True)
    full = judge_frame(_logits([1, 2, 3]), frame, SamplingParams(), return_top_k=0)
    assert full.fully_accepted and full.next_token is None and full.target_top_k == ()
    partial = judge_frame(_logits([1, 8, 3]), frame, SamplingParams(), return_top_k=0)
    assert partial.num_accepted == 1 and partial.next_token == 8


def test_session_rollback_keeps_the_last_token_pending() -> None:
    session = Session(SessionOpen((1, 2, 3), SamplingParams(), 16, "fp"), max_tokens=64, reserved_bytes=0)
    frame = DraftFrame(seq=4, epoch=0, position=3, draft_ids=(5, 6, 7))
    outcome = judge_frame(_logits([5, 9, 0, 0]), frame, SamplingParams(), 0)
    # The step fed prompt[:-1] (2), then the pending token and 3 drafts: 6 positions of KV.
    verdict = session.apply_verdict(frame, outcome, _fake_kv(6), compute_ms=1.0)
    assert session.tokens == [1, 2, 3, 5, 9] and session.kv.length == 4 and session.epoch == 1
    assert (verdict.seq, verdict.epoch, verdict.committed_length, verdict.num_accepted) == (4, 1, 5, 1)
    assert verdict.next_token == 9 and verdict.labels == (True, False, False)
    stale = session.stale_verdict(DraftFrame(seq=5, epoch=0, position=6, draft_ids=(1,)))
    assert stale.stale and stale.epoch == 1 and stale.committed_length == 5 and stale.next_token is None


def _fake_kv(length: int) -> SessionKV:
    import torch

    layer = (torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2))
    return SessionKV(layers=(layer,), length=length)


def test_admission_book_refuses_over_limits() -> None:
    book = AdmissionBook(max_sessions=2, budget_bytes=100)
    book.admit(60)
    with pytest.raises(SessionError) as refused:
        book.admit(50)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    book.admit(40)
    with pytest.raises(SessionError):
        book.admit(0)
    book.release(60)
    book.admit(10)


def test_wire_parsing_flags_wrong_wire_types_but_allows_unknown_numbers() -> None:
    unknown_field = pb.EdgeFrame(close=pb.SessionClose(reason="x")).SerializeToString() + b"\xf8\x01\x01"  # field 31
    assert parse_edge_frame(unknown_field).reason == "x"  # type: ignore[union-attr]
    with pytest.raises(SessionError, match=r"EdgeFrame\.open\.sampling\.seed"):
        # SessionOpen.sampling.seed (varint) sent as a fixed64.
        parse_edge_frame(b"\x0a\x0b\x12\x09\x21" + b"\x00" * 8)


def test_config_layers_and_validation(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[cloud]\nmax_sessions = 7\nbatch_window_ms = 4\n")
    config = load_config(
        CloudConfig, "cloud", file=file, environ={"TANDEM_CLOUD_MAX_SESSIONS": "9"}, flags={"batching": False}
    )
    assert config.max_sessions == 9 and config.batch_window_ms == 4.0 and not config.batching
    assert config.model_dir == default_model_dir() and default_model_dir().parts[-3:] == (
        "models",
        "reference",
        "target",
    )
    assert config.limits(model_max_positions=128).max_context_tokens == 128
    with pytest.raises(ValueError):
        CloudConfig(tls_cert=Path("a.pem"))
    with pytest.raises(ValueError):
        CloudConfig(max_sessions=0)

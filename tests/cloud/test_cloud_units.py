"""Pure pieces of the verifier: frame judgement, session bookkeeping, wire parsing, config."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from tandemspec.cloud.config import CloudConfig, default_model_dir
from tandemspec.cloud.session import AdmissionBook, Session, SessionError, client_key
from tandemspec.cloud.target import SessionKV
from tandemspec.cloud.verify import judge_frame
from tandemspec.cloud.wire import parse_edge_frame
from tandemspec.config import load_config
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import DraftFrame, SamplingParams, SessionOpen

VOCAB = 10


def _logits(argmaxes: list[int]) -> torch.Tensor:
    """Rows whose argmax is given: [len, VOCAB]."""
    logits = torch.zeros((len(argmaxes), VOCAB))
    logits[torch.arange(len(argmaxes)), argmaxes] = 5.0
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
    layer = (torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2))
    return SessionKV(layers=(layer,), length=length)


def test_admission_book_refuses_over_limits() -> None:
    book = AdmissionBook(max_sessions=3, budget_bytes=100, per_client=2)
    book.admit_now("a", 60)
    with pytest.raises(SessionError) as refused:
        book.admit_now("b", 50)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    book.admit_now("a", 40)
    with pytest.raises(SessionError, match="max_sessions_per_client 2"):
        book.admit_now("a", 0)
    book.admit_now("b", 0)
    with pytest.raises(SessionError, match="full"):
        book.admit_now("c", 0)
    book.release("a", 60)
    book.admit_now("c", 10)
    assert (book.held_by("a"), book.held_by("b"), book.held_by("c")) == (1, 1, 1)


def test_client_key_by_identity_else_host_and_loopback_uncapped() -> None:
    assert client_key("ipv4:10.0.0.7:5001", "phone-1", authenticated=False) == "10.0.0.7"
    assert client_key("ipv4:10.0.0.7:5002", "phone-2", authenticated=False) == "10.0.0.7"
    assert client_key("ipv6:[2001:db8::1]:5001", "", authenticated=False) == "2001:db8::1"
    assert client_key("ipv4:10.0.0.7:5001", "phone-1", authenticated=True) == "id:phone-1"
    assert client_key("ipv4:10.0.0.7:5001", "", authenticated=True) == "10.0.0.7"
    assert client_key("ipv4:127.0.0.1:5001", "", authenticated=False) is None  # the server's own machine
    assert client_key("ipv6:[::1]:5001", "x", authenticated=False) is None
    assert client_key("ipv4:127.0.0.1:5001", "x", authenticated=True) == "id:x"


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


_PARAMS = [
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=7, seed=2),
    SamplingParams(temperature=1.3, top_p=0.9, seed=3),
    SamplingParams(temperature=0.2, top_p=0.999, seed=4),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.8, seed=5),
]


@pytest.mark.parametrize("params", _PARAMS)
def test_device_distributions_equal_the_shared_numpy_ones(params: SamplingParams) -> None:
    """cloud.probs computes on torch what tandemspec.sampling does in numpy: same support
    (ties by id), same probabilities, same top-k truncation, same draw for the same generator."""
    from tandemspec.cloud import probs
    from tandemspec.sampling import process_logits, sample_dense, truncate

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(5, 3000)).astype(np.float32)
    logits[:2] = np.round(logits[:2])  # exact ties, also at the cut-offs
    expected = process_logits(logits, params)
    got = probs.process_probs(torch.from_numpy(logits), params).numpy()
    np.testing.assert_array_equal(got > 0, expected > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    for row, row_t in zip(expected, torch.from_numpy(expected), strict=True):
        assert probs.truncate(row_t, 16).ids == truncate(row, 16).ids
        for seed in range(20):
            assert probs.sample(row_t, np.random.default_rng(seed)) == sample_dense(row, np.random.default_rng(seed))


def test_device_rejection_sampling_makes_the_numpy_decisions() -> None:
    """For the same seed, the torch verify path accepts, corrects and adds bonuses exactly as
    tandemspec.sampling.verify_sampling (the tested reference) does."""
    from tandemspec.cloud import probs
    from tandemspec.cloud.verify import verify_sampling as verify_on_device
    from tandemspec.sampling import process_logits, seeded_rng, truncate, verify_sampling

    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.0, top_k=30)
    outcomes = set()
    for trial in range(200):
        target_logits = rng.normal(scale=2.0, size=(4, 50))
        p = process_logits(target_logits, params)  # [k + 1, vocab]
        q_rows = process_logits(target_logits[:3] + rng.normal(scale=0.7, size=(3, 50)), params)  # a close drafter
        dists = tuple(truncate(row, 8) for row in q_rows)
        draft = tuple(int(np.random.default_rng(trial + i).choice(d.ids, p=d.probs)) for i, d in enumerate(dists))
        frame = DraftFrame(seq=0, epoch=0, position=10, draft_ids=draft, draft_dists=dists)
        expected = verify_sampling(p, draft, dists, seeded_rng(trial, 10))
        got = verify_on_device(torch.from_numpy(p), frame, [(0, seeded_rng(trial, 10))], defer=False)
        assert got == expected, trial
        outcomes.add(got.num_accepted)
    assert outcomes == {0, 1, 2, 3}  # rejections at every position and full blocks (bonus) exercised
    assert probs.residual(torch.from_numpy(p[0]), dists[0]).sum().item() == pytest.approx(1.0)


def test_serve_flags_reach_the_config() -> None:
    from tandemspec.cli import build_parser
    from tandemspec.cloud.commands import build_config

    args = build_parser().parse_args(
        ["cloud", "serve", "--max-sessions", "12", "--max-sessions-per-client", "5", "--session-idle-s", "7.5"]
    )
    config = build_config(args)
    assert (config.max_sessions, config.max_sessions_per_client, config.session_idle_s) == (12, 5, 7.5)
    assert config.client_session_cap == 5
    assert config.torch_threads == 0  # torch's own choice unless asked
    assert build_config(build_parser().parse_args(["cloud", "serve", "--threads", "1"])).torch_threads == 1
    with pytest.raises(ValueError, match="torch_threads"):
        CloudConfig(torch_threads=-1)

"""Choosing the chain's draft length from measured costs (edge/autodraft.py): the model, the
estimates, and decoding with it through a real verifier behind the link emulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.edge.autodraft import CostEstimator, Costs, best_length
from tandemspec.edge.decoder import DecoderConfig, HybridDecoder

PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")


def _costs(rtt_s: float, acceptance: float, verify_s_per_token: float = 0.0) -> Costs:
    return Costs(
        rtt_s=rtt_s,
        draft_s_per_token=0.01,
        verify_s=0.02,
        verify_s_per_token=verify_s_per_token,
        acceptance=acceptance,
    )


def test_the_model_by_hand() -> None:
    """a = 0.5, d = 10 ms, a flat 20 ms pass: E(k) = 1.5, 1.75, 1.875, 1.9375; T(k) = 30 + 10 (k - 1) ms + R."""
    costs = _costs(rtt_s=0.2, acceptance=0.5)
    assert [costs.tokens_per_round(k) for k in (1, 2, 3, 4)] == pytest.approx([1.5, 1.75, 1.875, 1.9375])
    # R = 200 ms: 230/1.5 = 153, 240/1.75 = 137, 250/1.875 = 133, 260/1.9375 = 134 ms per token: k = 3.
    assert costs.seconds_per_token(3, pipelined=False) == pytest.approx(0.25 / 1.875)
    assert best_length(costs, 16, pipelined=False) == 3
    # With no round trip the cheapest frame wins: 30/1.5 = 20 < 40/1.75 = 22.9 ms per token.
    assert best_length(_costs(rtt_s=0.0, acceptance=0.5), 16, pipelined=False) == 1
    # Pipelined, a fully accepted frame's successor hides in its round trip: R / (1 + a^k).
    assert _costs(0.2, 0.5).seconds_per_round(1, pipelined=True) == pytest.approx(0.01 + 0.02 + 0.2 / 1.5)


def test_longer_drafts_for_longer_round_trips_and_better_drafters() -> None:
    for pipelined in (False, True):
        by_rtt = [best_length(_costs(rtt, 0.8), 16, pipelined) for rtt in (0.0, 0.02, 0.08, 0.3)]
        assert by_rtt == sorted(by_rtt) and by_rtt[0] < by_rtt[-1], by_rtt
        by_acceptance = [best_length(_costs(0.08, a), 16, pipelined) for a in (0.0, 0.5, 0.8, 0.95)]
        assert by_acceptance == sorted(by_acceptance) and by_acceptance[0] == 1 < by_acceptance[-1], by_acceptance
    # A pass that grows with the frame (a CPU target) shortens the choice.
    assert best_length(_costs(0.02, 0.8, 0.01), 16, False) < best_length(_costs(0.02, 0.8, 0.0), 16, False)
    assert best_length(_costs(1.0, 0.99), 5, False) == 5  # capped


def test_the_estimator_learns_the_costs() -> None:
    estimator = CostEstimator()
    for i in range(200):
        k = 2 if i % 2 else 14  # sizes 8 +- 6: a variance of 36 tokens^2
        # acceptance 0.75: per round 3 tokens accepted, then a rejection
        estimator.observe_round(k, 3, fully_accepted=False, compute_s=0.01 + 0.002 * k)
        estimator.observe_rtt(0.05)
        estimator.observe_draft(0.003 * k, k)
    costs = estimator.costs()
    assert costs.acceptance == pytest.approx(0.75, abs=0.01)
    assert costs.rtt_s == pytest.approx(0.05, rel=0.01)
    assert costs.draft_s_per_token == pytest.approx(0.003, rel=0.01)
    # The ridge prior (worth a variance of 4) shrinks the 2 ms-per-token slope by 36 / (36 + 4).
    slope = 0.002 * 36 / 40
    assert costs.verify_s_per_token == pytest.approx(slope, rel=0.02)
    assert costs.verify_s == pytest.approx(0.01 + 0.002 * 8 - slope * 8, rel=0.02)
    # One size only: the slope is unknown and taken as 0, the pass as its mean.
    flat = CostEstimator()
    for _ in range(50):
        flat.observe_round(4, 4, fully_accepted=True, compute_s=0.03)
    assert flat.costs().verify_s_per_token == 0.0 and flat.costs().verify_s == pytest.approx(0.03, rel=0.01)
    assert flat.costs().acceptance > 0.95
    # Exploration: one choice in eight is a neighbour of the best length.
    choices = [flat.choose(16, pipelined=True) for _ in range(32)]
    assert len(set(choices)) == 2


def test_auto_draft_is_lossless_and_drafts_longer_over_a_slower_link(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """Through the link emulator at RTT 0 and 60 ms: the target's greedy output, pipelined and not, and
    synchronously a longer mean draft where the round trip is measured at 60 ms (pipelined, at this
    pair's acceptance of about 0.5, the model prefers frames of 1-2 tokens at both delays)."""
    upstream_port = int(verifier_for("llama").address.rsplit(":", 1)[1])
    mean_length = {}
    with run_in_thread("127.0.0.1", upstream_port) as link:
        for rtt_ms in (0.0, 60.0):
            link.set_link(LinkConfig(rtt_ms=rtt_ms))
            for pipeline in (False, True):
                decoder = make_decoder("llama", link.address, auto_draft=True, pipeline=pipeline)
                drafted = rounds = 0
                for text in PROMPTS:  # the second starts from the first's estimates
                    result = lossless_greedy(decoder, "llama", text, 24, rtt_ms, pipeline)
                    drafted += result.stats.num_drafted
                    rounds += result.stats.num_rounds
                mean_length[rtt_ms, pipeline] = drafted / rounds
                # the emulated delay, plus what gRPC and two shared cores add to a round trip
                assert 0.8 * rtt_ms / 1000 <= decoder.costs.costs().rtt_s < rtt_ms / 1000 + 0.1
    assert mean_length[60.0, False] > max(mean_length[0.0, False], 4.0), mean_length  # past the default length


def test_auto_draft_refuses_trees() -> None:
    with pytest.raises(ValueError, match="auto_draft"):
        DecoderConfig(auto_draft=True, tree_budget=8)


def test_auto_draft_flag_reaches_the_decoder(tmp_path: Any) -> None:
    from tandemspec.cli import build_parser
    from tandemspec.edge.runtime import config_from_args

    for command in (["edge", "generate", "--prompt", "x"], ["edge", "serve"]):
        assert config_from_args(build_parser().parse_args([*command, "--auto-draft"])).auto_draft
        assert not config_from_args(build_parser().parse_args(command)).auto_draft
    toml = tmp_path / "tandem.toml"
    toml.write_text("[edge]\nauto_draft = true\n")
    assert config_from_args(build_parser().parse_args(["edge", "serve", "--config", str(toml)])).auto_draft

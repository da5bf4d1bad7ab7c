"""Branch frames from the edge: pre-drafted guesses of an awaited verdict (DecoderConfig.branches),
through a real verifier behind the link emulator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.edge.autodraft import Costs
from tandemspec.edge.decoder import DecoderConfig, HybridDecoder, _runner_up, branch_fits

PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")
RTT_MS = 40.0  # long enough that branches are drafted before each verdict arrives


def test_runner_up_is_the_likeliest_other_token() -> None:
    logits = np.array([0.0, 3.0, 1.0, 2.5], dtype=np.float32)
    log_p, runner, runner_log_p = _runner_up(logits, 1)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert runner == 3
    assert log_p == pytest.approx(np.log(probs[1])) and runner_log_p == pytest.approx(np.log(probs[3]))
    assert _runner_up(logits, 3)[1] == 1  # never the token itself


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_branches_are_lossless_and_some_guesses_come_true(
    family: str, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """With two branches per awaited verdict: the target's greedy output; where the drafter errs, some
    branches hit (the verifier went on with them); the edge and the verifier agree on every branch (a disagreement
    would end the session and the generation would fall back to local, failing exactness); a wrong
    branch costs no target pass (the verifier's passes are exactly the verified rounds)."""
    verifier = verifier_for(family)
    upstream_port = int(verifier.address.rsplit(":", 1)[1])
    totals: dict[int, dict[str, float]] = {}
    with run_in_thread("127.0.0.1", upstream_port, LinkConfig(rtt_ms=RTT_MS)) as link:
        for branches in (0, 2):
            decoder = make_decoder(family, link.address, branches=branches)
            before = verifier.metrics.snapshot()
            counts: dict[str, float] = {"rounds": 0, "sent": 0, "hits": 0, "rejected": 0}
            for text in PROMPTS:
                result = lossless_greedy(decoder, family, text, 32, branches)
                assert not result.stats.fell_back_to_local
                counts["rounds"] += result.stats.num_rounds - result.stats.num_merged_frames
                counts["sent"] += result.stats.num_branch_frames
                counts["hits"] += result.stats.num_branch_hits
                counts["rejected"] += result.stats.num_drafted - result.stats.num_accepted
            counts["hit_rate"] = decoder.costs.costs().branch_hit_rate  # what --auto-draft's model uses
            after = verifier.metrics.snapshot()
            counts["server_hits"] = int(after["branch_hits"] - before["branch_hits"])
            counts["server_misses"] = int(after["branch_misses"] - before["branch_misses"])
            counts["server_passes"] = int(after["step_passes"] - before["step_passes"])
            totals[branches] = counts
    none, some = totals[0], totals[2]
    assert none["sent"] == 0 and none["server_hits"] + none["server_misses"] == 0
    assert some["sent"] > 0, totals
    # some guesses come true where the drafter errs (on the tiny GPT-2 pair its runner-up never
    # was the target's token: random weights give flat distributions)
    assert some["rejected"] > 0 and (some["hits"] > 0 or family == "gpt2"), totals
    assert some["server_hits"] == some["hits"], totals  # both sides took the same branches
    assert none["hit_rate"] == 0 and (some["hit_rate"] > 0) == (some["hits"] > 0), totals
    # every branch sent was settled by the verifier (frames still in flight at the end included)
    assert some["server_hits"] + some["server_misses"] >= some["sent"] - 2 * len(PROMPTS), totals
    # one pass per verified round (a merged one shares its predecessor's), none for a stale frame or a miss
    # (frames still in flight when a generation ends are judged after it: at most 2 per generation)
    for counts in (none, some):
        assert counts["rounds"] <= counts["server_passes"] <= counts["rounds"] + 2 * len(PROMPTS), totals


def test_branches_are_budgeted_by_the_link_not_the_verifiers_wait() -> None:
    """A hit saves the link's round trip, not the verifier's wait for a batch: a slow round to a busy
    verifier over a fast link leaves no room for a branch; a slow link does, until it is spent."""
    busy = Costs(rtt_s=0.08, draft_s_per_token=0.001, verify_s=0.02, verify_s_per_token=0.0, acceptance=0.7)
    assert not branch_fits(busy, 4)  # link_rtt_s 0: all of the 80 ms was the verifier's
    slow_link = dataclasses.replace(busy, link_rtt_s=0.02)
    assert branch_fits(slow_link, 4) and branch_fits(slow_link, 4, spent_s=0.016)
    assert not branch_fits(slow_link, 4, spent_s=0.017)


def test_the_edge_tells_the_link_from_the_verifiers_wait(
    make_decoder: Callable[..., HybridDecoder], tiny_model_dir: Callable[..., Any], lossless_greedy: Any
) -> None:
    """A verifier that holds every step for a 60 ms batch window (a second, idle session is open):
    rounds take that long, and the verdicts' ``server_ms`` shows it is the verifier's wait, not the
    link's (loopback)."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.edge.client import ClientConfig, VerifierClient
    from tandemspec.types import SamplingParams, SessionOpen

    with serve_in_thread(CloudConfig(model_dir=tiny_model_dir("llama", 0), batch_window_ms=60.0)) as server:
        decoder = make_decoder("llama", server.address, branches=2)
        idle_client = VerifierClient(ClientConfig(address=server.address))
        idle = idle_client.open_stream()
        fingerprint = decoder.drafter.manifest.tokenizer_fingerprint
        idle.send(SessionOpen((1, 2, 3), SamplingParams(), 8, fingerprint))
        idle.recv()  # SessionReady: the idle session is open
        lossless_greedy(decoder, "llama", PROMPTS[0], 24)
        idle.close(cancel=True)
    costs = decoder.costs.costs()
    assert costs.rtt_s > 0.04 and costs.link_rtt_s < 0.02, costs


def test_no_branches_where_they_cannot_apply(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], lossless_greedy: Any
) -> None:
    """Behind the same 40 ms link where pipelined greedy chains send branches: synchronous decoding,
    trees, a deferred bonus and sampling send none (and greedy ones stay lossless)."""
    from tandemspec.edge.decoder import GenerationRequest
    from tandemspec.types import SamplingParams

    upstream_port = int(verifier_for("llama").address.rsplit(":", 1)[1])
    with run_in_thread("127.0.0.1", upstream_port, LinkConfig(rtt_ms=RTT_MS)) as link:
        control = lossless_greedy(make_decoder("llama", link.address, branches=2), "llama", PROMPTS[0], 16)
        assert control.stats.num_branch_frames > 0  # so the cases below would send some if they could
        for fields in ({"pipeline": False}, {"tree_budget": 6}, {"keep_bonus": False}):
            decoder = make_decoder("llama", link.address, branches=2, **fields)
            result = lossless_greedy(decoder, "llama", PROMPTS[0], 16, fields)
            assert result.stats.num_branch_frames == 0, fields
        decoder = make_decoder("llama", link.address, branches=2)
        prompt = decoder.tokenizer.encode_prompt(PROMPTS[0])
        sampling = SamplingParams(temperature=0.8, seed=3)
        sampled = decoder.generate(GenerationRequest(prompt_ids=prompt, sampling=sampling, max_new_tokens=16))
        assert sampled.stats.num_branch_frames == 0 and not sampled.stats.fell_back_to_local


def test_branches_config_and_flag(tmp_path: Any) -> None:
    from tandemspec.cli import build_parser
    from tandemspec.edge.runtime import config_from_args

    with pytest.raises(ValueError, match="branches"):
        DecoderConfig(branches=-1)
    for command in (["edge", "generate", "--prompt", "x"], ["edge", "serve"]):
        assert config_from_args(build_parser().parse_args([*command, "--branches", "3"])).branches == 3
        assert config_from_args(build_parser().parse_args(command)).branches == 2


def test_branch_rounds_reach_the_device_log(
    make_decoder: Callable[..., HybridDecoder],
    verifier_for: Callable[[str], Any],
    lossless_greedy: Any,
    tmp_path: Any,
) -> None:
    """With a device log, a branch that came true is logged like any round: one record per verified
    round, every token with its gate features (the guessed root's are those of the position it
    was guessed at)."""
    from tandemspec.edge.devicelog import DeviceLog

    upstream_port = int(verifier_for("llama").address.rsplit(":", 1)[1])
    with DeviceLog(tmp_path / "device.db") as log, run_in_thread("127.0.0.1", upstream_port) as link:
        link.set_link(LinkConfig(rtt_ms=RTT_MS))
        decoder = make_decoder("llama", link.address, log=log, branches=2)
        results = [lossless_greedy(decoder, "llama", text, 32) for text in PROMPTS]
        rounds = list(log.iter_rounds())
    assert sum(r.stats.num_branch_hits for r in results) > 0
    assert len(rounds) == sum(r.stats.num_rounds for r in results)
    features = np.stack([t.features for r in rounds for t in r.tokens])
    assert features.shape[1] == rounds[0].tokens[0].features.shape[0] and np.isfinite(features).all()

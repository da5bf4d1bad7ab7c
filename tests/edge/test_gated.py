"""Gated mode over a real verifier: trusted tokens go up as committed, doubted ones are verified.

The two ends of the gate's range pin the mode down: a gate that trusts nothing is lossless
decoding (pipelining off), one that trusts everything with no periodic check is local
decoding. In between, the verifier's counters show what was committed and what was judged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.edge.devicelog import DeviceLog
from tandemspec.edge.gate import TrustGate
from tandemspec.types import SamplingParams

PROMPTS = ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n    def __init__(self")
TRUST_NOTHING = TrustGate("top1", threshold=2.0)  # a top-1 probability never reaches 2
TRUST_ALL = TrustGate("top1", threshold=0.0)


class AlternatingGate(TrustGate):
    """Trusts ``run`` tokens, then doubts one, over and over (a scripted stand-in for a learned gate)."""

    def __init__(self, run: int) -> None:
        super().__init__("top1", threshold=0.0)
        self.run = run
        self.calls = 0

    def trusts(self, features: np.ndarray) -> bool:
        self.calls += 1
        return self.calls % (self.run + 1) != 0


def _generate(decoder: HybridDecoder, text: str, max_new: int, sampling: SamplingParams | None = None) -> Any:
    prompt = decoder.tokenizer.encode_prompt(text)
    return decoder.generate(GenerationRequest(prompt, sampling or SamplingParams(), max_new))


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=3)])
def test_gate_trusting_nothing_is_lossless(
    sampling: SamplingParams, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any]
) -> None:
    address = verifier_for("llama").address
    gated = make_decoder("llama", address, gate=TRUST_NOTHING, mode="gated", draft_length=4)
    lossless = make_decoder("llama", address, mode="lossless", pipeline=False, draft_length=4)
    for text in PROMPTS:
        got, want = _generate(gated, text, 24, sampling), _generate(lossless, text, 24, sampling)
        assert got.token_ids == want.token_ids, text
        assert got.stats.mode_used == "gated" and got.stats.num_trusted == 0
        assert got.stats.num_rounds == want.stats.num_rounds and got.stats.num_drafted == want.stats.num_drafted


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=3)])
def test_gate_trusting_everything_is_local(
    sampling: SamplingParams, make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any]
) -> None:
    """Output equals local decoding; 40 tokens overflow the verifier's 32 committed ids per frame,
    so one frame carries the first 32 as committed (labels only) and nothing is ever verified."""
    server = verifier_for("llama")
    gated = make_decoder("llama", server.address, gate=TRUST_ALL, mode="gated", gate_check_every=0)
    local = make_decoder("llama", None, mode="local")
    for text in PROMPTS:
        before = server.metrics.snapshot()
        got, want = _generate(gated, text, 40, sampling), _generate(local, text, 40, sampling)
        after = server.metrics.snapshot()
        assert got.token_ids == want.token_ids, text
        assert got.stats.num_trusted == 40 and got.stats.num_drafted == 0
        assert after["committed_tokens"] - before["committed_tokens"] == 32
        assert after["verified_tokens"] - before["verified_tokens"] == 0
        assert got.stats.num_target_passes == 1


def test_gated_commits_trusted_and_verifies_doubted(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any], tmp_path: Path
) -> None:
    """The cloud's counters: committed = trusted tokens that were sent; verified = drafted tokens.
    The device log gets every sent token with its label, committed ones flagged."""
    server = verifier_for("llama")
    log = DeviceLog(tmp_path / "log.db")
    gate = AlternatingGate(run=3)
    decoder = make_decoder("llama", server.address, log=log, gate=gate, mode="gated", draft_length=4)
    before = server.metrics.snapshot()
    result = _generate(decoder, PROMPTS[1], 48)
    after = server.metrics.snapshot()
    s = result.stats
    assert s.mode_used == "gated" and not s.fell_back_to_local and len(result.token_ids) == 48
    assert s.num_trusted > 0 and s.num_drafted > 0
    committed = after["committed_tokens"] - before["committed_tokens"]
    verified = after["verified_tokens"] - before["verified_tokens"]
    assert verified == s.num_drafted
    assert after["step_passes"] - before["step_passes"] == s.num_target_passes == s.num_rounds
    rounds = list(log.iter_rounds())
    tokens = [t for r in rounds for t in r.tokens]
    # Exact accounting: each frame starts where the previous verdict left off (its committed
    # tokens, its accepted drafts - greedy: the leading accepted labels - and the correction
    # or bonus), so no token is lost or repeated between frames ...
    prompt_length = len(decoder.tokenizer.encode_prompt(PROMPTS[1]))
    end = prompt_length
    for record in rounds:
        assert record.position == end
        drafts = [t.label for t in record.tokens if not t.committed]
        num_accepted = next((i for i, label in enumerate(drafts) if not label), len(drafts))
        end += sum(t.committed for t in record.tokens) + num_accepted + 1
    # ... and the trusted tokens never sent are exactly those after the last verdict.
    unsent = max(0, prompt_length + len(result.token_ids) - end)
    assert s.num_trusted - committed == unsent
    assert sum(t.committed for t in tokens) == committed
    assert sum(not t.committed for t in tokens) == s.num_drafted
    assert {r.mode for r in rounds} == {"gated"}
    assert all(t.features is not None and t.features.shape == tokens[0].features.shape for t in tokens)
    # Committed tokens were emitted as drafted: their labels say whether the target agreed.
    assert any(t.committed and t.label for t in tokens)
    log.close()


def test_periodic_check_bounds_unverified_runs(
    make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any]
) -> None:
    """With a gate that trusts everything, ``gate_check_every=5`` still verifies after every 5 tokens."""
    decoder = make_decoder(
        "llama", verifier_for("llama").address, gate=TRUST_ALL, mode="gated", gate_check_every=5, draft_length=2
    )
    server = verifier_for("llama")
    before = server.metrics.snapshot()
    result = _generate(decoder, PROMPTS[0], 40)
    after = server.metrics.snapshot()
    s = result.stats
    assert s.num_rounds >= 40 // (5 + 3) and s.num_drafted > 0
    # Every verified block is preceded by exactly 5 trusted tokens, sent as its committed ids;
    # only the run after the last verdict (at most 5) is never sent.
    committed = after["committed_tokens"] - before["committed_tokens"]
    assert committed == 5 * s.num_rounds
    assert 0 <= s.num_trusted - committed <= 5


def test_gated_without_a_gate_is_a_clear_error(make_decoder: Callable[..., HybridDecoder]) -> None:
    decoder = make_decoder("llama", None, mode="gated")
    with pytest.raises(ValueError, match="trust gate"):
        _generate(decoder, PROMPTS[0], 4)


def test_gated_falls_back_to_local_without_a_cloud(make_decoder: Callable[..., HybridDecoder]) -> None:
    decoder = make_decoder("llama", None, gate=TRUST_NOTHING, mode="gated")
    result = _generate(decoder, PROMPTS[0], 8)
    assert result.stats.fell_back_to_local and len(result.token_ids) == 8


@pytest.mark.parametrize(
    "make_gate", [lambda: TRUST_ALL, lambda: TRUST_NOTHING, lambda: AlternatingGate(run=2)], ids=["all", "none", "alt"]
)
def test_gated_stops_exactly_at_limits_and_stop_strings(
    make_gate: Callable[[], TrustGate], make_decoder: Callable[..., HybridDecoder], verifier_for: Callable[[str], Any]
) -> None:
    """``max_new_tokens`` and stop strings end a gated generation at the same token wherever it comes from."""
    address = verifier_for("llama").address

    def generate(max_new: int, stops: tuple[str, ...] = ()) -> Any:
        decoder = make_decoder("llama", address, gate=make_gate(), mode="gated", draft_length=3)
        prompt = decoder.tokenizer.encode_prompt(PROMPTS[0])
        return decoder.generate(GenerationRequest(prompt, SamplingParams(), max_new, stop_strings=stops))

    for limit in (1, 2, 7):
        result = generate(limit)
        assert len(result.token_ids) == limit and result.finish_reason == "length"
    full = generate(20)
    stop = full.text[5:8]
    assert stop.strip(), full.text
    result = generate(20, (stop,))
    assert result.finish_reason == "stop" and full.text.startswith(result.text)
    assert stop not in result.text and len(result.text) <= 5 + len(stop)

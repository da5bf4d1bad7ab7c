"""A refusal is not an outage: what the edge does with each kind of answer from the verifier.

* transport loss -> fall back to local, back off (``test_fallback.py``);
* ``RESOURCE_EXHAUSTED`` (the verifier is full) -> that request falls back, reported as
  ``busy``, and no backoff: the next request goes to the cloud;
* the request's own invalid parameters -> an error for that request, never a local answer;
* another tokenizer (``FAILED_PRECONDITION``) -> an error naming both fingerprints, in
  every mode, ``cloud`` included, and a non-zero exit of ``tandem edge generate``;
* a request longer than the verifier's ``max_new_tokens`` -> continued in fresh sessions,
  never refused mid-stream.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandemspec.cli import main
from tandemspec.edge.client import ClientConfig, CloudRefused, TokenizerMismatch, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.devicelog import DeviceLog
from tandemspec.edge.gate import TrustGate
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.fingerprint import tokenizer_fingerprint
from tandemspec.types import SamplingParams, SessionKind, SessionOpen, SessionReady

PROMPT = "def add(a, b):\n    return"


def _decoder(drafter_for: Callable[[str], Any], client: VerifierClient, **fields: Any) -> HybridDecoder:
    drafter, tokenizer = drafter_for("llama")
    return HybridDecoder(drafter, tokenizer, client, DecoderConfig(**fields))


def _request(tokenizer: EdgeTokenizer, max_new: int = 12, **fields: Any) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tokenizer.encode_prompt(PROMPT), max_new_tokens=max_new, **fields)


def test_invalid_request_is_an_error_and_the_next_request_still_goes_to_the_cloud(
    drafter_for: Callable[[str], Any], verifier_for: Callable[[str], Any]
) -> None:
    client = VerifierClient(ClientConfig(address=verifier_for("llama").address))
    bad = _decoder(drafter_for, client, return_top_k=10_000)  # over the verifier's max_return_top_k
    good = _decoder(drafter_for, client)
    with pytest.raises(CloudRefused, match="return_top_k") as refused:
        bad.generate(_request(bad.tokenizer))
    assert refused.value.is_invalid_request
    assert client.backoff.failures == 0 and client.backoff.ready()
    result = good.generate(_request(good.tokenizer))
    assert result.stats.mode_used == "lossless" and not result.stats.fell_back_to_local
    client.close()


def test_full_verifier_falls_back_for_that_request_only(
    drafter_for: Callable[[str], Any], tiny_model_dir: Callable[..., Path]
) -> None:
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    with serve_in_thread(CloudConfig(model_dir=tiny_model_dir("llama", 0), port=0, max_sessions=1)) as server:
        client = VerifierClient(ClientConfig(address=server.address))
        decoder = _decoder(drafter_for, client)
        info = client.ensure_connected()
        holder = client.open_stream()  # another app's session holds the only slot
        holder.send(
            SessionOpen(
                prompt_ids=(1, 5, 6),
                sampling=SamplingParams(),
                max_new_tokens=8,
                tokenizer_fingerprint=info.tokenizer_fingerprint,
                kind=SessionKind.VERIFY,
            )
        )
        assert isinstance(holder.recv(), SessionReady)
        busy = decoder.generate(_request(decoder.tokenizer))
        s = busy.stats
        assert s.fell_back_to_local and s.fallback_kind == "busy" and "RESOURCE_EXHAUSTED" not in s.fallback_reason
        assert "busy" in s.fallback_reason and len(busy.token_ids) == 12
        assert client.backoff.failures == 0  # the verifier is healthy: no backoff
        holder.close(cancel=True)
        holder.wait_closed(5.0)
        for _ in range(100):  # the verifier frees the slot when it sees the cancel
            if server.metrics.snapshot()["sessions_active"] == 0:
                break
            time.sleep(0.05)
        again = decoder.generate(_request(decoder.tokenizer))
        assert again.stats.mode_used == "lossless" and not again.stats.fell_back_to_local
        client.close()


@pytest.fixture(scope="module")
def other_tokenizer_verifier(
    tiny_model_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A verifier on the tiny Llama target whose tokenizer.json normalises differently."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    model_dir = tmp_path_factory.mktemp("other-tokenizer") / "target"
    shutil.copytree(tiny_model_dir("llama", 0), model_dir)
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFKC"}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    with serve_in_thread(CloudConfig(model_dir=model_dir, port=0)) as handle:
        handle.fingerprint = tokenizer_fingerprint(model_dir / "tokenizer.json")
        yield handle


@pytest.mark.parametrize("mode", ["lossless", "gated", "cloud"])
def test_tokenizer_mismatch_is_a_clear_error_in_every_mode(
    mode: str, drafter_for: Callable[[str], Any], other_tokenizer_verifier: Any
) -> None:
    drafter, tokenizer = drafter_for("llama")
    client = VerifierClient(ClientConfig(address=other_tokenizer_verifier.address))
    gate = TrustGate("top1", threshold=0.5)
    decoder = HybridDecoder(drafter, tokenizer, client, DecoderConfig(mode=mode), gate=gate)  # type: ignore[arg-type]
    with pytest.raises(TokenizerMismatch) as refused:
        decoder.generate(_request(tokenizer))
    edge_fp = drafter.manifest.tokenizer_fingerprint
    assert edge_fp in str(refused.value) and other_tokenizer_verifier.fingerprint in str(refused.value)
    assert other_tokenizer_verifier.fingerprint != edge_fp
    assert client.backoff.failures == 0
    client.close()


def test_cli_exits_non_zero_on_tokenizer_mismatch(
    tiny_bundle_dir: Callable[..., Path], other_tokenizer_verifier: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["edge", "generate", "--cloud", other_tokenizer_verifier.address, "--bundle", str(tiny_bundle_dir("llama"))]
    code = main([*args, "--prompt", PROMPT, "--max-new-tokens", "4", "--mode", "cloud"])
    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""  # no completion printed
    assert other_tokenizer_verifier.fingerprint in captured.err and "tokenizer" in captured.err


@pytest.fixture(scope="module")
def short_verifier(tiny_model_dir: Callable[..., Path]) -> Iterator[Any]:
    """A verifier that grants at most 8 new tokens per session."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    with serve_in_thread(CloudConfig(model_dir=tiny_model_dir("llama", 0), port=0, max_new_tokens=8)) as handle:
        yield handle


@pytest.mark.parametrize(
    ("mode", "pipeline"), [("lossless", True), ("lossless", False), ("cloud", False), ("gated", False)]
)
def test_requests_past_the_verifiers_max_new_tokens_continue_in_fresh_sessions(
    mode: str,
    pipeline: bool,
    drafter_for: Callable[[str], Any],
    short_verifier: Any,
    target_greedy: Callable[[str, tuple[int, ...], int], tuple[int, ...]],
) -> None:
    drafter, tokenizer = drafter_for("llama")
    client = VerifierClient(ClientConfig(address=short_verifier.address))
    gate = TrustGate("top1", threshold=2.0)  # trusts nothing: gated output is the target's
    config = DecoderConfig(mode=mode, pipeline=pipeline, draft_length=3)  # type: ignore[arg-type]
    decoder = HybridDecoder(drafter, tokenizer, client, config, gate=gate)
    request = _request(tokenizer, max_new=30)
    before = short_verifier.metrics.snapshot()
    result = decoder.generate(request)
    after = short_verifier.metrics.snapshot()
    s = result.stats
    assert not s.fell_back_to_local and s.mode_used == mode, s.fallback_reason
    assert result.token_ids == target_greedy("llama", request.prompt_ids, len(result.token_ids))
    assert len(result.token_ids) == 30 or result.finish_reason == "stop"
    assert s.num_sessions >= 4 and client.backoff.failures == 0
    assert after["session_errors"] == before["session_errors"]
    client.close()


class RecordingGate(TrustGate):
    """Trusts ``run`` tokens, doubts one, over and over; records every feature row it is asked about."""

    def __init__(self, run: int) -> None:
        super().__init__("top1", threshold=0.0)
        self.run = run
        self.inputs: list[np.ndarray] = []

    def trusts(self, features: np.ndarray) -> bool:
        self.inputs.append(np.array(features[0]))
        return len(self.inputs) % (self.run + 1) != 0


def test_gated_logged_features_are_the_gates_inputs(
    drafter_for: Callable[[str], Any], verifier_for: Callable[[str], Any], tmp_path: Path
) -> None:
    """One definition of every feature, the position included: what is logged is what the gate saw."""
    drafter, tokenizer = drafter_for("llama")
    client = VerifierClient(ClientConfig(address=verifier_for("llama").address))
    gate = RecordingGate(run=3)
    with DeviceLog(tmp_path / "log.db") as log:
        config = DecoderConfig(mode="gated", draft_length=3, gate_check_every=0)
        decoder = HybridDecoder(drafter, tokenizer, client, config, log, gate=gate)
        result = decoder.generate(_request(tokenizer, max_new=40))
        assert result.stats.num_trusted > 0 and result.stats.num_rounds > 1
        rounds = list(log.iter_rounds())
    scored = iter(gate.inputs)
    num_compared = 0
    for record in rounds:
        committed = [t for t in record.tokens if t.committed]
        drafted = [t for t in record.tokens if not t.committed]
        # The gate scored every committed (trusted) token, then the doubted one the block starts with.
        for token in [*committed, *drafted[:1]]:
            np.testing.assert_array_equal(token.features, next(scored))
            num_compared += 1
        # Later drafts count on from the doubted token: tokens since the last check.
        positions = [int(t.features[3]) for t in record.tokens]
        assert positions == list(range(positions[0], positions[0] + len(positions)))
    assert num_compared >= 10
    client.close()

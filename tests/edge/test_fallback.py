"""Losing the cloud is a state: a verifier killed mid-generation, then backoff before reconnecting."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.edge.demo import VerifierProcess, local_verifier

PROMPT = "import os\nimport sys\n\n\ndef main(argv"
KILL_AFTER = 8
MAX_NEW = 32


@pytest.fixture
def verifier_process(tiny_model_dir: Callable[..., Path]) -> Iterator[VerifierProcess]:
    """``tandem cloud serve --port 0`` as a subprocess on the tiny Llama target."""
    with local_verifier(tiny_model_dir("llama", 0), timeout_s=120) as verifier:
        yield verifier


def test_verifier_killed_mid_generation(
    verifier_process: VerifierProcess, make_decoder: Callable[..., HybridDecoder], target_greedy: Any
) -> None:
    """SIGKILL after a few tokens: the generation completes locally, nothing lost or repeated."""
    decoder = make_decoder("llama", verifier_process.address, pipeline=True, draft_length=4)
    prompt = decoder.tokenizer.encode_prompt(PROMPT)
    streamed: list[int] = []

    def on_tokens(ids: list[int], text: str) -> None:
        streamed.extend(ids)
        if len(streamed) >= KILL_AFTER and verifier_process.process.poll() is None:
            verifier_process.process.kill()
            verifier_process.process.wait()

    result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW), on_tokens)
    s = result.stats
    assert s.fell_back_to_local and s.mode_used == "local" and s.fallback_reason
    k = s.fallback_at_token
    assert KILL_AFTER <= k < MAX_NEW
    assert tuple(streamed) == result.token_ids  # every token streamed exactly once
    assert result.token_ids[:k] == target_greedy("llama", prompt, k)  # the verified prefix
    local = make_decoder("llama", None, mode="local")
    continuation = local.generate(
        GenerationRequest(prompt_ids=prompt + result.token_ids[:k], max_new_tokens=MAX_NEW - k)
    )
    assert result.token_ids[k:] == continuation.token_ids  # the local continuation from the committed prefix
    assert len(result.token_ids) == MAX_NEW or result.finish_reason == "stop"
    assert s.num_local_tokens == len(result.token_ids) - k

    # The next generation does not wait on the dead verifier: it backs off and goes local at once.
    again = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=4))
    assert again.stats.fell_back_to_local and "next attempt" in again.stats.fallback_reason
    assert again.stats.bytes_up == 0

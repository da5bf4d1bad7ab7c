"""A dead link is found by keepalive in seconds, not by the 20 s receive timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.edge.client import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from tandemspec.edge.decoder import GenerationRequest, HybridDecoder

PROMPT = "import os\nimport sys\n\n\ndef main(argv"
STALL_MS = 60_000  # far past the receive timeout: only keepalive can end the wait in time
RECV_TIMEOUT_S = 20.0


@pytest.mark.parametrize(
    ("time_ms", "timeout_ms"),
    [(KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS), (1_500, 500)],  # the defaults; the tightest the verifier allows
    ids=["default", "configured"],
)
def test_stalled_link_detected_by_keepalive(
    start_replica: Callable[..., Any],
    make_edge: Callable[..., HybridDecoder],
    target_greedy: Any,
    time_ms: int,
    timeout_ms: int,
) -> None:
    replica = start_replica()
    with run_in_thread("127.0.0.1", replica.port, LinkConfig()) as link:
        keepalive = {"keepalive_time_s": time_ms / 1e3, "keepalive_timeout_s": timeout_ms / 1e3}
        edge = make_edge(link.address, client=keepalive)
        assert edge.client is not None and edge.client.config.recv_timeout_s == RECV_TIMEOUT_S
        prompt = edge.tokenizer.encode_prompt(PROMPT)
        arrivals: list[float] = []

        def on_tokens(ids: list[int], text: str) -> None:
            arrivals.append(time.monotonic())
            if len(arrivals) == 1:
                link.stall(STALL_MS)

        result = edge.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=24), on_tokens)
        s = result.stats
        assert s.fell_back_to_local and "no answer" not in s.fallback_reason, s.fallback_reason
        detected_s = arrivals[1] - arrivals[0]  # the first local token follows the detection at once
        # worst case: the last byte lands just after a keepalive timer restarts (2 intervals), then the ack timeout
        assert detected_s < (2 * time_ms + timeout_ms) / 1e3 < RECV_TIMEOUT_S / 2
        k = s.fallback_at_token
        assert result.token_ids[:k] == target_greedy(prompt, k)
        edge.client.close()

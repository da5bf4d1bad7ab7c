"""A pool of verifier replicas behind one edge channel: spread, loss of a replica, drain."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandemspec.edge.client import Backoff, ClientConfig
from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
from tandemspec.edge.pool import channel_target

PROMPT = "import os\nimport sys\n\n\ndef main(argv"
MAX_NEW = 32
STOP_AFTER = 8  # tokens streamed before a replica is lost or drained


def pool_address(*replicas: Any) -> str:
    return ",".join(replica.address for replica in replicas)


def holder(replicas: tuple[Any, ...]) -> Any:
    """The one replica with a session open now."""
    (busy,) = [r for r in replicas if r.metrics.snapshot()["sessions_active"] > 0]
    return busy


def test_channel_target_forms() -> None:
    assert channel_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert channel_target("verifier:50051") == "verifier:50051"
    assert channel_target("dns:///verifiers:50051") == "dns:///verifiers:50051"
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    for bad, says in [
        ("verifier-a:1,verifier-b:2", "dns:///"),
        ("127.0.0.1:1,[::1]:2", "mixes"),
        ("127.0.0.1:1,127.0.0.1", "IP:PORT"),
        ("127.0.0.1:1,", "IP:PORT"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=says):
            ClientConfig(address=bad)


def test_sessions_spread_over_replicas(
    start_replica: Callable[..., Any], make_edge: Callable[..., HybridDecoder], target_greedy: Any
) -> None:
    """One edge, three replicas: round_robin puts its sessions on every replica, each output lossless."""
    replicas = (start_replica(), start_replica(), start_replica())
    edge = make_edge(pool_address(*replicas))
    prompt = edge.tokenizer.encode_prompt(PROMPT)
    expected = target_greedy(prompt, MAX_NEW)
    for _ in range(6):
        result = edge.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW))
        assert not result.stats.fell_back_to_local and result.token_ids == expected
    per_replica = [r.metrics.snapshot()["sessions_total"] for r in replicas]
    # round_robin over the replicas ready at each pick: all three once every connection is up
    assert sum(per_replica) == 6 and min(per_replica) >= 1, per_replica
    assert edge.client is not None
    edge.client.close()


def test_replica_lost_mid_session(
    start_replica: Callable[..., Any], make_edge: Callable[..., HybridDecoder], target_greedy: Any
) -> None:
    """The replica serving a session dies: that generation goes local with nothing lost or repeated;
    after the backoff the next session goes to the live replica and is lossless again."""
    replicas = (start_replica(), start_replica())
    now = [0.0]
    edge = make_edge(pool_address(*replicas), backoff=Backoff(0.5, 30.0, clock=lambda: now[0]), draft_length=4)
    prompt = edge.tokenizer.encode_prompt(PROMPT)
    streamed: list[int] = []
    lost: list[Any] = []

    def on_tokens(ids: list[int], text: str) -> None:
        streamed.extend(ids)
        if len(streamed) >= STOP_AFTER and not lost:
            lost.append(holder(replicas))
            lost[0].stop(0)  # abrupt: every stream on it is cut

    result = edge.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW), on_tokens)
    s = result.stats
    assert s.fell_back_to_local and s.fallback_kind == "unavailable"
    k = s.fallback_at_token
    assert STOP_AFTER <= k < MAX_NEW
    assert tuple(streamed) == result.token_ids  # every token streamed exactly once
    assert result.token_ids[:k] == target_greedy(prompt, k)
    local = make_edge(None, mode="local")
    continuation = local.generate(
        GenerationRequest(prompt_ids=prompt + result.token_ids[:k], max_new_tokens=MAX_NEW - k)
    )
    assert result.token_ids[k:] == continuation.token_ids

    (survivor,) = [r for r in replicas if r is not lost[0]]
    before = survivor.metrics.snapshot()["sessions_total"]
    backing_off = edge.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=4))
    assert backing_off.stats.fell_back_to_local and "next attempt" in backing_off.stats.fallback_reason
    assert survivor.metrics.snapshot()["sessions_total"] == before  # backing off opens no session
    now[0] += 60.0  # past the backoff
    assert_sessions_go_to(survivor, edge, prompt, target_greedy(prompt, MAX_NEW))
    assert edge.client is not None
    edge.client.close()


def assert_sessions_go_to(
    replica: Any, edge: HybridDecoder, prompt: tuple[int, ...], expected: tuple[int, ...], count: int = 3
) -> None:
    """The edge's next ``count`` generations are all verified (no fallback, the target's output) on ``replica``."""
    before = replica.metrics.snapshot()["sessions_total"]
    for _ in range(count):
        again = edge.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW))
        assert not again.stats.fell_back_to_local and again.token_ids == expected
    assert replica.metrics.snapshot()["sessions_total"] == before + count


def test_draining_replica_finishes_its_session_and_gets_no_new_ones(
    start_replica: Callable[..., Any], make_edge: Callable[..., HybridDecoder], target_greedy: Any
) -> None:
    """A stop (what SIGTERM runs) reports NOT_SERVING, lets the open session finish on it with no
    fallback, and the pool sends every later session to the other replica."""
    replicas = (start_replica(drain_grace_s=30), start_replica(drain_grace_s=30))
    edge = make_edge(pool_address(*replicas))
    prompt = edge.tokenizer.encode_prompt(PROMPT)
    expected = target_greedy(prompt, MAX_NEW)
    draining: list[Any] = []
    statuses: list[int] = []
    stopper: list[threading.Thread] = []

    def on_tokens(ids: list[int], text: str) -> None:
        if draining or len(ids) == 0:
            return
        draining.append(holder(replicas))
        with grpc.insecure_channel(draining[0].address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            statuses.append(next(watch).status)
            stopper.append(threading.Thread(target=draining[0].stop))
            stopper[0].start()
            statuses.append(next(watch).status)  # the update the drain announces
            watch.cancel()

    result = edge.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=MAX_NEW), on_tokens)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert not result.stats.fell_back_to_local and result.token_ids == expected  # finished on the draining replica
    stopper[0].join(timeout=20)
    assert not stopper[0].is_alive()  # the drain ended with its last session, well inside the grace
    (other,) = [r for r in replicas if r is not draining[0]]
    assert_sessions_go_to(other, edge, prompt, expected)
    assert edge.client is not None
    edge.client.close()

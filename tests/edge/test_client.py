"""The gRPC client: deadlines, backoff with jitter, reconnecting to a verifier that comes back."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tandemspec.edge.client import Backoff, ClientConfig, CloudRefused, CloudUnavailable, VerifierClient
from tandemspec.net import free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_jittered_and_capped() -> None:
    clock = FakeClock()
    backoff = Backoff(initial_s=0.5, max_s=4.0, clock=clock, rng=random.Random(0))
    assert backoff.ready()
    delays = [backoff.record_failure() for _ in range(8)]
    ceilings = [min(4.0, 0.5 * 2**i) for i in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered
    assert not backoff.ready()
    clock.now += backoff.remaining_s()
    assert backoff.ready()
    backoff.record_success()
    assert backoff.failures == 0 and backoff.ready()


def test_unreachable_then_backoff_then_reconnect(tiny_model_dir: Callable[..., Path]) -> None:
    """No verifier: fails within the connect deadline; during backoff no attempt is made;
    once the verifier is up on that address and the wait is over, the client reconnects."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    port = free_port()
    clock = FakeClock()
    backoff = Backoff(initial_s=1.0, max_s=8.0, clock=clock, rng=random.Random(1))
    client = VerifierClient(ClientConfig(address=f"127.0.0.1:{port}", connect_timeout_s=0.5), backoff)
    with pytest.raises(CloudUnavailable, match="cannot reach"):
        client.ensure_connected()
    assert backoff.failures == 1
    with pytest.raises(CloudUnavailable, match="next attempt"):
        client.ensure_connected()
    with serve_in_thread(CloudConfig(model_dir=tiny_model_dir("llama", 0), port=port)):
        clock.now += 10.0
        info = client.ensure_connected()
        assert info.vocab_size == 384 and info.limits.max_support > 0
        assert backoff.failures == 0
    client.close()


def test_bearer_token(tiny_model_dir: Callable[..., Path]) -> None:
    """The token travels as metadata; a wrong one is refused, not silently served."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    with serve_in_thread(CloudConfig(model_dir=tiny_model_dir("llama", 0), port=0, auth_token="s3cret")) as handle:
        good = VerifierClient(ClientConfig(address=handle.address, auth_token="s3cret"))
        assert good.ensure_connected().vocab_size == 384
        bad = VerifierClient(ClientConfig(address=handle.address, auth_token="wrong"))
        with pytest.raises(CloudRefused, match="UNAUTHENTICATED"):  # a refusal: no fallback, no backoff
            bad.ensure_connected()
        assert bad.backoff.failures == 0
        good.close()
        bad.close()


def test_hung_verifier_hits_the_deadline(tiny_bundle_dir: Callable[..., Path]) -> None:
    """A verifier that answers Info but never a frame: the generation falls back after recv_timeout_s."""
    import threading
    from concurrent import futures

    import grpc

    from tandemspec.edge.bundle import load_bundle
    from tandemspec.edge.decoder import GenerationRequest, HybridDecoder
    from tandemspec.edge.drafter import OnnxDrafter
    from tandemspec.edge.tokenizer import EdgeTokenizer
    from tandemspec.protos import tandem_pb2 as pb

    bundle = load_bundle(tiny_bundle_dir("llama"))
    released = threading.Event()

    def info(request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        limits = pb.Limits(max_context_tokens=512, max_draft_tokens=8, max_new_tokens=64, max_support=16)
        fingerprint = bundle.manifest.tokenizer_fingerprint
        return pb.InfoResponse(tokenizer_fingerprint=fingerprint, vocab_size=384, limits=limits)

    def decode(requests: object, context: grpc.ServicerContext) -> object:
        released.wait(10)  # hang
        return iter(())

    handler = grpc.method_handlers_generic_handler(
        "tandemspec.v1.Verifier",
        {
            "Info": grpc.unary_unary_rpc_method_handler(
                info, pb.InfoRequest.FromString, pb.InfoResponse.SerializeToString
            ),
            "Decode": grpc.stream_stream_rpc_method_handler(
                decode, pb.EdgeFrame.FromString, pb.CloudFrame.SerializeToString
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = VerifierClient(ClientConfig(address=f"127.0.0.1:{port}", recv_timeout_s=0.5))
        decoder = HybridDecoder(OnnxDrafter(bundle), EdgeTokenizer.from_bundle(bundle), client)
        result = decoder.generate(GenerationRequest(prompt_ids=(1, 50, 60), max_new_tokens=6))
        assert result.stats.fell_back_to_local and "no answer" in result.stats.fallback_reason
        assert len(result.token_ids) == 6 and result.stats.wall_s < 5
        client.close()
    finally:
        released.set()
        server.stop(0)

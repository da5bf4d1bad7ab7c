"""Server plumbing: Info, health, reflection, bearer tokens, TLS, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_driver import DecodeStream, open_message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.protos import codec
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.protos import tandem_pb2_grpc as pb_grpc
from tandemspec.types import DraftFrame, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
TOKEN = "s3cret-token"


def _info(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] | None = None) -> pb.InfoResponse:
    return pb_grpc.VerifierStub(channel).Info(pb.InfoRequest(), metadata=metadata, timeout=10)


def test_info_health_and_reflection(llama_server: Any, fingerprint: str) -> None:
    with grpc.insecure_channel(llama_server.address) as channel:
        info = codec.decode_info(_info(channel))
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tandemspec.v1.Verifier"), timeout=10
        )
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert info.tokenizer_fingerprint == fingerprint
    assert info.vocab_size == 384 and info.device == "cpu" and info.dtype == "float32"
    assert info.limits.max_context_tokens == 512  # capped by the tiny model's positions
    assert "verify" in info.capabilities and "batching" in info.capabilities
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert {"tandemspec.v1.Verifier", "grpc.health.v1.Health"} <= services


async def _one_round(channel: grpc.aio.Channel, fingerprint: str, metadata: Any = None) -> Verdict:
    stream = DecodeStream(channel, metadata)
    await stream.open(open_message(PROMPT, fingerprint))
    await stream.send(DraftFrame(seq=0, epoch=0, position=len(PROMPT), draft_ids=(5, 6)))
    verdict = await stream.receive()
    assert isinstance(verdict, Verdict)
    assert await stream.finish() == grpc.StatusCode.OK
    return verdict


def test_metrics_endpoint(llama_target_dir: Path, fingerprint: str) -> None:
    import urllib.request

    with serve_in_thread(CloudConfig(model_dir=llama_target_dir, metrics_port=0)) as server:
        assert server.metrics_port
        with grpc.insecure_channel(server.address) as channel:
            _info(channel)

        async def run() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await _one_round(channel, fingerprint)

        asyncio.run(run())
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    assert "tandem_verifier_frames_total 1.0" in text
    assert "tandem_verifier_verified_tokens_total 2.0" in text
    assert "tandem_verifier_batch_size_bucket" in text and "tandem_verifier_sessions_active 0.0" in text


def test_bearer_token(llama_target_dir: Path, fingerprint: str) -> None:
    with serve_in_thread(CloudConfig(model_dir=llama_target_dir, auth_token=TOKEN)) as server:
        with grpc.insecure_channel(server.address) as channel:
            for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
                with pytest.raises(grpc.RpcError) as refused:
                    _info(channel, metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _info(channel, (("authorization", f"Bearer {TOKEN}"),)).vocab_size == 384
            # Health probes need no token.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        async def decode() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stream = DecodeStream(channel)
                with contextlib.suppress(grpc.aio.AioRpcError):  # the call may fail before the write
                    await stream.send(open_message(PROMPT, fingerprint))
                assert await stream.receive() is None
                assert await stream.call.code() == grpc.StatusCode.UNAUTHENTICATED, await stream.call.details()
                await _one_round(channel, fingerprint, (("authorization", f"Bearer {TOKEN}"),))

        asyncio.run(decode())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_token(llama_target_dir: Path, fingerprint: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    config = CloudConfig(model_dir=llama_target_dir, tls_cert=cert, tls_key=key, auth_token=TOKEN)
    with serve_in_thread(config) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())

        async def run() -> Verdict:
            async with grpc.aio.secure_channel(server.address, credentials) as channel:
                return await _one_round(channel, fingerprint, (("authorization", f"Bearer {TOKEN}"),))

        assert asyncio.run(run()).committed_length > len(PROMPT)
        with grpc.insecure_channel(server.address) as plain, pytest.raises(grpc.RpcError):
            _info(plain, (("authorization", f"Bearer {TOKEN}"),))


def test_stop_drains_in_flight_sessions(llama_target_dir: Path, fingerprint: str) -> None:
    """A stop lets an open session finish its rounds, refuses new calls, and is idempotent."""
    server = serve_in_thread(CloudConfig(model_dir=llama_target_dir, drain_grace_s=30))

    async def run() -> float:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint))
            stopper = threading.Thread(target=server.stop)
            stopper.start()
            await asyncio.sleep(0.3)  # the server is draining now
            position, epoch = len(PROMPT), 0
            for seq in range(3):
                await stream.send(DraftFrame(seq=seq, epoch=epoch, position=position, draft_ids=(5,)))
                verdict = await stream.receive()
                assert isinstance(verdict, Verdict)
                position, epoch = verdict.committed_length, verdict.epoch
            assert await stream.finish() == grpc.StatusCode.OK
            start = time.monotonic()
            await asyncio.to_thread(stopper.join)
            return time.monotonic() - start

    waited = asyncio.run(run())
    assert waited < 10  # the stop ended with the last session, not at the grace limit
    server.stop()  # idempotent
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        _info(channel)


@pytest.mark.parametrize(
    ("policy", "keeps_connection"),
    [
        ({"min_ping_interval_s": 0.5}, True),  # the verifier's policy, scaled down to a fast test
        ({"min_ping_interval_s": 300.0, "permit_pings_without_calls": False}, False),  # gRPC's default policy
    ],
)
def test_idle_channel_keepalive_is_not_answered_with_goaway(
    llama_target_dir: Path, policy: dict[str, Any], keeps_connection: bool
) -> None:
    """An idle channel that pings faster than gRPC's default policy allows, but slower than
    the verifier's minimum, keeps its one connection: no GOAWAY too_many_pings, no reconnect."""
    options = [
        ("grpc.keepalive_time_ms", 1_000),
        ("grpc.keepalive_timeout_ms", 2_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    states: list[grpc.ChannelConnectivity] = []
    with (
        serve_in_thread(CloudConfig(model_dir=llama_target_dir, **policy)) as server,
        grpc.insecure_channel(server.address, options=options) as channel,
    ):
        _info(channel)
        channel.subscribe(states.append, try_to_connect=False)
        time.sleep(4.0)  # four keepalive intervals with no call (gRPC's policy sends GOAWAY at ~3 s)
        _info(channel)  # the same channel still serves
    reconnected = any(state is not grpc.ChannelConnectivity.READY for state in states)
    assert reconnected != keeps_connection, states


def test_edge_keepalive_fits_the_verifier_ping_policy() -> None:
    """The edge's default keepalive interval is comfortably above the verifier's minimum."""
    from tandemspec.edge.client import ClientConfig

    options = dict(ClientConfig(address="127.0.0.1:1").keepalive_channel_options())
    config = CloudConfig()
    assert options["grpc.keepalive_permit_without_calls"] == 1 and config.permit_pings_without_calls
    assert options["grpc.keepalive_time_ms"] >= 2 * config.min_ping_interval_s * 1e3

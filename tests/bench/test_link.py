"""The link emulator: exact forwarding, delay, bandwidth, jitter order, stalls, resets, gRPC."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandemspec.bench.link import (
    LinkConfig,
    LinkThread,
    plan_delivery,
    read_size,
    run_in_thread,
)

# Generous: the test machine is small and shared with other jobs.
SLACK_S = 0.25


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte back; half-close when the client does."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass  # the link reset this connection, which some tests do on purpose
    writer.close()


@pytest.fixture
def echo_port() -> Iterator[int]:
    """An asyncio echo server on 127.0.0.1, port 0, running in its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    start = asyncio.start_server(_echo, "127.0.0.1", 0)
    server = asyncio.run_coroutine_threadsafe(start, loop).result(timeout=5)
    yield server.sockets[0].getsockname()[1]
    server.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


@pytest.fixture
def link(echo_port: int) -> Iterator[LinkThread]:
    """An unshaped link in front of the echo server."""
    with run_in_thread("127.0.0.1", echo_port) as handle:
        yield handle


def _connect(handle: LinkThread) -> socket.socket:
    """A blocking client socket through the link, Nagle off."""
    sock = socket.create_connection(("127.0.0.1", handle.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, num_bytes: int) -> bytes:
    """Read exactly ``num_bytes`` or fail on early end of stream."""
    chunks = bytearray()
    while len(chunks) < num_bytes:
        chunk = sock.recv(num_bytes - len(chunks))
        assert chunk, f"EOF after {len(chunks)} of {num_bytes} bytes"
        chunks += chunk
    return bytes(chunks)


def _round_trip_s(sock: socket.socket, message: bytes = b"ping") -> float:
    """Seconds to send ``message`` and read its echo."""
    start = time.perf_counter()
    sock.sendall(message)
    assert _recv_exactly(sock, len(message)) == message
    return time.perf_counter() - start


def _send_then_half_close(sock: socket.socket, payload: bytes) -> threading.Thread:
    """Send ``payload`` then shut down writing, from a thread so the reader can drain."""

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _recv_to_eof(sock: socket.socket) -> bytes:
    """Read until the peer half-closes."""
    chunks = bytearray()
    while chunk := sock.recv(1 << 20):
        chunks += chunk
    return bytes(chunks)


def test_plan_delivery_queues_chunks_behind_each_other() -> None:
    """Serialization queues behind the link's backlog; arrival never precedes the last."""
    sent_at, deliver_at = plan_delivery(10.0, 0.0, 0.0, 1000, 1000.0, 0.05)
    assert (sent_at, deliver_at) == pytest.approx((11.0, 11.05))
    sent_at, deliver_at = plan_delivery(10.5, sent_at, deliver_at, 500, 1000.0, 0.0)
    assert (sent_at, deliver_at) == pytest.approx((11.5, 11.5))
    # A short delay (jitter drew low) must not overtake an earlier chunk.
    assert plan_delivery(10.0, 0.0, 12.0, 10, None, 0.01) == (10.0, 12.0)
    assert read_size(None) == 65536
    assert read_size(1000.0) == 1024


def test_config_rejects_bad_values() -> None:
    """Negative delays and non-positive caps are input errors."""
    with pytest.raises(ValueError):
        LinkConfig(rtt_ms=-1)
    with pytest.raises(ValueError):
        LinkConfig(up_bytes_per_s=0)


def test_forwards_a_large_payload_exactly_both_ways(link: LinkThread) -> None:
    """8 MiB of random bytes go up and come back down unchanged; half-close passes."""
    payload = random.Random(0).randbytes(8 * 1024 * 1024)
    with _connect(link) as sock:
        sender = _send_then_half_close(sock, payload)
        echoed = _recv_to_eof(sock)
        sender.join(timeout=5)
    assert echoed == payload
    stats = link.stats()
    assert (stats.up_bytes, stats.down_bytes) == (len(payload), len(payload))
    assert stats.num_connections == 1


def test_unshaped_link_adds_little_latency(link: LinkThread) -> None:
    """With no delay or caps, a small round trip stays well under a millisecond or so."""
    with _connect(link) as sock:
        _round_trip_s(sock)
        median_s = statistics.median(_round_trip_s(sock) for _ in range(20))
    assert median_s < 0.02


def test_rtt_is_added_and_can_change_live(link: LinkThread) -> None:
    """rtt 80 ms gives round trips of at least 80 ms; set_link to 0 removes it."""
    link.set_link(LinkConfig(rtt_ms=80))
    with _connect(link) as sock:
        round_trips_s = [_round_trip_s(sock) for _ in range(3)]
        assert min(round_trips_s) >= 0.080
        assert max(round_trips_s) < 0.080 + SLACK_S
        link.set_link(LinkConfig())
        assert _round_trip_s(sock) < 0.040


@pytest.mark.parametrize(
    "config",
    [LinkConfig(up_bytes_per_s=1_000_000), LinkConfig(down_bytes_per_s=1_000_000)],
    ids=["up", "down"],
)
def test_bandwidth_cap_paces_a_transfer(echo_port: int, config: LinkConfig) -> None:
    """400 KB over a 1 MB/s cap (one direction) takes about 0.4 s."""
    bytes_per_s = 1_000_000
    payload = random.Random(1).randbytes(400_000)
    expected_s = len(payload) / bytes_per_s
    with run_in_thread("127.0.0.1", echo_port, config) as handle, _connect(handle) as sock:
        start = time.perf_counter()
        sender = _send_then_half_close(sock, payload)
        echoed = _recv_to_eof(sock)
        elapsed_s = time.perf_counter() - start
        sender.join(timeout=5)
    assert echoed == payload
    assert 0.95 * expected_s <= elapsed_s < expected_s + SLACK_S


def test_jitter_never_reorders(echo_port: int) -> None:
    """Small writes under heavy jitter come back in order; round trips do vary."""
    config = LinkConfig(rtt_ms=10, jitter_ms=30, seed=7)
    messages = [f"{i:05d}".encode() for i in range(60)]
    with run_in_thread("127.0.0.1", echo_port, config) as handle, _connect(handle) as sock:
        for message in messages:
            sock.sendall(message)
            time.sleep(0.002)  # separate reads, so each chunk draws its own jitter
        echoed = _recv_exactly(sock, sum(len(m) for m in messages))
        round_trips_s = [_round_trip_s(sock) for _ in range(8)]
    assert echoed == b"".join(messages)
    assert min(round_trips_s) >= 0.010
    assert max(round_trips_s) - min(round_trips_s) >= 0.010  # jitter is really drawn


def test_stall_holds_traffic_then_delivers_everything(link: LinkThread) -> None:
    """During a 300 ms stall nothing arrives; afterwards every byte does."""
    payload = random.Random(2).randbytes(100_000)
    with _connect(link) as sock:
        _round_trip_s(sock)
        link.stall(300)
        start = time.perf_counter()
        sock.sendall(payload)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(5)
        echoed = _recv_exactly(sock, len(payload))
        elapsed_s = time.perf_counter() - start
    assert echoed == payload
    assert 0.29 <= elapsed_s < 0.3 + SLACK_S


def test_reset_aborts_open_connections_and_new_ones_work(link: LinkThread) -> None:
    """After reset the open client sees a reset or EOF; a fresh connection echoes."""
    with _connect(link) as sock:
        _round_trip_s(sock)
        link.reset()
        with pytest.raises(ConnectionError):
            sock.sendall(b"after reset")
            if not sock.recv(1):
                raise ConnectionResetError("EOF")
    with _connect(link) as sock:
        assert _round_trip_s(sock) < 1.0
    stats = link.stats()
    assert stats.num_connections == 2


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    """A gRPC server with the standard health service on 127.0.0.1, port 0."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def test_grpc_calls_and_streams_pass_through(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    """Unary Check and a server stream (Watch) work over a 20 ms link, and after a reset."""
    port, servicer = health_server
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    servicer.set("tandem", serving)
    request = health_pb2.HealthCheckRequest(service="tandem")
    options = [("grpc.enable_http_proxy", 0)]
    with (
        run_in_thread("127.0.0.1", port, LinkConfig(rtt_ms=20)) as handle,
        grpc.insecure_channel(handle.address, options=options) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(request, timeout=5).status == serving
        watch = stub.Watch(request, timeout=5)
        assert next(watch).status == serving
        servicer.set("tandem", not_serving)
        assert next(watch).status == not_serving
        handle.reset()
        with pytest.raises(grpc.RpcError) as error:
            next(watch)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        response = stub.Check(request, timeout=5, wait_for_ready=True)
        assert response.status == not_serving
        assert handle.stats().num_connections >= 2

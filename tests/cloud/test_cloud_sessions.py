"""Session lifetime: slots free when a session ends, idle and TTL reclaim, per-client caps."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_driver import DecodeStream, open_message

from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.server import serve_in_thread
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import DraftFrame, SessionClose, SessionDone, SessionReady, Verdict

PROMPT = (1, 45, 210, 17, 99, 300, 8, 131)
P = len(PROMPT)
TOKEN = "s3cret-token"


def _edge_sessions(address: str, fingerprint: str, num_sessions: int, wait_for_done: bool, cancel: bool) -> None:
    """The edge's own client, back to back: open, two pipelined frames, SessionClose, next.

    ``wait_for_done``: read SessionDone before opening the next (else half-close and open at
    once, as the edge's decoder does). ``cancel``: abort the call right after closing.
    """
    client = VerifierClient(ClientConfig(address=address))
    client.ensure_connected()
    try:
        for _ in range(num_sessions):
            stream = client.open_stream()
            stream.send(open_message(PROMPT, fingerprint, max_new_tokens=16))
            assert isinstance(stream.recv(), SessionReady)
            stream.send(DraftFrame(seq=0, epoch=0, position=P, draft_ids=(5, 6), expects_continuation=True))
            stream.send(DraftFrame(seq=1, epoch=0, position=P + 2, draft_ids=(7,), expects_continuation=True))
            assert isinstance(stream.recv(), Verdict)
            stream.send(SessionClose(reason="stop"))
            if wait_for_done:
                while not isinstance(stream.recv(), SessionDone):
                    pass
            stream.close(cancel=cancel)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("edges", "wait_for_done", "admission_wait_s"),
    [
        (1, True, 0.0),  # the slot is free once SessionDone is out, with no grace at all
        (2, False, 0.5),  # the edge's decoder: half-close and open the next at once
    ],
)
def test_back_to_back_sessions_never_find_the_server_full(
    llama_target_dir: Path, fingerprint: str, edges: int, wait_for_done: bool, admission_wait_s: float
) -> None:
    """``edges`` edges on ``edges`` slots, 30 sessions each back to back: never RESOURCE_EXHAUSTED."""
    config = CloudConfig(model_dir=llama_target_dir, max_sessions=edges, admission_wait_s=admission_wait_s)
    with serve_in_thread(config) as server:
        errors: list[BaseException] = []

        def edge() -> None:
            try:
                _edge_sessions(server.address, fingerprint, 30, wait_for_done, cancel=False)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=edge) for _ in range(edges)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _wait_for(lambda: server.metrics.snapshot()["sessions_active"] == 0)
        metrics = server.metrics.snapshot()
    assert not errors, errors
    assert metrics["sessions_refused"] == 0 and metrics["session_errors"] == 0
    assert metrics["sessions_total"] == 30 * edges


def test_a_cancel_after_close_is_never_an_internal_error(llama_target_dir: Path, fingerprint: str) -> None:
    """Edges that abort their calls right after SessionClose (while the verifier still writes the
    last verdict or SessionDone) are counted as their cancels, never as INTERNAL; the server serves on."""
    with serve_in_thread(CloudConfig(model_dir=llama_target_dir)) as server:
        threads = [
            threading.Thread(target=_edge_sessions, args=(server.address, fingerprint, 12, False, True))
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        _wait_for(lambda: server.metrics.snapshot()["sessions_active"] == 0)
        by_code = server.metrics.session_errors_by_code()
        assert set(by_code) <= {"CANCELLED"}, by_code
        _edge_sessions(server.address, fingerprint, 1, wait_for_done=True, cancel=False)


def test_a_silent_session_is_reclaimed_after_session_idle_s(llama_target_dir: Path, fingerprint: str) -> None:
    """Idle is per message: frames 0.1 s apart keep a session past 0.5 s; silence ends it."""

    async def run(address: str) -> tuple[grpc.StatusCode, pb.Error, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint))
            length, epoch = P, 0
            for seq in range(6):  # 0.6 s in all, never 0.3 s silent
                await asyncio.sleep(0.1)
                await stream.send(DraftFrame(seq=seq, epoch=epoch, position=length, draft_ids=(3,)))
                verdict = await stream.receive()
                assert isinstance(verdict, Verdict), verdict
                length, epoch = verdict.committed_length, verdict.epoch
            start = time.monotonic()
            error = await stream.receive()
            assert isinstance(error, pb.Error)
            return await stream.call.code(), error, time.monotonic() - start

    config = CloudConfig(model_dir=llama_target_dir, session_idle_s=0.3, session_ttl_s=60.0)
    with serve_in_thread(config) as server:
        code, error, silent_s = asyncio.run(run(server.address))
        metrics = server.metrics.snapshot()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "session_idle_s" in error.message
    assert 0.2 < silent_s < 5.0
    assert metrics["sessions_active"] == 0


def test_a_session_ends_at_its_ttl_however_busy(llama_target_dir: Path, fingerprint: str) -> None:
    """session_ttl_s bounds a whole session: frames every 0.1 s do not keep it past 0.6 s."""

    async def run(address: str) -> tuple[grpc.StatusCode, pb.Error, int]:
        async with grpc.aio.insecure_channel(address) as channel:
            stream = DecodeStream(channel)
            await stream.open(open_message(PROMPT, fingerprint, max_new_tokens=512))
            length, epoch = P, 0
            for seq in range(100):
                # A read stays pending while the edge waits, so the Error frame that ends the
                # session reaches it even if a write would race the call's end (grpc/grpc#36066).
                reply_task = asyncio.create_task(stream.receive())
                done, _ = await asyncio.wait({reply_task}, timeout=0.1)
                if not done:
                    await stream.send(DraftFrame(seq=seq, epoch=epoch, position=length, draft_ids=(3,)))
                reply = await reply_task
                if isinstance(reply, pb.Error):
                    return await stream.call.code(), reply, seq
                assert isinstance(reply, Verdict), reply
                length, epoch = reply.committed_length, reply.epoch
            raise AssertionError("the session outlived its TTL")

    config = CloudConfig(model_dir=llama_target_dir, session_idle_s=30.0, session_ttl_s=0.6)
    with serve_in_thread(config) as server:
        code, error, frames = asyncio.run(run(server.address))
        assert server.metrics.snapshot()["sessions_active"] == 0
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "session_ttl_s" in error.message
    assert 3 <= frames <= 7


def _non_loopback_address() -> str | None:
    """This machine's address on a non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # TEST-NET: nothing is sent for UDP connect
        except OSError:
            return None
        host = probe.getsockname()[0]
    return None if host.startswith("127.") else str(host)


async def _hold_sessions(
    address: str, fingerprint: str, client_id: str, count: int, metadata: Any
) -> tuple[list[DecodeStream], list[tuple[grpc.StatusCode, str]]]:
    """Open ``count`` handshakes that never send a frame; the open ones and the refusals."""
    held, refused = [], []
    for _ in range(count):
        stream = DecodeStream(grpc.aio.insecure_channel(address), metadata)  # closed with the loop
        await stream.send(open_message(PROMPT, fingerprint, client_id=client_id))
        reply = await stream.receive()
        if isinstance(reply, SessionReady):
            held.append(stream)
        else:
            assert isinstance(reply, pb.Error), reply
            refused.append((await stream.call.code(), reply.message))
    return held, refused


@pytest.mark.parametrize("auth", [True, False])
def test_one_client_cannot_hold_every_slot(llama_target_dir: Path, fingerprint: str, auth: bool) -> None:
    """max_sessions 8, default cap (a quarter): one client's 8 silent handshakes get 2 slots,
    the rest RESOURCE_EXHAUSTED naming the cap; another client still gets in.

    Clients are the handshake's client_id with auth on, else the peer's host (so without auth
    the test connects over a non-loopback address, since loopback peers are not capped)."""
    host = "127.0.0.1" if auth else _non_loopback_address()
    if host is None:
        pytest.skip("no non-loopback interface to connect from")
    config = CloudConfig(
        model_dir=llama_target_dir,
        host="0.0.0.0" if not auth else "127.0.0.1",
        max_sessions=8,
        admission_wait_s=0.0,
        auth_token=TOKEN if auth else None,
    )
    metadata = (("authorization", f"Bearer {TOKEN}"),) if auth else None

    async def run(address: str) -> None:
        held, refused = await _hold_sessions(address, fingerprint, "greedy", 8, metadata)
        assert len(held) == 2 and len(refused) == 6
        for code, message in refused:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions_per_client 2" in message
        # Another client: another client_id, or (no auth) this machine itself over loopback.
        other = address if auth else f"127.0.0.1:{address.rsplit(':', 1)[1]}"
        others, none = await _hold_sessions(other, fingerprint, "polite", 2, metadata)
        assert len(others) == 2 and not none
        held += others
        for stream in held:
            assert await stream.finish() == grpc.StatusCode.OK

    with serve_in_thread(config) as server:
        asyncio.run(run(f"{host}:{server.port}"))
        metrics = server.metrics.snapshot()
    assert metrics["sessions_refused"] == 6 and metrics["sessions_active"] == 0


def _wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    """Poll ``condition`` (a session's last bookkeeping can trail the client's view by a moment)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)

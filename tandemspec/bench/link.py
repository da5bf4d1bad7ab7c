"""A user-space network link between edge and cloud: delay, jitter, bandwidth, faults.

No kernel traffic shaping (netem) is available on the bench machines, so the link is a
loopback TCP proxy. It forwards bytes both ways, unchanged, to an upstream host and
port, and shapes each direction ("up" = client to upstream, "down" = back):

- *delay*: every chunk arrives ``rtt_ms / 2`` after it leaves, plus *jitter*, a seeded
  uniform extra delay in ``[0, jitter_ms]``. A chunk never arrives before the one read
  before it on the same connection, so bytes are never reordered.
- *bandwidth*: a chunk of ``n`` bytes occupies its direction of the link for
  ``n / bytes_per_s`` seconds, queued behind earlier chunks of every connection. While
  the link is busy the proxy stops reading, so the sender feels TCP back-pressure.
- *faults*: :meth:`LinkEmulator.stall` holds all traffic for a while and then delivers
  it without loss; :meth:`LinkEmulator.reset` aborts every open connection with a TCP
  reset, while new connections still work.

It is pure byte forwarding with half-close passed through, so long-lived gRPC HTTP/2
streams work. :func:`run_in_thread` runs it on its own event loop for synchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeoutError
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

Direction = Literal["up", "down"]
T = TypeVar("T")

MAX_READ_BYTES = 64 * 1024
MIN_READ_BYTES = 1024
# Under a bandwidth cap one read carries at most this much link time, so the cap is
# applied smoothly rather than in large bursts.
MAX_READ_LINK_S = 0.01
# Bytes one direction of one connection may hold waiting for their delivery time before
# the proxy stops reading from the sender.
MAX_QUEUED_BYTES = 16 * 1024 * 1024
CALL_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class LinkConfig:
    """Link shape: round-trip delay, jitter and per-direction bandwidth caps."""

    rtt_ms: float = 0
    jitter_ms: float = 0
    up_bytes_per_s: float | None = None
    down_bytes_per_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject negative delays and non-positive bandwidth caps."""
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"rtt_ms and jitter_ms must be >= 0, got {self}")
        for rate in (self.up_bytes_per_s, self.down_bytes_per_s):
            if rate is not None and rate <= 0:
                raise ValueError(f"bandwidth caps must be > 0 bytes/s, got {self}")


@dataclasses.dataclass(frozen=True)
class LinkStats:
    """Bytes delivered per direction and connections accepted so far."""

    up_bytes: int
    down_bytes: int
    num_connections: int
    num_open_connections: int


def plan_delivery(
    now: float,
    link_free_at: float,
    previous_at: float,
    num_bytes: int,
    bytes_per_s: float | None,
    delay_s: float,
) -> tuple[float, float]:
    """(when the chunk has left the link, when it arrives) for a chunk read at ``now``."""
    sent_at = now
    if bytes_per_s is not None:
        sent_at = max(now, link_free_at) + num_bytes / bytes_per_s
    return sent_at, max(sent_at + delay_s, previous_at)


def read_size(bytes_per_s: float | None) -> int:
    """How many bytes to read at once: a whole buffer, or ~10 ms of a capped link."""
    if bytes_per_s is None:
        return MAX_READ_BYTES
    return int(min(MAX_READ_BYTES, max(MIN_READ_BYTES, bytes_per_s * MAX_READ_LINK_S)))


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Turn off Nagle so small frames (HTTP/2 pings, acks) are not held back."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger 0), as a dropped link looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pipe:
    """One direction of one connection: chunks waiting, in order, for delivery."""

    def __init__(self, direction: Direction) -> None:
        """An empty pipe for ``direction``."""
        self.direction: Direction = direction
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.queued_bytes = 0
        self.last_deliver_at = 0.0
        self.has_room = asyncio.Event()
        self.has_room.set()

    def put(self, deliver_at: float, data: bytes) -> None:
        """Queue ``data`` (``b""`` means end of stream) for delivery at ``deliver_at``."""
        self.last_deliver_at = deliver_at
        self.queued_bytes += len(data)
        if self.queued_bytes >= MAX_QUEUED_BYTES:
            self.has_room.clear()
        self.queue.put_nowait((deliver_at, data))

    def release(self, num_bytes: int) -> None:
        """Forget ``num_bytes`` that left the queue."""
        self.queued_bytes -= num_bytes
        if self.queued_bytes < MAX_QUEUED_BYTES:
            self.has_room.set()


@dataclasses.dataclass(eq=False)  # hashed by identity, kept in a set
class _Connection:
    """An open client connection, its upstream connection and the four tasks pumping them."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]]

    def abort(self) -> None:
        """Reset both sockets and stop pumping."""
        _abort(self.client)
        _abort(self.upstream)
        for task in self.tasks:
            task.cancel()


class LinkEmulator:
    """A TCP proxy to ``upstream_host:upstream_port`` that shapes traffic like a network link."""

    def __init__(self, upstream_host: str, upstream_port: int, config: LinkConfig) -> None:
        """A stopped emulator; :meth:`start` opens the listening socket."""
        self._upstream_host = upstream_host
        self._upstream_port = upstream_port
        self._config = config
        self._rng = random.Random(config.seed)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._link_free_at: dict[Direction, float] = {"up": 0.0, "down": 0.0}
        self._delivered_bytes: dict[Direction, int] = {"up": 0, "down": 0}
        self._num_connections = 0
        self._stalled_until = 0.0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 picks a free port) and return the port."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound_port: int = self._server.sockets[0].getsockname()[1]
        logger.info(
            "link %s:%d -> %s:%d %s",
            host,
            bound_port,
            self._upstream_host,
            self._upstream_port,
            self._config,
        )
        return bound_port

    async def stop(self) -> None:
        """Stop listening and reset every open connection."""
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def stall(self, duration_ms: float) -> None:
        """Hold all traffic, both ways, for ``duration_ms``; then deliver it without loss."""
        until = asyncio.get_running_loop().time() + duration_ms / 1000
        self._stalled_until = max(self._stalled_until, until)
        logger.info("link stalled for %.0f ms", duration_ms)

    def reset(self) -> None:
        """Abort every open connection with a TCP reset; new connections still work."""
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        logger.info("link reset %d connection(s)", len(connections))

    def set_link(self, config: LinkConfig) -> None:
        """Change the link shape; chunks already in flight keep their delivery times."""
        self._config = config
        self._rng = random.Random(config.seed)
        logger.info("link set to %s", config)

    def stats(self) -> LinkStats:
        """Bytes delivered each way and connections accepted so far."""
        return LinkStats(
            up_bytes=self._delivered_bytes["up"],
            down_bytes=self._delivered_bytes["down"],
            num_connections=self._num_connections,
            num_open_connections=len(self._connections),
        )

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Handle one client connection; :meth:`stop` cancels this to end it."""
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._num_connections += 1
        try:
            await self._forward(client_reader, client_writer)
        except asyncio.CancelledError:
            # Only stop() cancels a handler, and the connection is already reset by
            # then; ending normally keeps asyncio from logging the cancellation.
            logger.debug("link connection closed by stop")
        finally:
            self._handlers.discard(handler)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Connect upstream and pump both directions until both ends close or one fails."""
        _set_nodelay(client_writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(self._upstream_host, self._upstream_port)
        except OSError as error:
            logger.warning("link cannot reach upstream: %s", error)
            _abort(client_writer)
            return
        except asyncio.CancelledError:
            _abort(client_writer)
            raise
        _set_nodelay(upstream_writer)
        up, down = _Pipe("up"), _Pipe("down")
        tasks = [
            asyncio.create_task(self._pump_in(client_reader, up)),
            asyncio.create_task(self._pump_out(up, upstream_writer)),
            asyncio.create_task(self._pump_in(upstream_reader, down)),
            asyncio.create_task(self._pump_out(down, client_writer)),
        ]
        connection = _Connection(client_writer, upstream_writer, tasks)
        self._connections.add(connection)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self._connections.discard(connection)
            await self._finish(connection)

    async def _finish(self, connection: _Connection) -> None:
        """Close a connection whose pumps all ended cleanly; reset it otherwise."""
        clean = all(task.done() and not task.cancelled() and task.exception() is None for task in connection.tasks)
        if not clean:
            connection.abort()
        results = await asyncio.gather(*connection.tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            logger.debug("link connection ended: %r", errors[0])
        if clean:
            for writer in (connection.client, connection.upstream):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def _pump_in(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        """Read chunks from the sender and give each its delivery time, until end of stream."""
        loop = asyncio.get_running_loop()
        while True:
            bytes_per_s = self._bytes_per_s(pipe.direction)
            data = await reader.read(read_size(bytes_per_s))
            now = loop.time()
            sent_at, deliver_at = plan_delivery(
                now,
                self._link_free_at[pipe.direction],
                pipe.last_deliver_at,
                len(data),
                bytes_per_s,
                self._delay_s(),
            )
            self._link_free_at[pipe.direction] = sent_at
            pipe.put(deliver_at, data)
            if not data:
                return
            await pipe.has_room.wait()
            # The link is busy sending this chunk: stop reading so the sender backs off.
            if sent_at > loop.time():
                await asyncio.sleep(sent_at - loop.time())

    async def _pump_out(self, pipe: _Pipe, writer: asyncio.StreamWriter) -> None:
        """Write each chunk to the receiver at its delivery time; pass end of stream on."""
        while True:
            deliver_at, data = await pipe.queue.get()
            await self._hold_until(deliver_at)
            pipe.release(len(data))
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            self._delivered_bytes[pipe.direction] += len(data)
            await writer.drain()

    async def _hold_until(self, deliver_at: float) -> None:
        """Sleep until ``deliver_at`` and past any stall, even one begun while sleeping."""
        loop = asyncio.get_running_loop()
        while True:
            wait_s = max(deliver_at, self._stalled_until) - loop.time()
            if wait_s <= 0:
                return
            await asyncio.sleep(wait_s)

    def _bytes_per_s(self, direction: Direction) -> float | None:
        """The bandwidth cap of ``direction`` (None: uncapped)."""
        if direction == "up":
            return self._config.up_bytes_per_s
        return self._config.down_bytes_per_s

    def _delay_s(self) -> float:
        """One-way delay for the next chunk: half the RTT plus seeded uniform jitter."""
        delay_s = self._config.rtt_ms / 2000
        if self._config.jitter_ms > 0:
            delay_s += self._rng.uniform(0, self._config.jitter_ms) / 1000
        return delay_s


class LinkThread:
    """A :class:`LinkEmulator` running on its own event loop in a daemon thread."""

    def __init__(
        self,
        emulator: LinkEmulator,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        host: str,
        port: int,
    ) -> None:
        """Wrap a started emulator; use :func:`run_in_thread` to build one."""
        self._emulator = emulator
        self._loop = loop
        self._thread = thread
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        """``host:port`` to dial instead of the upstream."""
        return f"{self.host}:{self.port}"

    def stall(self, duration_ms: float) -> None:
        """Hold all traffic for ``duration_ms``; returns at once."""
        self._call(lambda: self._emulator.stall(duration_ms))

    def reset(self) -> None:
        """Abort every open connection with a TCP reset."""
        self._call(self._emulator.reset)

    def set_link(self, config: LinkConfig) -> None:
        """Change the link shape live."""
        self._call(lambda: self._emulator.set_link(config))

    def stats(self) -> LinkStats:
        """Bytes delivered each way and connections accepted so far."""
        return self._call(self._emulator.stats)

    def stop(self) -> None:
        """Stop the emulator, then its event loop and thread; safe to call twice."""
        if self._loop.is_closed():
            return
        future = asyncio.run_coroutine_threadsafe(self._emulator.stop(), self._loop)
        try:
            future.result(timeout=CALL_TIMEOUT_S)
        except FutureTimeoutError:
            logger.warning("link emulator did not stop within %.0f s", CALL_TIMEOUT_S)
        finally:
            _stop_loop(self._loop, self._thread)

    def __enter__(self) -> Self:
        """Return the running link."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the link."""
        self.stop()

    def _call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the emulator's loop and return its result."""

        async def call() -> T:
            return function()

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        return future.result(timeout=CALL_TIMEOUT_S)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop ``loop`` running forever in ``thread``, join the thread and close the loop."""
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=CALL_TIMEOUT_S)
    if not thread.is_alive():
        loop.close()


def run_in_thread(
    upstream_host: str,
    upstream_port: int,
    config: LinkConfig | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> LinkThread:
    """Start a :class:`LinkEmulator` on ``host:port`` in a daemon thread with its own loop."""
    emulator = LinkEmulator(upstream_host, upstream_port, config or LinkConfig())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="link-emulator", daemon=True)
    thread.start()
    future = asyncio.run_coroutine_threadsafe(emulator.start(host, port), loop)
    try:
        bound_port = future.result(timeout=CALL_TIMEOUT_S)
    except BaseException:
        _stop_loop(loop, thread)
        raise
    return LinkThread(emulator, loop, thread, host, bound_port)

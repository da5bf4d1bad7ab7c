"""The edge's gRPC client: ``Info`` and one ``Decode`` stream per generation.

Losing the cloud is a state, not a crash: every call has a deadline, a broken stream or
an unreachable verifier surfaces as :class:`CloudUnavailable`, which the decoder turns
into a switch to local decoding. After a failure, :class:`Backoff` (exponential, capped,
with full jitter) keeps later generations from hammering a dead verifier: until the wait
has passed they go local at once, then the next one tries to reconnect.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from tandemspec.edge.pool import channel_options, channel_target
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.protos import tandem_pb2_grpc as pb_grpc
from tandemspec.protos.codec import (
    CloudMessage,
    CodecError,
    EdgeMessage,
    decode_cloud_frame,
    decode_info,
    encode_edge_frame,
)
from tandemspec.types import ServerInfo

logger = logging.getLogger(__name__)

CLOSE_GRACE_S = 1.0  # how long closing waits for a stream the edge ended to be ended by the verifier
_END = object()  # marks the end of the request or response stream in the queues
# Keepalive pings after 3 s without incoming bytes, even on an idle channel; no ack within
# 2 s closes the connection. A dead link (a stall, a vanished replica) is so detected in
# 5-8 s, well before recv_timeout_s, and a slow but alive verifier is not mistaken for one
# (its transport acks pings while the target computes). 3 s is twice the verifier's minimum
# ping interval (cloud/config.py min_ping_interval_s): no GOAWAY too_many_pings, and an idle
# daemon's next request finds its connection. Both are ClientConfig fields (edge config
# ``keepalive_time_s`` / ``keepalive_timeout_s``); these are the defaults.
KEEPALIVE_TIME_MS = 3_000
KEEPALIVE_TIMEOUT_MS = 2_000


def keepalive_options(time_ms: int, timeout_ms: int) -> list[tuple[str, int]]:
    """The channel options that find a dead link: a ping after ``time_ms`` of silence, ``timeout_ms`` for its ack."""
    return [
        ("grpc.keepalive_time_ms", time_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # A keepalive waits on a ping already in flight (gRPC's flow-control probe) with that
        # ping's timeout, 60 s by default: give every ping the keepalive's timeout.
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection (the verifier allows it)
        ("grpc.enable_retries", 0),
    ]


class CloudUnavailable(Exception):
    """Transport loss: the verifier cannot be reached, did not answer in time, or the stream broke.

    The generation continues locally and the client backs off before the next attempt.
    """


class CloudBusy(CloudUnavailable):
    """The verifier is full (``RESOURCE_EXHAUSTED`` at admission): this generation continues
    locally, reported as such, but the verifier is healthy, so no backoff follows."""


class CloudRefused(Exception):
    """The verifier refused *this request* (its parameters, its tokenizer, a protocol error).

    Not an outage: no fallback and no backoff. :meth:`HybridDecoder.generate` raises it, the
    CLI exits non-zero, the local API answers with an HTTP error (400 for the request's own
    invalid parameters).
    """

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        super().__init__(f"{code.name if code else 'ERROR'}: {message}")
        self.code = code
        self.message = message

    @property
    def is_invalid_request(self) -> bool:
        """The request's own parameters were refused (an HTTP 400 at the local API)."""
        return self.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)


class TokenizerMismatch(CloudRefused):
    """The edge bundle's tokenizer is not the verifier's (``FAILED_PRECONDITION``): a deployment error."""

    def __init__(self, edge_fingerprint: str, cloud_fingerprint: str) -> None:
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the edge bundle's tokenizer (fingerprint {edge_fingerprint}) is not the verifier's "
            f"(fingerprint {cloud_fingerprint}): edge and cloud must share one tokenizer",
        )
        self.edge_fingerprint = edge_fingerprint
        self.cloud_fingerprint = cloud_fingerprint


@dataclass(frozen=True)
class ClientConfig:
    """Where the verifier is and how long to wait for it."""

    address: str  # HOST:PORT, a gRPC target, or a pool of replicas IP:PORT,IP:PORT (edge/pool.py)
    auth_token: str | None = None
    tls_ca: Path | None = None
    connect_timeout_s: float = 3.0
    info_timeout_s: float = 5.0
    session_deadline_s: float = 600.0  # deadline of a whole Decode stream
    recv_timeout_s: float = 20.0  # longest wait for one cloud frame before giving up
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Dead-link detection (see KEEPALIVE_TIME_MS): keep keepalive_time_s at or above the
    # verifier's min_ping_interval_s, or it answers the pings with GOAWAY too_many_pings.
    keepalive_time_s: float = KEEPALIVE_TIME_MS / 1000
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_MS / 1000

    def __post_init__(self) -> None:
        if not (self.keepalive_time_s > 0 and self.keepalive_timeout_s > 0):
            raise ValueError(
                f"keepalive_time_s and keepalive_timeout_s must be > 0, got "
                f"{self.keepalive_time_s} and {self.keepalive_timeout_s}"
            )
        channel_target(self.address)  # a malformed pool is a configuration error, raised here

    def keepalive_channel_options(self) -> list[tuple[str, int]]:
        """The channel's keepalive options from this config's two settings (:func:`keepalive_options`)."""
        return keepalive_options(round(self.keepalive_time_s * 1000), round(self.keepalive_timeout_s * 1000))


class Backoff:
    """Capped exponential backoff with full jitter; the clock and randomness are injectable."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._clock = clock
        self._rng = rng or random.Random()
        self.failures = 0
        self._retry_at = 0.0

    def ready(self) -> bool:
        """True when a new attempt is allowed now."""
        return self._clock() >= self._retry_at

    def remaining_s(self) -> float:
        return max(0.0, self._retry_at - self._clock())

    def record_failure(self) -> float:
        """Schedule the next attempt; returns the wait in seconds."""
        ceiling = min(self.max_s, self.initial_s * 2.0**self.failures)
        self.failures += 1
        delay = self._rng.uniform(ceiling / 2, ceiling)  # "equal jitter": never zero, never above the cap
        self._retry_at = self._clock() + delay
        return delay

    def record_success(self) -> None:
        self.failures = 0
        self._retry_at = 0.0


class DecodeStream:
    """One ``Decode`` call: send edge messages, receive cloud messages, count frame bytes."""

    def __init__(self, stub: pb_grpc.VerifierStub, metadata: list[tuple[str, str]], config: ClientConfig) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self._responses: queue.Queue[object] = queue.Queue()
        self._recv_timeout_s = config.recv_timeout_s
        self.bytes_up = 0
        self.bytes_down = 0
        self.frames_up = 0
        self.frames_down = 0
        self.wait_s = 0.0  # time spent blocked in recv
        self._call = stub.Decode(self._request_iterator(), timeout=config.session_deadline_s, metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="tandem-decode-reader", daemon=True)
        self._reader.start()

    def _request_iterator(self) -> Iterator[pb.EdgeFrame]:
        while (item := self._requests.get()) is not _END:
            assert isinstance(item, pb.EdgeFrame)
            yield item

    def _read(self) -> None:
        try:
            for frame in self._call:
                self._responses.put(frame)
        except grpc.RpcError as error:
            self._responses.put(error)
        self._responses.put(_END)

    def send(self, message: EdgeMessage) -> int:
        """Queue one message; returns its serialized size in bytes."""
        frame = encode_edge_frame(message)
        size = len(frame.SerializeToString())
        self.bytes_up += size
        self.frames_up += 1
        self._requests.put(frame)
        return size

    def num_pending(self) -> int:
        """Cloud messages that have arrived and :meth:`recv` has not returned yet."""
        return self._responses.qsize()

    def recv(self, timeout_s: float | None = None) -> CloudMessage:
        """The next cloud message; raises :class:`CloudUnavailable` / :class:`CloudRefused`."""
        start = time.perf_counter()
        try:
            item = self._responses.get(timeout=timeout_s or self._recv_timeout_s)
        except queue.Empty as error:
            raise CloudUnavailable(
                f"no answer from the verifier within {timeout_s or self._recv_timeout_s:.1f} s"
            ) from error
        finally:
            self.wait_s += time.perf_counter() - start
        if item is _END:
            self._responses.put(_END)
            raise CloudUnavailable("the verifier ended the stream")
        if isinstance(item, grpc.RpcError):
            self._responses.put(_END)
            code = item.code() if isinstance(item, grpc.Call) else None
            details = item.details() if isinstance(item, grpc.Call) else str(item)
            raise _status_error(code, details or "")
        assert isinstance(item, pb.CloudFrame)
        self.bytes_down += len(item.SerializeToString())
        self.frames_down += 1
        try:
            message = decode_cloud_frame(item)
        except CodecError as error:
            raise CloudRefused(None, f"malformed cloud frame: {error}") from error
        if isinstance(message, pb.Error):
            raise _status_error(_status_code(message.status_code), f"{message.message} (frame {message.seq})")
        return message

    def close(self, cancel: bool = False) -> None:
        """End the call: half-close the requests (the verifier then ends the stream), or abort it at once."""
        self._requests.put(_END)
        if cancel:
            self._call.cancel()

    def wait_closed(self, timeout_s: float) -> bool:
        """Wait until the verifier has ended the stream; True when it has."""
        self._reader.join(timeout_s)
        return not self._reader.is_alive()


_TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _status_error(code: grpc.StatusCode | None, details: str) -> Exception:
    """The exception a status from the verifier stands for: outage, full, or a refusal of this request."""
    if code in _TRANSPORT_CODES:
        return CloudUnavailable(f"stream broke: {code.name if code else ''} {details}")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CloudBusy(f"verifier busy: {details}")
    return CloudRefused(code, details)


def _status_code(value: int) -> grpc.StatusCode | None:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return None


class VerifierClient:
    """A channel to one verifier with reconnect backoff; thread-safe for sequential generations."""

    def __init__(self, config: ClientConfig, backoff: Backoff | None = None) -> None:
        self.config = config
        self.backoff = backoff or Backoff(config.backoff_initial_s, config.backoff_max_s)
        self._metadata = [("authorization", f"Bearer {config.auth_token}")] if config.auth_token else []
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._info: ServerInfo | None = None
        self._last_stream: DecodeStream | None = None

    def _connect(self) -> grpc.Channel:
        if self._channel is None:
            keepalive = self.config.keepalive_channel_options()
            target, options = channel_target(self.config.address), [*keepalive, *channel_options()]
            if self.config.tls_ca is not None:
                credentials = grpc.ssl_channel_credentials(root_certificates=self.config.tls_ca.read_bytes())
                self._channel = grpc.secure_channel(target, credentials, options=options)
            else:
                self._channel = grpc.insecure_channel(target, options=options)
        return self._channel

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._info = None

    def ensure_connected(self) -> ServerInfo:
        """Connect (unless backing off) and return the verifier's ``Info``; raises :class:`CloudUnavailable`."""
        with self._lock:
            if not self.backoff.ready():
                raise CloudUnavailable(f"verifier down; next attempt in {self.backoff.remaining_s():.1f} s")
            if self._info is not None:
                return self._info
            channel = self._connect()
            try:
                grpc.channel_ready_future(channel).result(timeout=self.config.connect_timeout_s)
                stub = pb_grpc.VerifierStub(channel)
                response = stub.Info(pb.InfoRequest(), timeout=self.config.info_timeout_s, metadata=self._metadata)
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else None
                if code is not None and code not in _TRANSPORT_CODES:  # it answered: a refusal, not an outage
                    raise CloudRefused(
                        code, f"the verifier at {self.config.address} refused Info: {_describe(error)}"
                    ) from error
                self._fail_locked()
                raise CloudUnavailable(
                    f"cannot reach the verifier at {self.config.address}: {_describe(error)}"
                ) from error
            except grpc.FutureTimeoutError as error:
                self._fail_locked()
                raise CloudUnavailable(
                    f"cannot reach the verifier at {self.config.address}: {_describe(error)}"
                ) from error
            self._info = decode_info(response)
            self.backoff.record_success()
            return self._info

    def open_stream(self) -> DecodeStream:
        """A new ``Decode`` stream (call :meth:`ensure_connected` first)."""
        with self._lock:
            stream = DecodeStream(pb_grpc.VerifierStub(self._connect()), self._metadata, self.config)
            self._last_stream = stream
            return stream

    def record_failure(self) -> None:
        """The cloud failed mid-generation: drop the channel and back off."""
        with self._lock:
            self._fail_locked()

    def _fail_locked(self) -> None:
        delay = self.backoff.record_failure()
        logger.warning("verifier %s unavailable; retrying in %.1f s", self.config.address, delay)
        self._drop_channel()

    def close(self) -> None:
        """Close the channel, after giving the last stream a moment to end cleanly."""
        with self._lock:
            if self._last_stream is not None and not self._last_stream.wait_closed(CLOSE_GRACE_S):
                logger.debug("closing the channel with a stream still open")
            self._last_stream = None
            self._drop_channel()


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.Call):
        return f"{error.code().name} {error.details()}"
    if isinstance(error, grpc.FutureTimeoutError):
        return "connection timed out"
    return str(error)

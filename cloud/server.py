"""The gRPC server: Verifier + health + reflection on one grpc.aio server.

Two entry points share :func:`start_server`:

* ``tandem cloud serve`` (``tandemspec.cloud.commands``) runs it on the main event loop and
  drains on SIGTERM;
* :func:`serve_in_thread` runs it on a background thread with its own event loop, for
  tests, benchmarks and the demo::

      with serve_in_thread(CloudConfig(model_dir=path)) as handle:
          channel = grpc.insecure_channel(handle.address)
          ...
          handle.metrics.snapshot()["step_passes"]
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import tandemspec
from tandemspec.cloud.config import CloudConfig
from tandemspec.cloud.metrics import VerifierMetrics
from tandemspec.cloud.scheduler import BatchPolicy, BatchScheduler
from tandemspec.cloud.security import BearerTokenInterceptor, server_credentials
from tandemspec.cloud.service import SERVICE_NAME, VerifierService
from tandemspec.cloud.session import AdmissionBook, SessionRules
from tandemspec.cloud.target import TargetModel
from tandemspec.fingerprint import tokenizer_fingerprint
from tandemspec.protos import tandem_pb2 as pb
from tandemspec.types import ServerInfo

logger = logging.getLogger(__name__)

CAPABILITIES = ("verify", "generate", "sampling", "committed", "pipelining", "target_top_k", "trees", "branches")


class StartedServer(NamedTuple):
    """A listening server and what belongs to it; unpacks as ``(server, port, ...)``."""

    server: grpc.aio.Server
    port: int
    metrics: VerifierMetrics
    scheduler: BatchScheduler
    health: health.aio.HealthServicer
    metrics_port: int | None

    async def shutdown(self, grace_s: float) -> None:
        """Graceful stop: report NOT_SERVING, let sessions finish for ``grace_s``, then release."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.scheduler.close()
        self.metrics.stop_http()


def server_info(config: CloudConfig, target: TargetModel, fingerprint: str) -> ServerInfo:
    """What ``Info`` answers."""
    capabilities = CAPABILITIES + (("batching",) if config.batching else ())
    return ServerInfo(
        model_name=target.name,
        tokenizer_fingerprint=fingerprint,
        vocab_size=target.vocab_size,
        limits=config.limits(target.max_positions),
        capabilities=capabilities,
        server_version=tandemspec.__version__,
        device=str(target.device),
        dtype=target.dtype_name,
    )


def load_fingerprint(config: CloudConfig) -> str:
    """The fingerprint of the target's ``tokenizer.json`` (edges must present the same)."""
    path = config.model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the verifier needs the target's tokenizer to check edges")
    return tokenizer_fingerprint(path)


async def start_server(config: CloudConfig, target: TargetModel | None = None) -> StartedServer:
    """Load the target (unless given), build the services, and start listening."""
    fingerprint = load_fingerprint(config)
    if target is None:
        target = await asyncio.to_thread(
            TargetModel.load, config.model_dir, config.device, config.dtype, threads=config.torch_threads
        )
    assert target is not None
    metrics = VerifierMetrics()
    policy = BatchPolicy(
        config.batching, config.batch_window_ms / 1e3, config.max_batch_size, config.prefill_chunk_tokens
    )
    scheduler = BatchScheduler(target, policy, metrics)
    info = server_info(config, target, fingerprint)
    service = VerifierService(
        info=info,
        rules=SessionRules(limits=info.limits, vocab_size=target.vocab_size, tokenizer_fingerprint=fingerprint),
        scheduler=scheduler,
        admission=AdmissionBook(
            config.max_sessions, config.memory_budget_bytes, config.client_session_cap, config.admission_wait_s
        ),
        metrics=metrics,
        kv_bytes_per_token=target.kv_bytes_per_token,
        session_idle_s=config.session_idle_s,
        session_ttl_s=config.session_ttl_s,
        authenticated=config.auth_token is not None,
    )
    interceptors = [BearerTokenInterceptor(config.auth_token)] if config.auth_token else []
    server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
    server.add_generic_rpc_handlers((_verifier_handlers(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert is not None and config.tls_key is not None:
        port = server.add_secure_port(address, server_credentials(config.tls_cert, config.tls_key))
    else:
        port = server.add_insecure_port(address)
    scheduler.start()
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = metrics.serve_http(config.host, config.metrics_port) if config.metrics_port is not None else None
    logger.info("verifier listening on %s:%d (%s, %s)", config.host, port, info.device, info.dtype)
    return StartedServer(server, port, metrics, scheduler, health_servicer, metrics_port)


def server_options(config: CloudConfig) -> list[tuple[str, int]]:
    """gRPC server options: message sizes and the HTTP/2 ping policy edges' keepalive must fit."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Idle edges ping to keep their connection (edge/client.py _CHANNEL_OPTIONS): accept
        # pings without calls, at most one per min_ping_interval_s; faster ones are strikes.
        ("grpc.keepalive_permit_without_calls", int(config.permit_pings_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(config.min_ping_interval_s * 1e3)),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
    ]


def _verifier_handlers(service: VerifierService) -> grpc.GenericRpcHandler:
    # Decode has no request deserializer: the service parses bytes itself, so malformed
    # frames end with INVALID_ARGUMENT and an Error frame instead of INTERNAL.
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Info": grpc.unary_unary_rpc_method_handler(
                service.info,
                request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.InfoResponse.SerializeToString,
            ),
            "Decode": grpc.stream_stream_rpc_method_handler(
                service.decode, request_deserializer=None, response_serializer=pb.CloudFrame.SerializeToString
            ),
        },
    )


class ServerHandle:
    """A verifier running on a background thread; a context manager that stops it on exit."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        started: StartedServer,
        host: str,
        grace_s: float,
    ) -> None:
        self._loop = loop
        self._thread = thread
        self._started = started
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._stopped = False
        self.host = host
        self.port: int = started.port
        self.address = f"{host}:{started.port}"
        self.metrics: VerifierMetrics = started.metrics
        self.metrics_port: int | None = started.metrics_port

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful, idempotent stop: in-flight sessions get ``grace_s`` to finish."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self._grace_s if grace_s is None else grace_s
        future = asyncio.run_coroutine_threadsafe(self._started.shutdown(grace), self._loop)
        try:
            future.result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve_in_thread(config: CloudConfig, target: TargetModel | None = None) -> ServerHandle:
    """Start a verifier on a background thread; returns once it is listening."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    outcome: dict[str, StartedServer | BaseException] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started = loop.run_until_complete(start_server(config, target))
        except BaseException as error:  # reported to the caller's thread below
            outcome["error"] = error
            ready.set()
            loop.close()
            return
        outcome["started"] = started
        ready.set()
        try:
            loop.run_forever()  # until ServerHandle.stop has shut the server down
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="tandem-cloud-server", daemon=True)
    thread.start()
    ready.wait()
    error = outcome.get("error")
    if isinstance(error, BaseException):
        thread.join()
        raise error
    started = outcome["started"]
    assert isinstance(started, StartedServer)
    return ServerHandle(loop, thread, started, config.host, config.drain_grace_s)

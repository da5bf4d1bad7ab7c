"""Configuration of the cloud verifier: one frozen dataclass, built once in ``serve_main``.

Built with :func:`tandemspec.config.load_config` from defaults < ``[cloud]`` in a TOML
file < ``TANDEM_CLOUD_*`` environment variables < explicit flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tandemspec.models import reference_dir
from tandemspec.types import Limits

DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]

_GIB = 1024**3


def default_model_dir() -> Path:
    """The bundled reference target (``models/reference/target``, installed as ``tandemspec.models``)."""
    return reference_dir() / "target"


@dataclass(frozen=True)
class CloudConfig:
    """Everything the verifier needs to serve; see ``tandem cloud serve --help``."""

    model_dir: Path = field(default_factory=default_model_dir)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = "auto"
    # torch intra-op CPU threads of the target's forward (0: torch's own, one per core). With few
    # cores, leaving one to the server's gRPC and event loop can be faster (docs/benchmark.md).
    torch_threads: int = 0
    auth_token: str | None = None  # require ``authorization: Bearer <token>`` when set
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_sessions: int = 64
    # Most sessions one client may hold at once (None: a quarter of max_sessions, at least 1).
    # A client is its handshake client_id when auth is on, else the peer's host; loopback
    # peers are not capped (see cloud/session.py client_key).
    max_sessions_per_client: int | None = None
    admission_wait_s: float = 0.5  # how long a handshake waits for a slot to free before RESOURCE_EXHAUSTED
    batching: bool = True
    batch_window_ms: float = 2.0  # longest wait for more sessions after the first ready one
    max_batch_size: int = 32
    max_context_tokens: int = 2048  # also capped by the model's position limit
    max_draft_tokens: int = 32  # per frame, for draft tokens and committed tokens alike
    max_new_tokens: int = 1024
    max_return_top_k: int = 32
    max_support: int = 64  # largest truncated-q support per draft token
    session_idle_s: float = 30.0  # a session that sends nothing for this long is ended (DEADLINE_EXCEEDED)
    session_ttl_s: float = 600.0  # whole-session limit from its handshake (DEADLINE_EXCEEDED), as the edge's deadline
    prefill_chunk_tokens: int = 128  # prompts are fed in chunks of this many tokens, other work between chunks
    memory_budget_bytes: int = 2 * _GIB  # KV cache reserved by all sessions together
    metrics_port: int | None = None  # Prometheus exposition (0 = any free port)
    drain_grace_s: float = 10.0  # how long a stop waits for in-flight sessions
    max_message_bytes: int = 4 * 1024 * 1024
    # HTTP/2 ping policy (grpc.http2.min_recv_ping_interval_without_data_ms,
    # grpc.keepalive_permit_without_calls, grpc.http2.max_ping_strikes): edges ping after 3 s
    # without incoming bytes, even when idle (edge/client.py: that is how they detect a dead
    # link fast), twice this minimum; a client pinging faster than it collects strikes and,
    # past max_ping_strikes, a GOAWAY too_many_pings.
    min_ping_interval_s: float = 1.5
    permit_pings_without_calls: bool = True
    max_ping_strikes: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        positive = {
            "max_sessions": self.max_sessions,
            "max_batch_size": self.max_batch_size,
            "max_context_tokens": self.max_context_tokens,
            "max_draft_tokens": self.max_draft_tokens,
            "max_new_tokens": self.max_new_tokens,
            "max_support": self.max_support,
            "memory_budget_bytes": self.memory_budget_bytes,
            "max_message_bytes": self.max_message_bytes,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.max_return_top_k < 0 or self.batch_window_ms < 0 or self.drain_grace_s < 0:
            raise ValueError("max_return_top_k, batch_window_ms and drain_grace_s must be >= 0")
        if self.session_ttl_s <= 0 or self.session_idle_s <= 0:
            raise ValueError(
                f"session_ttl_s and session_idle_s must be positive, got {self.session_ttl_s}, {self.session_idle_s}"
            )
        if self.max_sessions_per_client is not None and self.max_sessions_per_client <= 0:
            raise ValueError(f"max_sessions_per_client must be positive, got {self.max_sessions_per_client}")
        if self.admission_wait_s < 0 or self.min_ping_interval_s < 0 or self.max_ping_strikes < 0:
            raise ValueError("admission_wait_s, min_ping_interval_s and max_ping_strikes must be >= 0")
        if self.auth_token is not None and not self.auth_token.strip():
            raise ValueError("auth_token is empty")

    @property
    def client_session_cap(self) -> int:
        """Most sessions one client may hold at once (``max_sessions_per_client`` resolved)."""
        if self.max_sessions_per_client is not None:
            return min(self.max_sessions_per_client, self.max_sessions)
        return max(1, self.max_sessions // 4)

    @property
    def secure(self) -> bool:
        """Whether the port is served with TLS."""
        return self.tls_cert is not None

    def limits(self, model_max_positions: int | None) -> Limits:
        """The per-session limits advertised by ``Info``, with the model's position limit applied."""
        max_context = self.max_context_tokens
        if model_max_positions is not None:
            max_context = min(max_context, model_max_positions)
        return Limits(
            max_context_tokens=max_context,
            max_draft_tokens=self.max_draft_tokens,
            max_new_tokens=self.max_new_tokens,
            max_return_top_k=self.max_return_top_k,
            max_support=self.max_support,
        )

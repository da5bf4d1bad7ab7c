"""The edge's configuration and the objects built from it once at start-up.

:class:`EdgeConfig` is the ``[edge]`` concern of :func:`tandemspec.config.load_config`
(defaults < TOML < ``TANDEM_EDGE_*`` environment < flags); :func:`build_runtime` turns it
into a loaded bundle, a warmed-up drafter, the tokenizer, the verifier client, the device
log and the decoder that ties them together; :meth:`EdgeRuntime.new_decoder` gives each
concurrent generation of the local API a decoder of its own (its own drafter cache and
draft-length state, the same session, tokenizer, client, log and gate). A
:class:`LoadedBundle` is the part that belongs to one bundle version, so the local API can
load a newly published one beside it and switch (:mod:`tandemspec.edge.watch`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tandemspec.config import load_config
from tandemspec.edge.bundle import Bundle, default_bundle_dir, load_bundle
from tandemspec.edge.client import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, DraftPolicy, HybridDecoder
from tandemspec.edge.devicelog import DEFAULT_MAX_ROWS, DeviceLog
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.gate import GateChoice, GateKind, OnnxGate, SurvivalDraftLength, TrustGate
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.types import DecodeMode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the edge needs; see ``tandem edge generate --help`` / ``tandem edge serve --help``."""

    cloud: str | None = None  # verifier HOST:PORT; None = local only
    bundle: Path | None = None  # None = the bundled reference bundle
    auth_token_file: Path | None = None
    tls_ca: Path | None = None
    mode: DecodeMode = "lossless"
    draft_length: int = 4  # fixed length, or the cap when the gate sets the length
    # Dynamic draft length: cut a block when the gate's estimated chance that it all
    # survives verification drops below this (None = fixed ``draft_length``).
    min_survival: float | None = None
    gate: Path | None = None  # gate.onnx (default: the bundle's gate); its gate.json sits beside it
    # gated mode: which score decides trust, and its operating point (at most one of the three;
    # none = the default quality floor, see GateChoice)
    gate_kind: GateKind = "learned"
    gate_quality: float | None = None
    gate_lambda: float | None = None
    gate_threshold: float | None = None
    gate_check_every: int = 16  # verify at least every N tokens (0 = only doubted tokens)
    pipeline: bool = True
    tree_budget: int = 0  # lossless mode: draft trees of this many tokens per frame (0 = chains)
    # lossless: choose each frame's length (chains, up to 16; draft_length is then unused) or tree
    # budget (up to tree_budget) from the measured round trip, verify and drafter costs and
    # acceptance (edge/autodraft.py)
    auto_draft: bool = False
    # greedy pipelined lossless chains: pre-draft up to this many guessed outcomes of each awaited
    # verdict and send them as branch frames (docs/architecture.md "Branches"; 0 = none), within
    # the measured round trip's worth of drafting per verdict
    branches: int = 2
    max_support: int = 32
    return_top_k: int = 0
    log_db: Path | None = None
    log_max_rows: int = DEFAULT_MAX_ROWS
    threads: int = 0  # ONNX Runtime intra-op threads (0 = its default)
    connect_timeout_s: float = 3.0
    recv_timeout_s: float = 20.0
    # A silent link is pinged after keepalive_time_s; no answer within keepalive_timeout_s ends
    # the connection (the generation continues locally): a dead link is found in about
    # 2 * keepalive_time_s + keepalive_timeout_s, long before recv_timeout_s.
    keepalive_time_s: float = KEEPALIVE_TIME_MS / 1000
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_MS / 1000
    host: str = "127.0.0.1"
    port: int = 8000
    client_id: str = ""
    # The local API (``tandem edge serve``): generations at once, requests waiting past them
    # (beyond: 429), the most new tokens one request may ask for (also a chat request's
    # default, as OpenAI's chat has none), and the wall time after which a generation is
    # cancelled (504).
    max_concurrent: int = 4
    max_queued: int = 16
    max_request_tokens: int = 2048
    request_timeout_s: float = 300.0
    # ``tandem edge serve``: seconds between looks at the bundle location for a newly
    # published version (0 = never; the bundle loaded at start-up is served until restart).
    watch_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.draft_length < 1:
            raise ValueError(f"draft_length must be >= 1, got {self.draft_length}")
        if self.max_support < 1:
            raise ValueError(f"max_support must be >= 1, got {self.max_support}")
        if self.tree_budget < 0 or self.branches < 0:
            raise ValueError(f"tree_budget and branches must be >= 0, got {self.tree_budget}, {self.branches}")
        if self.gate_check_every < 0:
            raise ValueError(f"gate_check_every must be >= 0, got {self.gate_check_every}")
        self.gate_choice()  # checks the kind and that at most one operating point is given
        if self.max_concurrent < 1 or self.max_queued < 0 or self.max_request_tokens < 1:
            raise ValueError("max_concurrent and max_request_tokens must be >= 1, max_queued >= 0")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.watch_interval_s < 0:
            raise ValueError(f"watch_interval_s must be >= 0, got {self.watch_interval_s}")

    def gate_choice(self) -> GateChoice:
        return GateChoice(self.gate_kind, self.gate_quality, self.gate_lambda, self.gate_threshold)


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    """Build the config from ``--config``, the environment and the flags that were given."""
    flags: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "cloud", "bundle", "auth_token_file", "tls_ca", "mode", "draft_length", "min_survival", "gate",
            "gate_kind", "gate_quality", "gate_lambda", "gate_threshold", "gate_check_every", "log_db", "host", "port",
            "watch_interval_s", "tree_budget", "branches",
        )
    }  # fmt: skip
    if getattr(args, "auto_draft", False):
        flags["auto_draft"] = True
    if getattr(args, "no_pipeline", False):
        flags["pipeline"] = False
    return load_config(EdgeConfig, "edge", file=getattr(args, "config", None), flags=flags)


class LoadedBundle:
    """One bundle ready to decode: its tokenizer, a warmed-up drafter and its gates.

    Decoders built on it share the runtime's verifier client and device log; the local API
    holds one per bundle version it serves and swaps between them (:mod:`tandemspec.edge.watch`).
    """

    def __init__(self, bundle: Bundle, config: EdgeConfig, client: VerifierClient | None, log: DeviceLog | None):
        self.bundle = bundle
        self.version = bundle.manifest.version_label
        self.config = config
        self.tokenizer = EdgeTokenizer.from_bundle(bundle)
        self.drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=config.threads))
        self._client = client
        self._log = log
        self._decoder_config = DecoderConfig(
            mode=config.mode,
            draft_length=config.draft_length,
            pipeline=config.pipeline,
            tree_budget=config.tree_budget,
            auto_draft=config.auto_draft,
            branches=config.branches,
            max_support=config.max_support,
            return_top_k=config.return_top_k,
            client_id=config.client_id,
            gate_check_every=config.gate_check_every,
        )
        self._survival_gate = _survival_gate(config, bundle)
        self._trust_gate = _trust_gate(config, bundle)

    def new_decoder(self, drafter: OnnxDrafter | None = None) -> HybridDecoder:
        """A decoder on ``drafter`` (default: a fork of this bundle's drafter, with a cache of its own)."""
        policy: DraftPolicy | None = None
        if self._survival_gate is not None and self.config.min_survival is not None:
            policy = SurvivalDraftLength(self._survival_gate, self.config.min_survival, self.config.draft_length)
        return HybridDecoder(
            drafter or self.drafter.fork(), self.tokenizer, self._client, self._decoder_config, self._log, policy,
            self._trust_gate,
        )  # fmt: skip


class EdgeRuntime:
    """Bundle, drafter, tokenizer, client, log and decoder, built once (a context manager).

    ``bundle``, ``tokenizer``, ``drafter`` and ``decoder`` are those of the bundle loaded at
    start-up (``loaded``); :meth:`load` loads another one with the same client and log.
    """

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        # Resolved, so that a bundle behind a moving ``current`` link is named by its version folder.
        self.bundle_location = Path(config.bundle or default_bundle_dir())
        bundle = load_bundle(self.bundle_location.resolve())
        self.client = VerifierClient(_client_config(config)) if config.cloud else None
        self.log = DeviceLog(config.log_db, config.log_max_rows) if config.log_db else None
        self.loaded = LoadedBundle(bundle, config, self.client, self.log)
        self.bundle: Bundle = self.loaded.bundle
        self.tokenizer = self.loaded.tokenizer
        self.drafter = self.loaded.drafter
        self.decoder = self.loaded.new_decoder(self.drafter)

    def load(self, path: Path, verify_hashes: bool = True) -> LoadedBundle:
        """Load the bundle at ``path`` for decoding with this runtime's client and log."""
        return LoadedBundle(load_bundle(path, verify_hashes), self.config, self.client, self.log)

    def new_decoder(self) -> HybridDecoder:
        """A decoder for one more concurrent generation: a fork of the drafter, its own draft-length state."""
        return self.loaded.new_decoder()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.log is not None:
            self.log.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _survival_gate(config: EdgeConfig, bundle: Bundle) -> OnnxGate | None:
    """The gate of the dynamic draft length when ``min_survival`` is set, else None (fixed length)."""
    if config.min_survival is None:
        return None
    gate_path = config.gate or bundle.gate_path
    if gate_path is None or not Path(gate_path).is_file():
        raise ValueError("a dynamic draft length (min_survival) needs a gate: pass --gate or use a bundle with one")
    return OnnxGate(Path(gate_path))


def _trust_gate(config: EdgeConfig, bundle: Bundle) -> TrustGate | None:
    """The gated mode's trust gate: required in gated mode, loaded when possible otherwise.

    Outside gated mode it is built on a best-effort basis, so a request of the local API
    may still ask for ``gated``; a bundle without a gate then just cannot serve such requests.
    """
    gate_path = config.gate or bundle.gate_path
    try:
        return TrustGate.from_choice(config.gate_choice(), Path(gate_path) if gate_path else None)
    except ValueError as error:
        if config.mode == "gated":
            raise ValueError(f"gated mode: {error}") from error
        logger.debug("no trust gate: %s", error)
        return None


def _client_config(config: EdgeConfig) -> ClientConfig:
    assert config.cloud is not None
    token = None
    if config.auth_token_file is not None:
        token = config.auth_token_file.read_text(encoding="utf-8").strip()
    return ClientConfig(
        address=config.cloud,
        auth_token=token,
        tls_ca=config.tls_ca,
        connect_timeout_s=config.connect_timeout_s,
        recv_timeout_s=config.recv_timeout_s,
        keepalive_time_s=config.keepalive_time_s,
        keepalive_timeout_s=config.keepalive_timeout_s,
    )

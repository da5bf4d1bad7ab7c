"""``tandem cloud serve``: build the config once, serve until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from tandemspec.cloud.config import CloudConfig
from tandemspec.config import ConfigError, load_config

logger = logging.getLogger(__name__)

EXIT_CONFIG = 2
DEFAULT_PORT = 50051  # the command's default; CloudConfig's own default (0) suits tests


def build_config(args: argparse.Namespace) -> CloudConfig:
    """Defaults < ``[cloud]`` in ``--config`` < ``TANDEM_CLOUD_*`` < explicit flags."""
    flags: dict[str, Any] = {
        "model_dir": args.model,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": args.threads,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "max_sessions": args.max_sessions,
        "max_sessions_per_client": args.max_sessions_per_client,
        "session_idle_s": args.session_idle_s,
        "batch_window_ms": args.batch_window_ms,
        "batching": False if args.no_batching else None,
        "metrics_port": args.metrics_port,
    }
    if args.auth_token_file is not None:
        flags["auth_token"] = read_token(args.auth_token_file)
    return load_config(CloudConfig, "cloud", defaults={"port": DEFAULT_PORT}, file=args.config, flags=flags)


def read_token(path: Path) -> str:
    """The bearer token stored in ``path`` (surrounding whitespace ignored)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"cannot read the auth token file {path}: {error}") from error
    if not token:
        raise ConfigError(f"the auth token file {path} is empty")
    return token


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of ``tandem cloud serve``."""
    try:
        config = build_config(args)
    except ConfigError as error:
        print(f"tandem cloud serve: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if not (config.model_dir / "config.json").is_file():
        print(
            f"tandem cloud serve: no target model at {config.model_dir} "
            "(pass --model DIR, or build the reference pair with `tandem train-reference`)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        asyncio.run(serve(config))
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as error:
        print(f"tandem cloud serve: {error}", file=sys.stderr)
        return 1
    return 0


async def serve(config: CloudConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight sessions for ``drain_grace_s``."""
    from tandemspec.cloud.server import start_server  # imports torch: only when serving

    started = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on {config.host}:{started.port}", flush=True)
    await stop.wait()
    logger.info("draining sessions (up to %.1f s)", config.drain_grace_s)
    await started.shutdown(config.drain_grace_s)
    logger.info("stopped")

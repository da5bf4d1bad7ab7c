"""``tandem fed run``: federated rounds over a fleet on Flower's simulation engine (Ray), a SuperNode per device.

``--quick`` makes a small fleet itself when none is given (3 devices, 8 logged and 3
held-out prompts each) and trains briefly: a few minutes on 2 CPU cores. ``flwr run .``
runs the same apps from ``pyproject.toml``'s ``[tool.flwr.app]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.fleet import FLEET_FILE, FleetConfig, build_fleet, read_fleet
from tandemspec.federated.fed.server_app import RoundLog

logger = logging.getLogger(__name__)

QUICK_DEVICES = 3


def quick_config(config: FedConfig) -> FedConfig:
    """Short local training and evaluation for ``--quick``."""
    return dataclasses.replace(
        config,
        local=dataclasses.replace(config.local, gate_steps=40, distill_steps=4),
        evaluation=dataclasses.replace(config.evaluation, max_new_tokens=32),
    )


def with_settings(config: FedConfig, settings: list[str]) -> FedConfig:
    """Apply ``KEY=VALUE`` run-config settings (values in TOML syntax; bare words are strings)."""
    import tomllib

    values = config.to_run_config()
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {setting!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return FedConfig.from_run_config(values)


def simulate(config: FedConfig, num_devices: int, cpus_per_device: float = 1.0) -> None:
    """Run the ServerApp and one ClientApp per device on Flower's simulation engine."""
    from flwr.simulation import run_simulation

    from tandemspec.federated.fed.client_app import make_client_app
    from tandemspec.federated.fed.server_app import make_server_app

    run_simulation(
        server_app=make_server_app(config),
        client_app=make_client_app(config),
        num_supernodes=num_devices,
        backend_config={"client_resources": {"num_cpus": cpus_per_device, "num_gpus": 0.0}},
    )


def format_history(history: list[RoundLog]) -> str:
    """One line per round: accepted length, gated passes per token, thresholds, bytes, wall time."""
    lines = [
        f"{'round':>5} {'version':>8} {'kept':>5} {'acc.len':>8} {'gated p/t':>9} {'match':>6} "
        f"{'down/client':>12} {'up/client':>10} {'wall s':>7}"
    ]
    for r in history:
        m = r.metrics
        lines.append(
            f"{r.round:>5} {r.version or '-':>8} {'yes' if r.accepted else 'no':>5} "
            f"{m.get('accepted-length', float('nan')):>8.3f} {m.get('gated-passes-per-token', float('nan')):>9.3f} "
            f"{m.get('gated-match', float('nan')):>6.3f} {r.bytes_down_per_client:>12.0f} "
            f"{r.bytes_up_per_client:>10.0f} {r.wall_s:>7.1f}"
        )
    return "\n".join(lines)


def rollback_main(args: argparse.Namespace) -> int:
    """``tandem fed rollback``: point ``OUT/current`` at an earlier published version."""
    from tandemspec.federated.fed.publish import current_release, published_versions, rollback

    if args.to is None:
        current = current_release(args.out)
        for version in published_versions(args.out):
            print(f"{version}{'  <- current' if current is not None and current.version == version else ''}")
        return 0
    previous = current_release(args.out)
    try:
        release = rollback(args.out, args.to)
    except ValueError as error:
        print(f"tandem fed rollback: {error}", file=sys.stderr)
        return 1
    was = previous.version if previous else "none"
    print(f"{args.out}/current -> {release.version} (round {release.round}; was {was})")
    return 0


def run_main(args: argparse.Namespace) -> int:
    """``tandem fed run``."""
    import json

    from tandemspec.federated.fed.report import write_report
    from tandemspec.federated.fed.server_app import HISTORY_NAME

    out: Path = args.out or Path("runs/fed")
    fleet_dir: Path = args.fleet or out / "fleet"
    config = FedConfig(fleet_dir=fleet_dir, out_dir=out, num_rounds=args.rounds if args.rounds is not None else 2)
    if args.pair is not None:
        config = dataclasses.replace(config, pair_dir=args.pair)
    if args.hierarchical:
        config = dataclasses.replace(config, hierarchical=True)
    if args.thresholds:
        config = dataclasses.replace(config, thresholds=args.thresholds)
    if args.quick:
        config = quick_config(config)
    if args.set:
        config = with_settings(config, args.set)
        if args.rounds is None:
            config = dataclasses.replace(config, num_rounds=1)
    if not (fleet_dir / FLEET_FILE).is_file():
        if not args.quick:
            print(f"fed run: {fleet_dir} holds no fleet; make one with `tandem fed fleet` or pass --quick")
            return 1
        pair = config.resolved_pair()
        build_fleet(
            FleetConfig(
                out_dir=fleet_dir,
                target_dir=pair / "target",
                bundle_dir=pair / "edge",
                num_devices=QUICK_DEVICES,
                num_prompts=8,
                num_heldout=3,
            )
        )
    devices = read_fleet(fleet_dir)
    simulate(config, len(devices))
    history_path = out / HISTORY_NAME
    if not history_path.is_file():
        print("fed run: the simulation ended without a history (see the log above)")
        return 1
    history = [RoundLog(**r) for r in json.loads(history_path.read_text())]
    print(format_history(history))
    print(f"table: {write_report(out)}")
    print(f"{len(devices)} devices; bundles under {out}, current -> {(out / 'current').resolve().name}")
    return 0

"""``tandem fed fleet``: virtual devices whose usage is non-IID, each with its own device log.

Each device writes code in one installed Python package (text the reference pair never
trained on: it saw only the standard library). Devices are grouped into clusters by kind
of code - numeric libraries vs packaging/infrastructure tools - so that per-cluster models
and thresholds have something to find. A device's package files are split once, by a hash
of their path: prompts from the *training* files are decoded through a real verifier
(lossless with the target's top-k, and a share gated) into the device's SQLite log; prompts
from the *held-out* files are kept for evaluation and never logged.

Layout of ``--out DIR``::

    DIR/fleet.json                 the devices: name, cluster, package, counts
    DIR/devices/NAME/log.db        the device log (the only thing the ClientApp reads to train)
    DIR/devices/NAME/heldout.jsonl held-out prompts ({"prompt": ...} per line)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tandemspec.bench.prompts import def_prefixes, load_prompts
from tandemspec.edge.devicelog import DeviceLog

logger = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"
LOG_NAME = "log.db"
HELDOUT_NAME = "heldout.jsonl"
# Folders whose files are never used as device text (tests repeat library code as fixtures).
_EXCLUDED_DIRS = frozenset({"test", "tests", "testing", "_vendor", "vendor", "__pycache__", "benchmarks"})

# (package, cluster) in the order devices are made: the two clusters alternate so any prefix
# of the list is balanced. Packages that are not installed are skipped.
SOURCES: tuple[tuple[str, str], ...] = (
    ("numpy", "numeric"),
    ("setuptools", "tooling"),
    ("scipy", "numeric"),
    ("pip", "tooling"),
    ("sympy", "numeric"),
    ("flwr", "tooling"),
    ("networkx", "numeric"),
    ("pydantic", "tooling"),
    ("torch", "numeric"),
    ("transformers", "tooling"),
    ("matplotlib", "numeric"),
    ("ray", "tooling"),
)


@dataclass(frozen=True)
class FleetConfig:
    """What ``tandem fed fleet`` builds."""

    out_dir: Path
    target_dir: Path
    bundle_dir: Path
    num_devices: int = 8
    num_prompts: int = 24  # decoded into each device's log
    num_heldout: int = 8  # kept per device for evaluation
    heldout_share: float = 0.25  # share of each package's files held out
    gated_share: float = 0.25  # share of the logged prompts decoded in gated mode
    max_new_tokens: int = 64
    draft_length: int = 4
    return_top_k: int = 32
    seed: int = 0


@dataclass(frozen=True)
class DeviceSpec:
    """One virtual device of a fleet."""

    name: str
    cluster: str
    package: str
    num_prompts: int
    num_heldout: int
    num_tokens: int  # verified tokens in its log

    def log_path(self, fleet_dir: Path) -> Path:
        return fleet_dir / "devices" / self.name / LOG_NAME

    def heldout_path(self, fleet_dir: Path) -> Path:
        return fleet_dir / "devices" / self.name / HELDOUT_NAME


def package_root(package: str) -> Path | None:
    """The folder of an installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def split_files(root: Path, heldout_share: float) -> tuple[list[Path], list[Path]]:
    """(training, held-out) ``.py`` files of a package, split by a hash of the relative path."""
    train: list[Path] = []
    heldout: list[Path] = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS or part.startswith("test") for part in relative.parts[:-1]):
            continue
        bucket = int.from_bytes(hashlib.sha256(str(relative).encode()).digest()[:4], "big") / 2**32
        (heldout if bucket < heldout_share else train).append(path)
    return train, heldout


def choose_sources(num_devices: int) -> list[tuple[str, str, Path]]:
    """The first ``num_devices`` installed packages of :data:`SOURCES`: (package, cluster, root)."""
    found = [(name, cluster, root) for name, cluster in SOURCES if (root := package_root(name)) is not None]
    if len(found) < num_devices:
        raise ValueError(f"only {len(found)} of the fleet's source packages are installed; asked for {num_devices}")
    return found[:num_devices]


def build_fleet(config: FleetConfig) -> list[DeviceSpec]:
    """Make every device's prompts and decode them into its log through one local verifier."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.federated.collect import CollectConfig, collect

    if config.num_devices < 1:
        raise ValueError("a fleet needs at least one device")
    if (config.out_dir / FLEET_FILE).exists():
        raise FileExistsError(f"{config.out_dir} already holds a fleet")
    sources = choose_sources(config.num_devices)
    server = serve_in_thread(CloudConfig(model_dir=config.target_dir, host="127.0.0.1", port=0))
    devices: list[DeviceSpec] = []
    try:
        for index, (package, cluster, root) in enumerate(sources):
            name = f"d{index}-{package}"
            train_files, heldout_files = split_files(root, config.heldout_share)
            prompts = def_prefixes(train_files, config.num_prompts, seed=config.seed + index)
            heldout = def_prefixes(heldout_files, config.num_heldout, seed=config.seed + index)
            if not prompts or not heldout:
                raise ValueError(f"{package}: no prompts (train {len(prompts)}, held-out {len(heldout)})")
            spec_dir = config.out_dir / "devices" / name
            spec_dir.mkdir(parents=True, exist_ok=True)
            write_prompts(spec_dir / HELDOUT_NAME, heldout)
            num_gated = round(len(prompts) * config.gated_share)
            started = time.perf_counter()
            for mode, part in (("lossless", prompts[num_gated:]), ("gated", prompts[:num_gated])):
                if not part:
                    continue
                collect_config = CollectConfig(
                    log_db=spec_dir / LOG_NAME,
                    target_dir=config.target_dir,
                    bundle_dir=config.bundle_dir,
                    num_prompts=len(part),
                    max_new_tokens=config.max_new_tokens,
                    draft_length=config.draft_length,
                    seed=config.seed,
                    return_top_k=config.return_top_k,
                    mode=mode,  # type: ignore[arg-type]
                )
                collect(collect_config, prompts=part, cloud=server.address)
            with DeviceLog(spec_dir / LOG_NAME) as log:
                num_tokens = log.count()  # trusted tokens that ended a generation unverified are not in it
            logger.info("%s: %d prompts logged in %.1f s", name, len(prompts), time.perf_counter() - started)
            devices.append(DeviceSpec(name, cluster, package, len(prompts), len(heldout), num_tokens))
    finally:
        server.stop()
    write_fleet(config.out_dir, devices, config)
    return devices


def write_prompts(path: Path, prompts: Sequence[str]) -> None:
    """One ``{"prompt": ...}`` per line (the bench's prompt format)."""
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")


def write_fleet(fleet_dir: Path, devices: Sequence[DeviceSpec], config: FleetConfig) -> None:
    """``fleet.json``: the devices and how they were made."""
    data = {
        "devices": [asdict(d) for d in devices],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
    }
    (fleet_dir / FLEET_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_fleet(fleet_dir: Path) -> list[DeviceSpec]:
    """The devices of a fleet folder, in partition order."""
    path = Path(fleet_dir) / FLEET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{fleet_dir} holds no {FLEET_FILE} (make one with `tandem fed fleet`)")
    return [DeviceSpec(**d) for d in json.loads(path.read_text(encoding="utf-8"))["devices"]]


def read_heldout(fleet_dir: Path, device: DeviceSpec) -> list[str]:
    """A device's held-out prompts."""
    return load_prompts(device.heldout_path(fleet_dir))


def fleet_main(args: argparse.Namespace) -> int:
    """``tandem fed fleet``."""
    from tandemspec.edge.bundle import default_bundle_dir

    pair: Path = args.pair or default_bundle_dir().parent
    config = FleetConfig(
        out_dir=args.out,
        target_dir=pair / "target",
        bundle_dir=pair / "edge",
        num_devices=args.devices,
        num_prompts=args.prompts,
        num_heldout=args.heldout,
        seed=args.seed,
    )
    started = time.perf_counter()
    try:
        devices = build_fleet(config)
    except (ValueError, FileExistsError) as error:
        print(f"fed fleet: {error}")
        return 1
    for d in devices:
        print(f"{d.name:<16} {d.cluster:<8} {d.num_prompts:>3} prompts {d.num_tokens:>6} tok {d.num_heldout} held-out")
    print(f"{len(devices)} devices in {time.perf_counter() - started:.0f} s -> {config.out_dir}")
    return 0

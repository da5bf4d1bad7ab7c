"""Versioned edge bundles under ``--out``: each one complete or absent, ``current`` the newest.

Layout::

    OUT/versions/v0001/   an edge bundle (drafter.onnx, tokenizer.json, gate.onnx, gate.json,
                          manifest.json) plus release.json: version, parent, round, metrics,
                          thresholds and the sha256 of every file
    OUT/current -> versions/v0003

A version is built in ``OUT/.staging/`` (the drafter re-exported to ONNX with ``tandem
export``'s code and parity check, the gate graph, the fleet's operating curve and
thresholds), and only a finished folder is renamed into ``versions/`` (a rename within one
file system is atomic); ``current`` is then swapped by renaming a new symlink over it. A
process killed at any point leaves either no new version or a complete one, and
``current`` always names a complete one. Staging leftovers are removed on the next start.

``tandem fed rollback --out OUT --to v0002`` moves ``current`` back to an earlier version
the same way (:func:`rollback`); ``tandem edge serve --bundle OUT/current`` swaps to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tandemspec.edge.bundle import GATE_NAME, MANIFEST_NAME, BundleError, hash_files, load_bundle
from tandemspec.edge.gate import GATE_JSON_NAME, OperatingPoint, curve_to_json
from tandemspec.federated.fed.tasks import THRESHOLD_GRID, CostCurve
from tandemspec.federated.fed.weights import GlobalModel
from tandemspec.federated.gate import to_onnx

logger = logging.getLogger(__name__)

RELEASE_NAME = "release.json"
DRAFTER_WEIGHTS_NAME = "drafter.safetensors"  # the drafter's weights, so a later run continues from this version
CURRENT_NAME = "current"
VERSIONS_DIR = "versions"
STAGING_DIR = ".staging"


@dataclass(frozen=True)
class Release:
    """What ``release.json`` says about one published version."""

    version: str  # "v0001", ...
    parent: str | None
    round: int
    metrics: dict[str, float]
    thresholds: dict[str, float]  # cluster -> learned-gate threshold; "" = the global one
    files: dict[str, str]  # every file of the version but release.json -> sha256
    created_at: float


def version_name(number: int) -> str:
    return f"v{number:04d}"


def current_release(out_dir: Path) -> Release | None:
    """The release ``OUT/current`` points at, or None for a fresh folder."""
    path = Path(out_dir) / CURRENT_NAME / RELEASE_NAME
    if not path.is_file():
        return None
    return Release(**json.loads(path.read_text(encoding="utf-8")))


def next_version(out_dir: Path) -> str:
    """One more than the largest version published so far."""
    versions = Path(out_dir) / VERSIONS_DIR
    numbers = [int(p.name[1:]) for p in versions.glob("v[0-9]*")] if versions.is_dir() else []
    return version_name(max(numbers, default=0) + 1)


def clear_staging(out_dir: Path) -> None:
    """Remove what a killed publisher left half-built."""
    shutil.rmtree(Path(out_dir) / STAGING_DIR, ignore_errors=True)


def curve_points(curve: CostCurve) -> list[OperatingPoint]:
    """The edge's operating-curve form (``gate.json``) of a fleet cost curve."""
    n, rejected = max(curve.num_tokens, 1.0), max(curve.num_rejected, 1.0)
    return [
        OperatingPoint(
            threshold=t,
            trust_rate=float(1.0 - checks / n),
            rejections_caught=float(1.0 - missed / rejected),
            missed_rejections=float(missed / n),
        )
        for t, missed, checks in zip(THRESHOLD_GRID, curve.missed, curve.checks, strict=True)
    ]


def stage_version(
    out_dir: Path,
    model: GlobalModel,
    base_bundle: Path,
    drafter_template: Path,
    curve: CostCurve | None,
    thresholds: Mapping[str, float],
) -> Path:
    """Build a complete bundle for ``model`` in ``OUT/.staging/``; returns its folder (not yet published)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tandemspec.federated.export import ExportConfig, export_bundle

    staging_root = Path(out_dir) / STAGING_DIR
    staging_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build.", dir=staging_root))
    hf_dir = work / "drafter"
    drafter = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(drafter_template))
    drafter.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.drafter.items()}, strict=False)
    drafter.save_pretrained(hf_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (drafter_template / name).is_file():
            shutil.copy(drafter_template / name, hf_dir / name)
    gate_path = work / GATE_NAME
    onnx.save(to_onnx(model.gate), str(gate_path))
    bundle = work / "bundle"
    export_bundle(ExportConfig(drafter_dir=hf_dir, out_dir=bundle, gate_path=gate_path))
    _write_gate_json(bundle, base_bundle, curve, thresholds)
    weights = {k: np.ascontiguousarray(v, np.float32) for k, v in model.drafter.items()}
    save_file(weights, str(bundle / DRAFTER_WEIGHTS_NAME))
    shutil.rmtree(hf_dir)
    return bundle


def _write_gate_json(bundle: Path, base_bundle: Path, curve: CostCurve | None, thresholds: Mapping[str, float]) -> None:
    """``gate.json``: the base bundle's (max position, names), the fleet's learned curve and thresholds."""
    base = base_bundle / GATE_JSON_NAME
    info: dict[str, Any] = json.loads(base.read_text(encoding="utf-8")) if base.is_file() else {}
    info.pop("holdout", None)  # the central report described another gate
    if curve is not None:
        info["operating_curves"] = {"learned": curve_to_json(curve_points(curve))}
        info["num_train"] = int(curve.num_tokens)
    info["cluster_thresholds"] = dict(thresholds)
    info["source"] = "federated"
    (bundle / GATE_JSON_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def publish_version(
    out_dir: Path, staged: Path, round_number: int, metrics: Mapping[str, float], thresholds: Mapping[str, float]
) -> Release:
    """Seal a staged bundle (manifest hashes, release.json), rename it into ``versions/``, swap ``current``."""
    out_dir = Path(out_dir)
    parent = current_release(out_dir)
    version = next_version(out_dir)
    manifest = load_bundle(staged, verify_hashes=False).manifest
    names = sorted(p.name for p in staged.iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, RELEASE_NAME))
    manifest = dataclasses.replace(manifest, files=hash_files(staged, names), model_version=version)
    (staged / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    every = sorted(p.name for p in staged.iterdir() if p.is_file() and p.name != RELEASE_NAME)
    release = Release(
        version=version,
        parent=parent.version if parent else None,
        round=round_number,
        metrics={k: float(v) for k, v in metrics.items()},
        thresholds={k: float(v) for k, v in thresholds.items()},
        files=hash_files(staged, every),
        created_at=time.time(),
    )
    (staged / RELEASE_NAME).write_text(json.dumps(dataclasses.asdict(release), indent=2) + "\n", encoding="utf-8")
    versions = out_dir / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    staged.rename(versions / version)  # atomic: the version appears complete or not at all
    shutil.rmtree(staged.parent, ignore_errors=True)  # the build folder's leftovers
    point_current(out_dir, version)
    logger.info("published %s (parent %s, round %d)", version, release.parent, round_number)
    return release


def point_current(out_dir: Path, version: str) -> None:
    """Make ``OUT/current`` name ``versions/<version>``: a new relative symlink renamed over the old one (atomic)."""
    link = Path(out_dir) / f".{CURRENT_NAME}.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(Path(VERSIONS_DIR) / version)
    os.replace(link, Path(out_dir) / CURRENT_NAME)


def published_versions(out_dir: Path) -> list[str]:
    """The versions under ``OUT/versions/``, oldest first."""
    versions = Path(out_dir) / VERSIONS_DIR
    names = [p.name for p in versions.glob("v[0-9]*") if p.is_dir()] if versions.is_dir() else []
    return sorted(names, key=lambda name: int(name[1:]))


def rollback(out_dir: Path, version: str) -> Release:
    """Point ``OUT/current`` back at an earlier published ``version`` after checking it is whole.

    Raises ValueError when ``version`` was never published or its files no longer match
    their hashes. Watching edges verify and swap to it like to any new version; the next
    published version names it as its parent.
    """
    out_dir = Path(out_dir)
    folder = out_dir / VERSIONS_DIR / version
    if not (folder / RELEASE_NAME).is_file():
        known = ", ".join(published_versions(out_dir)) or "none"
        raise ValueError(f"{out_dir} has no published version {version!r} (published: {known})")
    try:
        load_bundle(folder)  # every file against the manifest's sha256
    except BundleError as error:
        raise ValueError(f"{version} cannot be served again: {error}") from error
    release = Release(**json.loads((folder / RELEASE_NAME).read_text(encoding="utf-8")))
    point_current(out_dir, version)
    logger.info("rolled back %s to %s", out_dir, version)
    return release


def discard(staged: Path) -> None:
    """Drop a staged bundle that was not accepted."""
    shutil.rmtree(staged.parent, ignore_errors=True)

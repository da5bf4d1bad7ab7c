"""The container topology end to end (slow; needs a Docker daemon, a base image and a wheelhouse).

Runs ``scripts/ops_containers.py``: builds the four images, starts docker/compose.yaml (two
verifiers, two edges, a SuperLink, two SuperNodes), one lossless generation per edge through
the pool, one federated round, a SIGTERM drain, teardown. ``TANDEM_OPS_WHEELHOUSE`` names the
wheelhouse (default runs/containers/wheels), ``DOCKER_CLI`` a CLI with BuildKit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _docker_ready() -> bool:
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_container_topology_runs_green() -> None:
    if not _docker_ready():
        pytest.skip("no Docker daemon (see docs/operations.md: dockerd --storage-driver=vfs ...)")
    wheelhouse = os.environ.get("TANDEM_OPS_WHEELHOUSE", str(REPO / "runs" / "containers" / "wheels"))
    script = REPO / "scripts" / "ops_containers.py"
    command = [sys.executable, str(script), "--wheelhouse", wheelhouse, "--generations", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("\n{") :])
    assert summary["ok"] and len(summary["generations"]) == 2
    assert [r["round"] for r in summary["federated_history"]] == [0, 1]
    assert summary["verifier_drain"]["exit_code"] == 0

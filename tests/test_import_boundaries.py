"""Dependency rules of DESIGN.md: the edge never needs torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, pkgutil, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def run_blocked(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(body)], capture_output=True, text=True)


def test_blocker_really_blocks() -> None:
    result = run_blocked("import torch")
    assert result.returncode != 0 and "blocked" in result.stderr


def test_edge_core_and_protos_import_without_torch() -> None:
    result = run_blocked(
        """
        import importlib, pkgutil
        import tandemspec, tandemspec.edge, tandemspec.protos
        names = ["tandemspec.cli", "tandemspec.config", "tandemspec.sampling", "tandemspec.types",
                 "tandemspec.fingerprint", "tandemspec.protos.codec", "tandemspec.protos.tandem_pb2_grpc"]
        names += [m.name for m in pkgutil.walk_packages(tandemspec.edge.__path__, "tandemspec.edge.")]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        """
    )
    assert result.returncode == 0, result.stderr

"""The edge runs where torch and transformers do not exist (docs/architecture.md: dependency rules)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("tandemspec.cloud"):
                raise ImportError(f"{name} is blocked in this test")
            if name.split(".")[0] in {"torch", "transformers"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    sys.modules["torch"] = None  # and a plain `import torch` fails too
    sys.modules["transformers"] = None
    """
)


def _run(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(body)], capture_output=True, text=True, timeout=120
    )


def test_blocker_blocks() -> None:
    for name in ("torch", "transformers.models", "tandemspec.cloud.server"):
        result = _run(f"import {name}")
        assert result.returncode != 0 and "Error" in result.stderr, name


def test_every_edge_module_imports_and_decodes_without_torch(tiny_bundle_dir: Callable[..., Path]) -> None:
    """Import each module of tandemspec.edge, then load a bundle and decode locally."""
    bundle = tiny_bundle_dir("gpt2")
    result = _run(
        f"""
        import importlib, pkgutil
        import tandemspec.edge
        names = [m.name for m in pkgutil.walk_packages(tandemspec.edge.__path__, "tandemspec.edge.")]
        # What the edge builds on: the CLI, config, shared math and the wire contract.
        names += ["tandemspec.cli", "tandemspec.config", "tandemspec.sampling", "tandemspec.types",
                  "tandemspec.fingerprint", "tandemspec.protos.codec", "tandemspec.protos.tandem_pb2_grpc"]
        for name in names:
            importlib.import_module(name)
        assert "tandemspec.cloud" not in sys.modules
        from pathlib import Path
        from tandemspec.edge.decoder import GenerationRequest
        from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime
        with EdgeRuntime(EdgeConfig(bundle=Path({str(bundle)!r}), mode="local")) as runtime:
            request = GenerationRequest(runtime.tokenizer.encode_prompt("x = "), max_new_tokens=5)
            result = runtime.decoder.generate(request)
        assert len(result.token_ids) == 5, result
        print(len(names), "modules")
        """
    )
    assert result.returncode == 0, result.stderr
    count = int(result.stdout.split()[0])
    assert count >= 10

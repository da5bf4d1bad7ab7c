"""``tandem demo``: a local verifier plus an edge on the bundled reference pair, offline.

The verifier runs as a subprocess (``tandem cloud serve --port 0``, so the edge never
imports the cloud package or torch); the edge then completes a few Python snippets and
prints each completion with its decoding statistics.
"""

from __future__ import annotations

import argparse
import logging
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tandemspec.edge.commands import summary_line
from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime
from tandemspec.models import reference_dir
from tandemspec.types import SamplingParams

logger = logging.getLogger(__name__)

DEMO_PROMPTS = (
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.",
    'def read_config(path):\n    """Read a configuration file."""\n',
)
_START_TIMEOUT_S = 180.0


def reference_pair_dir() -> Path:
    """The bundled reference pair (``models/reference``, installed as ``tandemspec.models``)."""
    return reference_dir()


@dataclass(frozen=True)
class VerifierProcess:
    """A verifier running as a subprocess."""

    address: str  # HOST:PORT
    process: subprocess.Popen[str]


@contextmanager
def local_verifier(model_dir: Path, timeout_s: float = _START_TIMEOUT_S) -> Iterator[VerifierProcess]:
    """Run ``tandem cloud serve --port 0`` for ``model_dir`` until the block ends."""
    command = [sys.executable, "-m", "tandemspec.cli", "cloud", "serve", "--model", str(model_dir), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="tandem-demo-verifier-output", daemon=True).start()
    try:
        yield VerifierProcess(_wait_for_address(lines, timeout_s), process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_address(lines: queue.Queue[str | None], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            raise RuntimeError("the verifier exited before listening:\n" + "".join(seen[-20:]))
        seen.append(line)
        if "listening on" in line:
            return line.rsplit("listening on", 1)[1].split()[0]
    raise RuntimeError(f"the verifier did not start within {timeout_s:.0f} s")


def export_in_subprocess(drafter: Path, out: Path) -> None:
    """``tandem export`` in a child process (the edge itself never imports torch)."""
    command = [sys.executable, "-m", "tandemspec.cli", "export", "--drafter", str(drafter), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=_START_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"tandem export failed:\n{result.stdout}{result.stderr[-2000:]}")


def demo_main(args: argparse.Namespace) -> int:
    """Start a verifier, run the demo prompts through the edge, print text and statistics."""
    pair = args.pair or reference_pair_dir()
    target, bundle = pair / "target", pair / "edge"
    if not (target / "config.json").is_file():
        print(
            f"tandem demo: no target model at {target} (build the pair with `tandem train-reference`)", file=sys.stderr
        )
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="tandem-demo-") as scratch:
            if not (bundle / "manifest.json").is_file():
                if not (pair / "drafter" / "config.json").is_file():
                    print(f"tandem demo: no edge bundle at {bundle} and no drafter to export", file=sys.stderr)
                    return 1
                print(f"no edge bundle at {bundle}: exporting {pair / 'drafter'} for this run ...", flush=True)
                bundle = Path(scratch) / "edge"
                export_in_subprocess(pair / "drafter", bundle)
            return _run_demo(target, bundle, args)
    except (RuntimeError, ValueError, OSError) as error:
        print(f"tandem demo: {error}", file=sys.stderr)
        return 1


def _run_demo(target: Path, bundle: Path, args: argparse.Namespace) -> int:
    print(f"starting a local verifier for {target} ...", flush=True)
    with local_verifier(target) as verifier:
        print(f"verifier listening on {verifier.address}\n", flush=True)
        with EdgeRuntime(EdgeConfig(cloud=verifier.address, bundle=bundle, mode=args.mode)) as runtime:
            sampling = SamplingParams(temperature=args.temperature)
            for prompt in DEMO_PROMPTS:
                request = GenerationRequest(runtime.tokenizer.encode_prompt(prompt), sampling, args.max_new_tokens)
                result = runtime.decoder.generate(request)
                print("-" * 72)
                print(prompt + result.text)
                print(summary_line(result), flush=True)
    return 0

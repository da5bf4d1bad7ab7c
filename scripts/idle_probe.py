"""Idle probe: does a request after a long idle spell still reach the verifier through the daemon?

Starts ``tandem cloud serve`` and ``tandem edge serve`` on the reference pair (both as
subprocesses, on loopback), then ``--transitions`` times: one completion request, an idle
spell of ``--idle-s`` seconds (default: twice the client's keepalive interval), and the
next request. Prints one JSON line: for each request whether it fell back to local.

    python scripts/idle_probe.py [--transitions 4] [--idle-s 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tandemspec.edge.client import KEEPALIVE_TIME_MS
from tandemspec.edge.demo import local_verifier
from tandemspec.models import reference_dir
from tandemspec.net import free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--transitions", type=int, default=4)
    parser.add_argument("--idle-s", type=float, default=2 * KEEPALIVE_TIME_MS / 1000)
    args = parser.parse_args()
    port = free_port()
    with local_verifier(reference_dir() / "target") as verifier:
        command = [sys.executable, "-m", "tandemspec.cli", "edge", "serve", "--cloud", verifier.address]
        daemon = subprocess.Popen([*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            outcomes = []
            for index in range(args.transitions + 1):
                if index:
                    time.sleep(args.idle_s)
                body = {"prompt": "def main():\n", "max_tokens": 16, "temperature": 0}
                response = httpx.post(url + "/v1/completions", json=body, timeout=120)
                response.raise_for_status()
                stats = response.json()["tandem_stats"]
                outcomes.append({"fell_back": stats["fell_back_to_local"], "reason": stats["fallback_reason"]})
            after_idle = outcomes[1:]
            print(
                json.dumps(
                    {
                        "command": "python scripts/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
                        "idle_s": args.idle_s,
                        "keepalive_s": KEEPALIVE_TIME_MS / 1000,
                        "transitions": len(after_idle),
                        "fell_back_after_idle": sum(o["fell_back"] for o in after_idle),
                        "requests": outcomes,
                    }
                )
            )
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()

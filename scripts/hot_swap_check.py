"""Hot-swap and rollback through the real commands, with requests flowing the whole time.

Starts ``tandem cloud serve`` (the reference target) and ``tandem edge serve --bundle
OUT/current --watch-interval-s 1`` as loopback subprocesses, publishes the reference edge
bundle as v0001, keeps two clients sending completions, publishes v0002, then runs
``tandem fed rollback --out OUT --to v0001``; prints the requests, the failures, the
versions in the order responses named them and the seconds from each move of ``current``
to ``/health`` naming the new version.

    python scripts/hot_swap_check.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tandemspec.federated.fed.publish import CURRENT_NAME, publish_version
from tandemspec.models import reference_dir
from tandemspec.net import free_port


def wait_for_version(base: str, version: str, timeout_s: float = 60.0) -> float:
    """Seconds until ``/health`` names ``version``."""
    start = time.monotonic()
    while httpx.get(base + "/health", timeout=5).json()["bundle_version"] != version:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"the edge did not swap to {version}")
        time.sleep(0.05)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="requests flow this long around each swap")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hot-swap-"))
    out = work / "out"

    def publish(number: int) -> str:
        staged = work / f"build-{number}" / "bundle"
        shutil.copytree(reference_dir() / "edge", staged)
        return publish_version(out, staged, number, {}, {}).version

    publish(1)
    cloud_port, edge_port = free_port(), free_port()
    base = f"http://127.0.0.1:{edge_port}"
    processes = [
        subprocess.Popen(
            ["tandem", "cloud", "serve", "--port", str(cloud_port), "--dtype", "float32"],
            stdout=(work / "cloud.log").open("w"), stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            ["tandem", "-v", "edge", "serve", "--bundle", str(out / CURRENT_NAME), "--cloud",
             f"127.0.0.1:{cloud_port}", "--port", str(edge_port), "--watch-interval-s", "1"],
            stdout=(work / "edge.log").open("w"), stderr=subprocess.STDOUT,
        ),
    ]  # fmt: skip
    records: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        body = {"prompt": "def main():\n", "max_tokens": 16, "temperature": 0}
        with httpx.Client(base_url=base, timeout=60) as http:
            while not stop.is_set() and len(records) < 1000:
                response = http.post("/v1/completions", json=body)
                version = response.json()["tandem_stats"]["bundle_version"] if response.status_code == 200 else None
                records.append((response.status_code, version))

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).json()["verifier"]["reachable"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the edge or the verifier did not come up")
            time.sleep(0.5)
        clients = [threading.Thread(target=client) for _ in range(2)]
        for thread in clients:
            thread.start()
        time.sleep(args.seconds)
        second = publish(2)
        publish_to_swap_s = wait_for_version(base, second)
        time.sleep(args.seconds)
        subprocess.run(["tandem", "fed", "rollback", "--out", str(out), "--to", "v0001"], check=True)
        rollback_to_swap_s = wait_for_version(base, "v0001")
        time.sleep(args.seconds)
        stop.set()
        for thread in clients:
            thread.join()
        health = httpx.get(base + "/health").json()
    finally:
        stop.set()
        for process in reversed(processes):
            process.terminate()
            process.wait(30)
    order = [v for i, (_, v) in enumerate(records) if i == 0 or records[i - 1][1] != v]
    print(json.dumps({
        "requests": len(records), "failed": sum(1 for status, _ in records if status != 200),
        "versions_in_order": order, "publish_to_swap_s": round(publish_to_swap_s, 2),
        "rollback_to_swap_s": round(rollback_to_swap_s, 2), "bundle_swaps": health["bundle_swaps"],
    }, indent=1))  # fmt: skip
    print("edge log:", *[line for line in (work / "edge.log").read_text().splitlines() if "bundle" in line], sep="\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

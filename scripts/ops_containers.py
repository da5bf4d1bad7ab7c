"""Build the images, start the container topology, use it, tear it down; prints a log summary.

What it does, in order (every container on the host network, listening on 127.0.0.1):

1. builds ``tandemspec/{edge,verifier,superlink,supernode}:TAG`` with BuildKit from
   ``docker/``, on ``--base`` (default ``local/debian-python:bookworm``, made from Debian
   packages with ``--make-base``: debootstrap + docker import) and a wheelhouse made on the
   host (``--wheelhouse``; filled with ``pip download`` of this environment when empty),
   served to the builds on a loopback port;
2. starts ``docker/compose.yaml`` (two verifiers, two edges, a SuperLink, two SuperNodes) on
   free ports, waits for every health check;
3. runs ``--generations`` completions through each edge's local API (lossless, checked: no
   fallback) and reads how the verifiers' sessions spread;
4. runs one federated round (``flwr run`` from the host against the SuperLink; the SuperNodes
   train on the edges' device logs) and checks the round's history;
5. stops one verifier with ``docker stop`` (SIGTERM: drain) and checks its exit code, then
   ``docker-compose down``, whatever happened before.

    python scripts/ops_containers.py --wheelhouse /tmp/wheels [--make-base]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tandemspec.net import free_ports

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.yaml"
PROJECT = "tandem-ops"
CONTAINER_UID = 10001  # the images' non-root user (docker/Dockerfile.*)
IMAGES = {  # role -> (Dockerfile, build target)
    "edge": ("Dockerfile.edge", None),
    "verifier": ("Dockerfile.verifier", None),
    "superlink": ("Dockerfile.federated", "superlink"),
    "supernode": ("Dockerfile.federated", "supernode"),
}
PORT_NAMES = (
    "VERIFIER_A_PORT", "VERIFIER_A_METRICS_PORT", "VERIFIER_B_PORT", "VERIFIER_B_METRICS_PORT", "EDGE_A_PORT",
    "EDGE_B_PORT", "SUPERLINK_PORT", "SUPERLINK_HEALTH_PORT", "SUPERNODE_A_PORT", "SUPERNODE_A_HEALTH_PORT",
    "SUPERNODE_B_PORT", "SUPERNODE_B_HEALTH_PORT",
)  # fmt: skip
SERVICES = ("verifier-a", "verifier-b", "edge-a", "edge-b", "superlink", "supernode-a", "supernode-b")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], timeout_s: float = 1800, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if check and result.returncode != 0:
        output = result.stdout[-3000:] + result.stderr[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
    return result.stdout


def make_base(image: str, workdir: Path) -> None:
    """A Python base image from Debian packages (no registry needed)."""
    rootfs = workdir / "rootfs"
    log(f"debootstrap bookworm into {rootfs}")
    packages = "python3,python3-venv,python3-pip,ca-certificates"
    run(["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs)], timeout_s=1800)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", image], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


def fill_wheelhouse(wheelhouse: Path) -> None:
    """``pip download`` every requirement of this environment (the project itself is built from the sources)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    frozen = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"])
    requirements = wheelhouse / "requirements.txt"
    requirements.write_text(frozen + "setuptools>=68\nwheel\n")
    log(f"pip download into {wheelhouse}")
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheelhouse), "-r", str(requirements)])


def serve_wheelhouse(wheelhouse: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(wheelhouse))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def build_images(base: str, index_url: str, tag: str) -> dict[str, float]:
    """Build every role's image; returns build seconds per role."""
    # BuildKit (RUN --mount): the daemon's own (DOCKER_BUILDKIT=1 with a CLI that has it built in,
    # e.g. Debian's docker.io) or buildx; DOCKER_CLI picks the CLI.
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    took: dict[str, float] = {}
    for role, (dockerfile, target) in IMAGES.items():
        started = time.monotonic()
        command = [os.environ.get("DOCKER_CLI", "docker"), "build", "--network", "host", "--build-arg", f"BASE={base}"]
        command += ["--build-arg", f"PIP_ARGS=--no-index --find-links {index_url}"]
        command += ["-f", str(REPO / "docker" / dockerfile), "-t", f"tandemspec/{role}:{tag}"]
        command += [*(["--target", target] if target else []), str(REPO)]
        log(f"building tandemspec/{role}:{tag}")
        run(command, env=env)
        took[role] = time.monotonic() - started
    return took


def image_sizes(tag: str) -> dict[str, int]:
    sizes = {}
    for role in IMAGES:
        out = run(["docker", "image", "inspect", "--format", "{{.Size}}", f"tandemspec/{role}:{tag}"])
        sizes[role] = int(out.strip())
    return sizes


def prepare_state(state: Path, heldout: list[str]) -> None:
    """Bind-mounted folders owned by the containers' user: device logs (+ held-out prompts), fed output."""
    for sub in ("edge-a/logs", "edge-b/logs", "fed", "models"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    for edge in ("edge-a", "edge-b"):
        lines = "".join(json.dumps({"prompt": p}) + "\n" for p in heldout)
        (state / edge / "logs" / "heldout.jsonl").write_text(lines)
    for path in [state, *state.rglob("*")]:
        os.chown(path, CONTAINER_UID, CONTAINER_UID)


def container_id(service: str, env: dict[str, str]) -> str:
    return run(["docker-compose", "-f", str(COMPOSE), "-p", PROJECT, "ps", "-q", service], env=env).strip()


def container_logs(cid: str) -> str:
    result = subprocess.run(["docker", "logs", "--tail", "40", cid], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def wait_healthy(env: dict[str, str], timeout_s: float) -> dict[str, float]:
    """Seconds until each service's health check passed."""
    started = time.monotonic()
    healthy: dict[str, float] = {}
    while len(healthy) < len(SERVICES):
        for service in SERVICES:
            if service in healthy:
                continue
            cid = container_id(service, env)
            status = run(["docker", "inspect", "--format", "{{.State.Health.Status}}", cid], check=False).strip()
            if status == "healthy":
                healthy[service] = time.monotonic() - started
                log(f"{service} healthy after {healthy[service]:.0f} s")
                continue
            running = run(["docker", "inspect", "--format", "{{.State.Running}}", cid]).strip() == "true"
            if status == "unhealthy" or not running:
                raise RuntimeError(f"{service} is {status if running else 'not running'}:\n{container_logs(cid)}")
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"not healthy after {timeout_s:.0f} s: {sorted(set(SERVICES) - set(healthy))}")
        time.sleep(2)
    return healthy


def complete(port: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
        model = json.loads(reply.read())["model"]  # the id the edge serves its bundle under
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return dict(json.loads(reply.read()))


def verifier_sessions(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("tandem_verifier_sessions_total")
    )


def federated_round(env: dict[str, str], superlink_port: int, timeout_s: float) -> float:
    """One round with ``flwr run`` from the host; the ServerApp writes into the SuperLink's fed volume."""
    with tempfile.TemporaryDirectory() as home:
        config = f'[superlink]\ndefault = "ops"\n\n[superlink.ops]\naddress = "127.0.0.1:{superlink_port}"\n'
        (Path(home) / "config.toml").write_text(config + "insecure = true\n")
        settings = (
            "fleet-dir='/var/lib/tandem/fed/no-fleet' out-dir='/var/lib/tandem/fed/out' pair-dir='' num-rounds=1 "
            "local-distill-steps=2 local-gate-steps=20 evaluation-max-new-tokens=8"
        )
        # The FAB carries only the app's configuration: its code is the package installed in the
        # images (a copy of the sources first on sys.path would shadow it without its package-dir map).
        app = Path(home) / "app"
        app.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, app / name)
        started = time.monotonic()
        flwr = shutil.which("flwr") or "flwr"
        command = [flwr, "run", str(app), "ops", "--stream", "--run-config", settings]
        output = run(command, timeout_s=timeout_s, env={**env, "FLWR_HOME": home})
        log("flwr run output (tail):\n" + output[-3000:])
        if "failed" in output or "raised an exception" in output:
            raise RuntimeError("the federated round reported a failure (output above)")
        return time.monotonic() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "runs" / "containers" / "wheels")
    parser.add_argument("--base", default="local/debian-python:bookworm")
    parser.add_argument("--make-base", action="store_true", help="build --base from Debian packages first")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--state", type=Path, default=REPO / "runs" / "containers" / "state")
    parser.add_argument("--generations", type=int, default=3, help="completions per edge")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--health-timeout-s", type=float, default=600)
    parser.add_argument("--round-timeout-s", type=float, default=1500)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    summary: dict[str, Any] = {"command": "python scripts/ops_containers.py " + " ".join(sys.argv[1:])}
    run(["docker", "info", "--format", "{{.ServerVersion}} {{.Driver}}"])
    if args.make_base:
        with tempfile.TemporaryDirectory() as workdir:
            make_base(args.base, Path(workdir))
    if not args.skip_build:
        if not any(args.wheelhouse.glob("*.whl")):
            fill_wheelhouse(args.wheelhouse)
        server, index_url = serve_wheelhouse(args.wheelhouse)
        try:
            summary["build_s"] = {k: round(v) for k, v in build_images(args.base, index_url, args.tag).items()}
        finally:
            server.shutdown()
    summary["image_bytes"] = image_sizes(args.tag)
    shutil.rmtree(args.state, ignore_errors=True)
    sys.path.insert(0, str(REPO))
    from tandemspec.bench.prompts import load_prompts

    prompts = load_prompts()
    prepare_state(args.state, prompts[-2:])
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    # vfs copies a whole image per container: creating one takes longer than compose's 60 s default
    env = {**os.environ, "TANDEM_OPS_STATE": str(args.state), "TANDEM_TAG": args.tag, "COMPOSE_HTTP_TIMEOUT": "900"}
    env.update({k: str(v) for k, v in ports.items()})
    compose = ["docker-compose", "-f", str(COMPOSE), "-p", PROJECT]
    ok = False
    try:
        run([*compose, "down", "-v", "--remove-orphans"], env=env, timeout_s=900, check=False)  # an earlier run's
        log("docker-compose up")
        run([*compose, "up", "-d"], env=env, timeout_s=1800)
        summary["healthy_after_s"] = {k: round(v) for k, v in wait_healthy(env, args.health_timeout_s).items()}
        generations = []
        for edge, port in (("edge-a", ports["EDGE_A_PORT"]), ("edge-b", ports["EDGE_B_PORT"])):
            for i in range(args.generations):
                reply = complete(port, prompts[i], args.max_tokens)
                stats = reply["tandem_stats"]
                if stats["fell_back_to_local"] or stats["mode_used"] != "lossless":
                    raise RuntimeError(f"{edge} generation {i} was not lossless through the pool: {stats}")
                generations.append({"edge": edge, "tokens": reply["usage"]["completion_tokens"],
                                    "mean_accepted_length": round(stats["mean_accepted_length"], 2)})  # fmt: skip
        log(f"{len(generations)} lossless generations through the edges")
        summary["generations"] = generations
        summary["verifier_sessions"] = {
            "verifier-a": verifier_sessions(ports["VERIFIER_A_METRICS_PORT"]),
            "verifier-b": verifier_sessions(ports["VERIFIER_B_METRICS_PORT"]),
        }
        log(f"sessions per verifier: {summary['verifier_sessions']}")
        log("federated round: flwr run against the SuperLink container")
        summary["federated_round_s"] = round(federated_round(env, ports["SUPERLINK_PORT"], args.round_timeout_s))
        history = json.loads((args.state / "fed" / "out" / "history.json").read_text())
        summary["federated_history"] = [{"round": r["round"], "num_updates": r.get("num_updates")} for r in history]
        if [r["round"] for r in history] != [0, 1] or history[1].get("num_updates") != 2:
            raise RuntimeError(f"the round did not take both SuperNodes' updates: {summary['federated_history']}")
        log(f"federated round done in {summary['federated_round_s']} s: {summary['federated_history']}")
        cid = container_id("verifier-a", env)
        stop_started = time.monotonic()
        run(["docker", "stop", "-t", "30", cid])
        summary["verifier_drain"] = {
            "exit_code": int(run(["docker", "inspect", "--format", "{{.State.ExitCode}}", cid]).strip()),
            "stop_s": round(time.monotonic() - stop_started, 1),
        }
        log(f"verifier-a stopped by SIGTERM: {summary['verifier_drain']}")
        ok = summary["verifier_drain"]["exit_code"] == 0
    finally:
        if not ok:
            for service in SERVICES:
                cid = container_id(service, env)
                if cid:
                    print(f"--- {service} ---\n{container_logs(cid)}")
        log("docker-compose down")
        run([*compose, "down", "-v", "--remove-orphans"], env=env, timeout_s=300, check=False)
    summary["total_s"] = round(time.monotonic() - started)
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Verifier replicas as real processes (``tandem cloud serve``), for the operations scripts.

A :class:`Replica` owns one ``tandem cloud serve`` subprocess on a fixed port, so it can be
killed and restarted behind the same address; :func:`free_port` picks loopback ports.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tandemspec.edge.demo import wait_until_listening
from tandemspec.net import free_port

START_TIMEOUT_S = 180.0


class Replica:
    """``tandem cloud serve`` on 127.0.0.1:``port``; start, kill -9, SIGTERM, restart on the same port."""

    def __init__(self, model_dir: Path, extra_args: tuple[str, ...] = (), taskset: str | None = None) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.extra_args = extra_args
        self.taskset = taskset
        self.process: subprocess.Popen[str] | None = None
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start and wait for the ready line; returns the seconds it took."""
        command = [sys.executable, "-m", "tandemspec.cli", "cloud", "serve", "--model", str(self.model_dir)]
        command += ["--port", str(self.port), "--metrics-port", str(self.metrics_port), *self.extra_args]
        if self.taskset is not None:
            command = ["taskset", "-c", self.taskset, *command]
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until_listening(self.process, START_TIMEOUT_S)
        return time.monotonic() - started

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """``kill -9``: no drain, every stream on it cut."""
        if self.process is not None and self.alive:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (drain), then wait; SIGKILL past ``timeout_s``. Returns the exit code."""
        if self.process is None:
            return None
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def rss_mb(self) -> float | None:
        """Resident memory of the verifier process (VmRSS), or None when it is not running."""
        if not self.alive or self.process is None:
            return None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else None

    def counters(self) -> dict[str, float]:
        """The verifier's own counters from its Prometheus endpoint (``*_total`` samples)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"tandem_verifier_(\w+_total)(\{[^}]*\})? (\S+)", line)
            if match:
                key = match.group(1) + (match.group(2) or "")
                found[key] = float(match.group(3))
        return found

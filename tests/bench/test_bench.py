"""``tandem bench`` end to end on a tiny pair: every mode and figure lands in the outputs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandemspec.bench.commands import config_from_args
from tandemspec.bench.figures import FIGURE_NAMES, cheapest_at_quality, quality_recovered
from tandemspec.bench.report import PLOT_NAMES
from tandemspec.bench.runner import BenchConfig, find_mode, gated_mode_name, plan_modes
from tandemspec.cli import build_parser
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.features import token_features

MODES = ("cloud", "local", "lossless-sync", "lossless")
GATE_KINDS = ("learned", "entropy", "top1")
GATE_QUALITIES = (0.5, 0.9)
GATED = tuple(gated_mode_name(kind, q) for kind in GATE_KINDS for q in GATE_QUALITIES)
SIZED = ("lossless-sync-k2", "lossless-sync-tree6", "lossless-tree6")  # the chain and tree families' modes
PROMPTS = ("def add(a, b):\n    return", "import os\n\n\ndef main():\n")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_DRAFTER = ("llama", 1, 0.05)  # what tiny_bundle_dir("llama") exports (seed 1, DRAFTER_NOISE)


def install_gate(bundle_dir: Path, target_dir: Path, num_tokens: int = 400, num_sessions: int = 10) -> None:
    """Train a gate into ``bundle_dir`` on real tokens: the drafter's features over stdlib source,
    labelled accepted where the drafter's and the target's greedy picks agree (greedy acceptance)."""
    import inspect
    import textwrap

    import torch
    from transformers import AutoModelForCausalLM

    from tandemspec.edge.drafter import OnnxDrafter
    from tandemspec.edge.tokenizer import EdgeTokenizer
    from tandemspec.federated.gate import TrainConfig, train_gate, write_gate

    bundle = load_bundle(bundle_dir)
    ids = EdgeTokenizer.from_bundle(bundle).encode_prompt(inspect.getsource(textwrap))[:num_tokens]
    drafter = OnnxDrafter(bundle)
    drafter.reset(ids[:1])
    logits, hidden = drafter.extend(ids[1:])  # [n - 1, vocab], [n - 1, hidden]: predictions of ids[2:]...
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    with torch.no_grad():
        target_logits = target(torch.tensor([ids])).logits[0, 1:].numpy()  # [n - 1, vocab], aligned with logits
    features = token_features(logits, hidden, np.arange(len(logits)) % 4)  # positions as in blocks of 4
    labels = logits.argmax(-1) == target_logits.argmax(-1)
    groups = np.arange(len(labels)) * num_sessions // len(labels)
    write_gate(train_gate(features, labels, groups, TrainConfig(steps=100)), bundle_dir)


def tiny_config(bundle_dir: Path, tiny_model_dir: Callable[..., Path], **fields: Any) -> BenchConfig:
    """The tiny llama pair, 2 prompts, 12 tokens, RTT 5 ms, 1 and 2 edges (``fields`` override)."""
    defaults: dict[str, Any] = {
        "prompts": PROMPTS,
        "rtts_ms": (5.0,),
        "concurrency": (1, 2),
        "generations_per_edge": 1,
        "max_new_tokens": 12,
        "num_assisted_prompts": 1,
        "gate_kinds": GATE_KINDS,
        "gate_qualities": GATE_QUALITIES,
    }
    return BenchConfig(
        target_dir=tiny_model_dir("llama", 0),
        drafter_dir=tiny_model_dir(*TINY_DRAFTER),
        bundle_dir=bundle_dir,
        **(defaults | fields),
    )


@pytest.fixture(scope="module")
def gated_bundle(
    tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Callable[..., Path], tiny_model_dir: Callable[..., Path]
) -> Path:
    """A copy of the tiny llama bundle with a gate (gate.onnx and gate.json with operating curves)."""
    bundle = tmp_path_factory.mktemp("gated") / "edge"
    shutil.copytree(tiny_bundle_dir("llama"), bundle)
    install_gate(bundle, tiny_model_dir("llama", 0))
    return bundle


@pytest.fixture(scope="module")
def bench_out(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Callable[..., Path], gated_bundle: Path
) -> tuple[Path, dict[str, Any]]:
    """One small bench run on the tiny llama pair, every fixed mode and 6 gated operating points."""
    pytest.importorskip("matplotlib")
    import torch

    from tandemspec.bench.commands import run_bench

    torch.set_num_threads(1)
    modes = (*BenchConfig.modes, "chain", "tree")
    config = tiny_config(gated_bundle, tiny_model_dir, modes=modes, chain_lengths=(2,), tree_budgets=(6,))
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
    assert on_disk["machine"]["verifier"] == {"device": "cpu", "dtype": "float32"}  # as the verifier reported it
    assert "verifier on cpu in float32" in (out / "results.md").read_text(encoding="utf-8")
    assert on_disk["versions"]["torch"] and on_disk["versions"]["onnxruntime"]
    assert on_disk["skipped_modes"] == {}
    assert [p["mode"] for p in on_disk["gated_points"]] == list(GATED)


def test_every_mode_has_every_figure(bench_out: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_out
    assert set(results["figures"]) == {*MODES, *GATED, *SIZED}
    for mode in (*MODES, *GATED, *SIZED):
        row = results["figures"][mode]["5"]
        assert set(row) == set(FIGURE_NAMES)
        assert row["num_prompts"] == 2 and row["num_tokens"] > 0
        assert row["num_fell_back"] == 0
    assert all(results["figures"][mode]["5"]["trust_rate"] is None for mode in MODES)


def test_gated_points_have_their_gate_and_figures(bench_out: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_out
    for point in results["gated_points"]:
        assert point["kind"] in GATE_KINDS and point["quality"] in GATE_QUALITIES
        assert np.isfinite(point["threshold"])
        row = results["figures"][point["mode"]]["5"]
        assert row["quality_recovered"] is not None
        assert 0.0 <= row["trust_rate"] <= 1.0
        # Every verified round emits at least one token; trusted tokens ride along in rounds.
        assert 0.0 < row["target_passes_per_token"] <= 1.0 + 1e-9
    for kind in GATE_KINDS:  # a higher quality floor never trusts more (same curve, stricter floor)
        low, high = (results["gated_points"][GATED.index(gated_mode_name(kind, q))] for q in GATE_QUALITIES)
        if kind == "entropy":  # trusted at or below the entropy threshold
            assert high["threshold"] <= low["threshold"]
        else:
            assert high["threshold"] >= low["threshold"]
    best = results["headline"]["gated_at_quality_aim"]
    assert set(best) == set(GATE_KINDS)
    for by_rtt in best.values():
        point = by_rtt["5"]
        assert point is None or point["quality_recovered"] >= results["headline"]["gated_quality_aim"]


def test_lossless_matches_cloud_and_quality_is_defined_by_its_ends(
    bench_out: tuple[Path, dict[str, Any]], tiny_model_dir: Callable[..., Path], tiny_bundle_dir: Callable[..., Path]
) -> None:
    _, results = bench_out
    figures = {mode: results["figures"][mode]["5"] for mode in MODES}
    assert figures["lossless"]["exact_match_rate"] == 1.0
    assert figures["lossless-sync"]["exact_match_rate"] == 1.0
    # Cloud-only is the quality reference: check it against the target run by transformers
    # itself (greedy generate, then the NLL of what it generated), not against itself.
    want_nll = _target_greedy_nll(tiny_model_dir("llama", 0), tiny_bundle_dir("llama"), 12)
    assert figures["cloud"]["nll"] == pytest.approx(want_nll, rel=1e-4)
    assert figures["lossless"]["nll"] == pytest.approx(want_nll, rel=1e-4)
    assert figures["local"]["quality_recovered"] == 0.0
    assert figures["lossless"]["quality_recovered"] == pytest.approx(1.0, abs=1e-6)
    # Target passes as the edge counts them == the verifier's own counters (one prefill per prompt).
    for mode, row in figures.items():
        tokens, prompts = row["num_tokens"], row["num_prompts"]
        server_passes = round(row["server_passes_per_token"] * tokens)
        edge_passes = round(row["target_passes_per_token"] * tokens)
        assert server_passes == (0 if mode == "local" else edge_passes + prompts), mode
    assert round(figures["cloud"]["server_passes_per_token"] * figures["cloud"]["num_tokens"]) == (
        figures["cloud"]["num_tokens"] + figures["cloud"]["num_prompts"]
    )  # cloud-only: one verifier step per generated token
    accepted = figures["lossless-sync"]["mean_accepted_length"]
    assert accepted >= 1.0
    # A verified round commits at most draft_length + 1 tokens, so passes/token >= 1/(that).
    assert figures["lossless-sync"]["target_passes_per_token"] >= 1 / 5 - 1e-9


def test_chain_and_tree_modes_are_lossless(bench_out: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_out
    for mode, most in (("lossless-sync-k2", 3), ("lossless-sync-tree6", 7), ("lossless-tree6", 7)):
        row = results["figures"][mode]["5"]
        assert row["exact_match_rate"] == 1.0, mode
        # The edge's pass count is the verifier's (one prefill per prompt), and a round commits
        # at most its deepest path + the bonus (a chain of 2: 3 tokens; a tree of 6 at most 7).
        passes = round(row["target_passes_per_token"] * row["num_tokens"])
        assert round(row["server_passes_per_token"] * row["num_tokens"]) == passes + row["num_prompts"], mode
        assert 1.0 <= row["mean_accepted_length"] <= most, mode


def test_tree_and_chain_flags_reach_the_config() -> None:
    args = build_parser().parse_args(["bench", "--out", "x", "--tree-budget", "8,16", "--chain-lengths", "6"])
    config = config_from_args(args)
    assert config.tree_budgets == (8, 16) and config.chain_lengths == (6,)
    assert {"tree", "chain"} <= set(config.modes)
    names = [m.name for m in plan_modes(config, None).modes]
    assert names[-5:] == [
        "lossless-sync-k6",
        "lossless-sync-tree8",
        "lossless-tree8",
        "lossless-sync-tree16",
        "lossless-tree16",
    ]
    with pytest.raises(ValueError, match="tree modes need"):
        BenchConfig(Path("t"), Path("d"), Path("b"), PROMPTS, modes=("tree",))


def _target_greedy_nll(target_dir: Path, bundle_dir: Path, max_new_tokens: int) -> float:
    """Mean NLL per token of the target's own greedy continuations of PROMPTS (transformers only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tandemspec.edge.tokenizer import EdgeTokenizer

    tokenizer = EdgeTokenizer.from_bundle(load_bundle(bundle_dir))
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for text in PROMPTS:
        prompt = torch.tensor([tokenizer.encode_prompt(text)])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            log_probs = torch.log_softmax(model(out).logits[0, :-1].float(), dim=-1)  # [T-1, V]
        picked = log_probs.gather(-1, out[0, 1:, None])[:, 0]  # [T-1]: position t predicts t+1
        total += float(-picked[prompt.shape[1] - 1 :].sum())
        count += out.shape[1] - prompt.shape[1]
    return total / count


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
    assert "## Gated operating points" in text and "skipped:" not in text
    table = text.split("## Gated operating points")[1].split("\n\n")[2].splitlines()
    assert len(table) == 2 + len(GATED)  # header, rule, one row per point
    assert [row.split("|")[1].strip() for row in table[2:]] == sorted(
        [kind for kind in GATE_KINDS for _ in GATE_QUALITIES], key=GATE_KINDS.index
    )


def test_no_gate_skips_the_gated_family_only(
    tiny_bundle_dir: Callable[..., Path], tiny_model_dir: Callable[..., Path], gated_bundle: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_bundle_dir("llama"), tiny_model_dir)
    plan = plan_modes(config, load_bundle(config.bundle_dir).gate_path)
    assert [m.name for m in plan.modes] == list(MODES)
    assert not plan.gates and not plan.gated_points
    assert "no gate" in plan.skipped["gated"]
    # A gate without operating curves (an older gate.json): skipped too, saying what is missing.
    bundle = tmp_path / "edge"
    shutil.copytree(gated_bundle, bundle)
    metadata = json.loads((bundle / "gate.json").read_text(encoding="utf-8"))
    del metadata["operating_curves"]
    (bundle / "gate.json").write_text(json.dumps(metadata), encoding="utf-8")
    plan = plan_modes(config, bundle / "gate.onnx")
    assert [m.name for m in plan.modes] == list(MODES)
    assert "operating curve" in plan.skipped["gated"]


def test_cheapest_at_quality_aim() -> None:
    points = [{"mode": "a", "kind": "top1", "quality": 0.5}, {"mode": "b", "kind": "top1", "quality": 0.9}]
    figures = {
        "a": {"0": {"quality_recovered": 0.8, "target_passes_per_token": 0.1}},
        "b": {"0": {"quality_recovered": 0.95, "target_passes_per_token": 0.3}},
    }
    best = cheapest_at_quality(figures, points, 0.9)["top1"]["0"]
    assert best is not None and best["mode"] == "b"
    assert cheapest_at_quality(figures, points, 0.99) == {"top1": {"0": None}}


def test_verifier_device_and_dtype_reach_the_config() -> None:
    config = config_from_args(build_parser().parse_args(["bench", "--out", "x"]))
    assert (config.target_device, config.target_dtype) == ("auto", "auto")
    args = build_parser().parse_args(["bench", "--out", "x", "--device", "cpu", "--dtype", "bfloat16"])
    config = config_from_args(args)
    assert (config.target_device, config.target_dtype) == ("cpu", "bfloat16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--out", "x", "--dtype", "int4"])


def test_gate_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["bench", "--quick", "--out", "x", "--gate-kinds", "top1,entropy", "--gate-check-every", "0"]
    )
    config = config_from_args(args)
    assert config.gate_kinds == ("top1", "entropy") and config.gate_qualities == (0.7, 0.9)
    assert config.gate_check_every == 0 and "gated" in config.modes
    args = build_parser().parse_args(["bench", "--out", "x", "--gate-qualities", "0.6,0.95"])
    assert config_from_args(args).gate_qualities == (0.6, 0.95)
    with pytest.raises(ValueError, match="gate kind"):
        config_from_args(build_parser().parse_args(["bench", "--out", "x", "--gate-kinds", "magic"]))


def test_quality_recovered_formula() -> None:
    assert quality_recovered(2.0, 3.0, 1.0) == 0.5
    assert quality_recovered(1.0, 1.0, 1.0) is None


def test_unknown_modes() -> None:
    with pytest.raises(ValueError, match="unknown mode"):
        find_mode("turbo")
    with pytest.raises(ValueError, match="unknown mode"):
        BenchConfig(Path("t"), Path("d"), Path("b"), PROMPTS, modes=("cloud", "turbo"))
    with pytest.raises(ValueError, match="quality floors"):
        BenchConfig(Path("t"), Path("d"), Path("b"), PROMPTS, gate_qualities=(1.5,))


def test_auto_tree_modes_take_the_largest_tree_budget() -> None:
    args = build_parser().parse_args(["bench", "--out", "x", "--modes", "cloud,tree-auto", "--tree-budget", "8,16"])
    config = config_from_args(args)
    assert config.modes == ("cloud", "tree-auto")  # the budgets size the auto mode: no fixed tree modes added
    plan = plan_modes(dataclasses.replace(config, modes=("tree-sync-auto", "tree-auto", "tree")), None)
    auto = [m for m in plan.modes if m.auto_draft]
    assert [(m.name, m.pipeline, m.tree_budget) for m in auto] == [
        ("tree-sync-auto", False, 16),
        ("tree-auto", True, 16),
    ]
    assert [m.name for m in plan.modes if not m.auto_draft] == [
        f"lossless{s}-tree{n}" for n in (8, 16) for s in ("-sync", "")
    ]
    with pytest.raises(ValueError, match="largest tree budget"):
        BenchConfig(Path("t"), Path("d"), Path("b"), PROMPTS, modes=("tree-auto",))

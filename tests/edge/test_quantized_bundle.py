"""``tandem quantize``: an int8 drafter is a valid bundle, and decoding with it stays lossless."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tandemspec.cli import main
from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.client import ClientConfig, VerifierClient
from tandemspec.edge.decoder import DecoderConfig, GenerationRequest, HybridDecoder
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter
from tandemspec.edge.tokenizer import EdgeTokenizer
from tandemspec.federated.quantize import INT8, QuantizeError, quantize_bundle


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle_dir: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "edge"
    report = quantize_bundle(tiny_bundle_dir("llama"), out)
    assert report.int8_mb < report.float_mb
    assert 0.0 <= report.top1_agreement <= 1.0 and report.probe_tokens >= 8
    assert report.float_ms_per_token > 0 and report.int8_ms_per_token > 0
    return out


def test_int8_bundle_is_a_verified_bundle(int8_bundle: Path, tiny_bundle_dir: Callable[..., Path]) -> None:
    bundle = load_bundle(int8_bundle)  # checks every file's hash
    source = load_bundle(tiny_bundle_dir("llama"))
    assert bundle.manifest.weights == INT8 and source.manifest.weights == "float32"
    assert bundle.manifest.tokenizer_fingerprint == source.manifest.tokenizer_fingerprint
    assert set(bundle.manifest.files) == set(source.manifest.files)
    assert bundle.manifest.files["drafter.onnx"] != source.manifest.files["drafter.onnx"]
    with pytest.raises(QuantizeError, match="already int8"):
        quantize_bundle(int8_bundle, int8_bundle.parent / "again")


def test_lossless_decoding_with_the_int8_drafter_is_target_greedy(
    int8_bundle: Path, verifier_for: Callable[[str], Any], target_greedy: Any
) -> None:
    """The verifier judges what the int8 drafter proposed: the output is still the target's own."""
    bundle = load_bundle(int8_bundle)
    drafter = OnnxDrafter(bundle, DrafterOptions(providers=("CPUExecutionProvider",), intra_op_threads=1))
    tokenizer = EdgeTokenizer.from_bundle(bundle)
    client = VerifierClient(ClientConfig(address=verifier_for("llama").address, recv_timeout_s=20.0))
    decoder = HybridDecoder(drafter, tokenizer, client, DecoderConfig(draft_length=4))
    accepted = 0
    for text in ("def add(a, b):\n    return", "import os\nimport sys\n\n\nclass Config:\n"):
        prompt = tokenizer.encode_prompt(text)
        result = decoder.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=16))
        assert result.stats.mode_used == "lossless" and not result.stats.fell_back_to_local
        assert result.token_ids == target_greedy("llama", prompt, 16)
        accepted += result.stats.num_accepted
    assert accepted > 0  # the int8 drafts were judged and some were kept


def test_quantize_command_refuses_what_is_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--bundle", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "tandem quantize:" in capsys.readouterr().out


def test_quantize_command_prints_its_measurements(
    tiny_bundle_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["quantize", "--bundle", str(tiny_bundle_dir("qwen2")), "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") :])
    assert set(report) >= {"float_ms_per_token", "int8_ms_per_token", "top1_agreement", "int8_mb"}

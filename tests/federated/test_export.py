"""``tandem export``: ONNX bundles of Llama, Qwen2 and GPT-2 drafters match PyTorch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tandemspec.edge.bundle import BundleError, load_bundle
from tandemspec.fingerprint import tokenizer_fingerprint

FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_parity_with_torch(
    family: str, tiny_bundle_dir: Callable[..., Path], tiny_model_dir: Callable[..., Path]
) -> None:
    """Prefill, one token with past, three with past, and after a rollback: ONNX == torch (logits and hidden)."""
    from transformers import AutoModelForCausalLM

    from tandemspec.federated.export import check_parity

    bundle = tiny_bundle_dir(family)
    drafter_dir = tiny_model_dir(family, 1, 0.05)
    model = AutoModelForCausalLM.from_pretrained(drafter_dir).eval()
    report = check_parity(model, bundle, tolerance=1e-4, seed=7)
    assert set(report.logits) == {"prefill", "one_with_past", "three_with_past", "after_rollback"}
    assert report.worst < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_describes_the_drafter(
    family: str, tiny_bundle_dir: Callable[..., Path], tiny_model_dir: Callable[..., Path]
) -> None:
    bundle = load_bundle(tiny_bundle_dir(family))
    m = bundle.manifest
    assert m.family == family
    assert (m.vocab_size, m.hidden_size, m.num_layers, m.max_positions) == (384, 64, 2, 512)
    assert m.num_kv_heads == (4 if family == "gpt2" else 2) and m.head_dim == 16
    assert (m.bos_id, m.eos_ids, m.pad_id) == (1, (2,), 0)
    # the drafter's own file (the verifier compares it with the target's); the bundle's may differ in
    # what AutoTokenizer rebuilds (Qwen2's normaliser and pre-tokenizer)
    assert m.tokenizer_fingerprint == tokenizer_fingerprint(tiny_model_dir(family, 1, 0.05) / "tokenizer.json")
    assert set(m.files) >= {"drafter.onnx", "tokenizer.json"}
    assert m.opset == 18


def test_tampered_bundle_is_refused(tiny_bundle_dir: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "edge"
    shutil.copytree(tiny_bundle_dir("llama"), copy)
    with (copy / "tokenizer.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["bundle_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version"):
        load_bundle(copy)


def test_export_command_writes_a_bundle(
    tiny_model_dir: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI verb end to end (legacy-free: the same dynamo exporter), refusing to clobber a non-bundle folder."""
    from tandemspec.cli import main

    out = tmp_path / "bundle"
    assert main(["export", "--drafter", str(tiny_model_dir("llama", 0)), "--out", str(out), "--opset", "18"]) == 0
    assert "edge bundle written" in capsys.readouterr().out
    assert load_bundle(out).manifest.family == "llama"
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["export", "--drafter", str(tiny_model_dir("llama", 0)), "--out", str(precious)]) == 1
    assert (precious / "notes.txt").read_text() == "keep me"


def test_parity_failure_is_loud(tiny_bundle_dir: Callable[..., Path], tiny_model_dir: Callable[..., Path]) -> None:
    """A graph that does not match its PyTorch model fails the check (here: another model's weights)."""
    from transformers import AutoModelForCausalLM

    from tandemspec.federated.export import ExportError, check_parity

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", 5)).eval()
    with pytest.raises(ExportError, match="differs"):
        check_parity(other, tiny_bundle_dir("llama"), tolerance=1e-4)


@pytest.mark.parametrize("adds_bos, model_type", [(True, None), (False, None), (True, "qwen2")],
                         ids=["bos", "no-bos", "qwen2-class"])  # fmt: skip
def test_bundle_tokenizer_encodes_as_auto_tokenizer(
    adds_bos: bool, model_type: str | None, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """With or without a BOS in the model's post-processor (Llama-style vs SmolLM2/ChatML-style), and
    when the model's tokenizer class rebuilds the pre-tokenizer (Qwen2's), the edge encodes a prompt as
    ``AutoTokenizer`` does; the chat template and its variables travel too."""
    import shutil

    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    from tandemspec.edge.chat import ChatTemplate
    from tandemspec.edge.tokenizer import EdgeTokenizer
    from tandemspec.federated.export import write_tokenizer

    model_dir, out = tmp_path / "model", tmp_path / "bundle"
    out.mkdir()
    shutil.copytree(tiny_tokenizer_dir, model_dir)
    if not adds_bos:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer.save(str(model_dir / "tokenizer.json"))
    if model_type is not None:
        (model_dir / "config.json").write_text(json.dumps({"model_type": model_type}))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}<assistant>"
    (model_dir / "chat_template.jinja").write_text(template)
    special = write_tokenizer(model_dir, out)
    assert special["bos_token"] == "<|bos|>" and special["eos_token"] == "<|eos|>"
    assert (out / "chat_template.jinja").read_text() == template
    auto = AutoTokenizer.from_pretrained(model_dir)
    edge = EdgeTokenizer(out / "tokenizer.json", 1, (2,), ChatTemplate(template, special))
    for text in ("def f(x):\n    return x + 1\n", "  café 中文", ""):
        want = list(auto(text)["input_ids"])
        assert list(edge.encode_prompt(text)) == want
        assert (want[:1] == [1]) is adds_bos
    messages = [{"role": "user", "content": "hi <|bos|>"}]
    want = list(auto.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    assert list(edge.encode_chat(messages)) == want

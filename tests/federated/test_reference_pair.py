"""The committed reference pair loads offline with stock transformers and has the promised shape."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

PAIR = Path(__file__).resolve().parents[2] / "models" / "reference"
pytestmark = pytest.mark.skipif(not (PAIR / "target" / "config.json").exists(), reason="reference pair not built")


def test_pair_loads_offline_with_auto_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {name: AutoModelForCausalLM.from_pretrained(PAIR / name) for name in ("target", "drafter")}
    tokenizers = {name: AutoTokenizer.from_pretrained(PAIR / name) for name in ("target", "drafter")}
    assert 8e6 <= models["target"].num_parameters() <= 20e6
    assert models["drafter"].config.model_type == models["target"].config.model_type == "llama"
    assert models["drafter"].config.vocab_size == models["target"].config.vocab_size
    text = "import os\n\ndef main() -> None:\n    print(os.getcwd())\n"
    assert tokenizers["target"].encode(text) == tokenizers["drafter"].encode(text)
    ids = tokenizers["target"].encode(text)
    assert ids[0] == tokenizers["target"].bos_token_id  # the models are trained on documents that start with BOS
    assert tokenizers["target"].decode(ids, skip_special_tokens=True) == text


def test_drafter_has_at_most_a_fifth_of_target_compute() -> None:
    import json

    def per_token(name: str) -> int:
        c = json.loads((PAIR / name / "config.json").read_text())
        blocks = c["num_hidden_layers"] * (4 * c["hidden_size"] ** 2 + 3 * c["hidden_size"] * c["intermediate_size"])
        return blocks + c["vocab_size"] * c["hidden_size"]

    assert per_token("drafter") <= per_token("target") / 5


def test_committed_pair_stays_under_48_mb() -> None:
    total = sum(path.stat().st_size for path in PAIR.rglob("*") if path.is_file())
    assert total <= 48 * 1024 * 1024

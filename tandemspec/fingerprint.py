"""Tokenizer fingerprints: edge and cloud must tokenize identically or verification is meaningless."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def tokenizer_fingerprint(tokenizer_json: Path) -> str:
    """A short hash of what decides token ids: the model (vocab, merges) and added tokens.

    Formatting, normaliser and decoder settings that do not change ids of plain text are
    still included through the model section; whitespace in the file is not.
    """
    data: dict[str, Any] = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    relevant = {
        "model": data.get("model"),
        "added_tokens": [(t.get("id"), t.get("content")) for t in data.get("added_tokens", [])],
        "normalizer": data.get("normalizer"),
        "pre_tokenizer": data.get("pre_tokenizer"),
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return "sha256:" + hashlib.sha256(canonical).hexdigest()[:32]

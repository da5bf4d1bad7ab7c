"""The gate-driven draft length (EAGLE-2 style): cut a block when its estimated survival drops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandemspec.edge.features import token_features
from tandemspec.edge.gate import SurvivalDraftLength
from tandemspec.edge.runtime import EdgeConfig, EdgeRuntime


class ScriptedGate:
    """Returns the given acceptance probabilities in order (a stand-in for OnnxGate)."""

    def __init__(self, probabilities: list[float]) -> None:
        self.probabilities = list(probabilities)
        self.seen: list[np.ndarray] = []

    def predict(self, features: np.ndarray) -> np.ndarray:
        self.seen.append(features)
        return np.array([self.probabilities.pop(0)], dtype=np.float32)


def drafted_lengths(policy: SurvivalDraftLength, blocks: int) -> list[int]:
    """How many tokens each block gets when the loop asks the policy after every token."""
    logits, hidden = np.zeros(10), np.zeros(6)
    lengths = []
    for _ in range(blocks):
        index = 1
        while policy.keep_drafting(index, token_features(logits[None], hidden[None], np.array([index - 1]))):
            index += 1
        lengths.append(index)
    return lengths


def test_block_stops_when_survival_falls_below_threshold() -> None:
    # Block 1: 0.9, 0.9 -> 0.81, 0.5 -> 0.405 < 0.5: stop after 3 tokens.
    # Block 2 starts afresh: 0.4 < 0.5 at once: 1 token.
    gate = ScriptedGate([0.9, 0.9, 0.5, 0.4])
    policy = SurvivalDraftLength(gate, min_survival=0.5, max_length=8)  # type: ignore[arg-type]
    assert drafted_lengths(policy, 2) == [3, 1]
    # The gate sees the features the loop hands it (of the token just drafted; feature 3 is its position).
    assert [int(f[0, 3]) for f in gate.seen] == [0, 1, 2, 0]
    assert gate.seen[0].shape == (1, 4 + 6)


def test_block_is_capped_at_max_length() -> None:
    policy = SurvivalDraftLength(ScriptedGate([1.0] * 5), min_survival=0.5, max_length=3)  # type: ignore[arg-type]
    assert drafted_lengths(policy, 1) == [3]


@pytest.mark.parametrize("bad", [{"min_survival": 1.5}, {"max_length": 0}])
def test_invalid_settings_are_refused(bad: dict[str, float]) -> None:
    settings = {"min_survival": 0.5, "max_length": 4, **bad}
    with pytest.raises(ValueError):
        SurvivalDraftLength(ScriptedGate([]), **settings)  # type: ignore[arg-type]


def test_dynamic_length_without_a_gate_is_a_clear_error(tiny_bundle_dir: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="needs a gate"):
        EdgeRuntime(EdgeConfig(bundle=tiny_bundle_dir("gpt2"), mode="local", min_survival=0.5))

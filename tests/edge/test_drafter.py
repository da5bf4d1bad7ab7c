"""OnnxDrafter: KV cache bookkeeping, rollback, limits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.drafter import DrafterOptions, OnnxDrafter


@pytest.fixture(scope="module")
def drafter(tiny_bundle_dir: Callable[..., Path]) -> OnnxDrafter:
    return OnnxDrafter(load_bundle(tiny_bundle_dir("qwen2")), DrafterOptions(capacity=64, intra_op_threads=1))


def test_incremental_equals_one_shot(drafter: OnnxDrafter) -> None:
    ids = [1, 50, 60, 70, 80, 90, 100]
    drafter.rollback(0)
    one_shot_logits, one_shot_hidden = drafter.extend(ids)  # [7, vocab], [7, hidden]
    last_logits, last_hidden = drafter.reset(ids[:3])
    np.testing.assert_allclose(last_logits, one_shot_logits[2], atol=1e-4)
    np.testing.assert_allclose(last_hidden, one_shot_hidden[2], atol=1e-4)
    logits, _ = drafter.extend(ids[3:5])
    np.testing.assert_allclose(logits, one_shot_logits[3:5], atol=1e-4)
    logits, _ = drafter.extend(ids[5:])
    np.testing.assert_allclose(logits, one_shot_logits[5:], atol=1e-4)
    assert drafter.length == 7 and drafter.tokens.tolist() == ids


def test_rollback_then_extend_matches_a_fresh_sequence(drafter: OnnxDrafter) -> None:
    drafter.reset([1, 5, 6, 7, 8, 9])
    drafter.rollback(3)
    assert drafter.length == 3 and drafter.tokens.tolist() == [1, 5, 6]
    logits, _ = drafter.extend([40, 41])
    drafter.reset([1, 5, 6])
    fresh, _ = drafter.extend([40, 41])
    np.testing.assert_allclose(logits, fresh, atol=1e-5)


def test_limits(drafter: OnnxDrafter) -> None:
    drafter.reset([1])
    with pytest.raises(ValueError, match="roll back"):
        drafter.rollback(5)
    with pytest.raises(ValueError, match="capacity"):
        drafter.extend([3] * 64)
    with pytest.raises(ValueError, match="vocabulary"):
        drafter.extend([100_000])
    with pytest.raises(ValueError):
        drafter.reset([])
    assert drafter.length == 1
    assert drafter.capacity == 64 and drafter.providers[-1] == "CPUExecutionProvider"

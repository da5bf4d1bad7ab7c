"""The fast proposal distribution equals truncate(process_logits(...)) from the shared sampling math."""

from __future__ import annotations

import numpy as np
import pytest

from tandemspec.edge.proposal import draft_distribution
from tandemspec.sampling import process_logits, truncate
from tandemspec.types import SamplingParams


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.5),
        SamplingParams(temperature=2.0, top_p=0.999),
    ],
)
@pytest.mark.parametrize("max_support", [1, 8, 32])
def test_matches_the_reference_formula(params: SamplingParams, max_support: int) -> None:
    rng = np.random.default_rng(max_support)
    for scale in (0.5, 3.0, 20.0):
        logits = (rng.normal(size=1000) * scale).astype(np.float32)
        fast = draft_distribution(logits, params, max_support)
        reference = truncate(process_logits(logits, params), max_support)
        assert fast.ids == reference.ids
        np.testing.assert_allclose(fast.probs, reference.probs, rtol=1e-9, atol=1e-12)
        assert abs(sum(fast.probs) - 1.0) < 1e-9


def test_small_vocabulary_and_ties() -> None:
    logits = np.array([1.0, 1.0, 1.0, 0.0])
    q = draft_distribution(logits, SamplingParams(temperature=1.0), 8)
    assert q.ids == (0, 1, 2, 3)
    assert q == truncate(process_logits(logits, SamplingParams(temperature=1.0)), 8)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9),
        SamplingParams(temperature=1.0, top_p=0.99),
        SamplingParams(temperature=3.0, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=700),
    ],
)
def test_local_distribution_is_untruncated_process_logits(params: SamplingParams) -> None:
    from tandemspec.edge.proposal import local_distribution

    logits = np.random.default_rng(3).normal(size=2000) * 2
    exact = process_logits(logits, params)
    ids, probs = local_distribution(logits, params)
    dense = np.zeros_like(exact)
    dense[ids] = probs
    np.testing.assert_allclose(dense, exact, atol=1e-12)

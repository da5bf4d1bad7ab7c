"""The shared sampling math: logits processing and the speculative acceptance rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tandemspec.sampling import (
    process_logits,
    residual_distribution,
    seeded_rng,
    softmax,
    truncate,
    verify_greedy,
    verify_sampling,
)
from tandemspec.types import SamplingParams, SparseDist


def tv_bound(num_categories: int, num_samples: int, delta: float = 1e-6) -> float:
    """With probability >= 1 - delta, TV(empirical, true) stays below this (L1 concentration)."""
    return math.sqrt((num_categories * math.log(2) + math.log(1 / delta)) / (2 * num_samples))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


# ---------------------------------------------------------------- logits processing


def test_greedy_is_one_hot_at_argmax() -> None:
    logits = np.array([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 0.0]])
    probs = process_logits(logits, SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(probs, [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_temperature_scales_logits() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    probs = process_logits(logits, SamplingParams(temperature=0.5))
    expected = np.array([0.25, 0.09, 0.04]) / 0.38
    np.testing.assert_allclose(probs, expected, rtol=1e-9)


def test_top_k_keeps_k_most_likely() -> None:
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(probs, [0, 4 / 7, 0, 3 / 7], rtol=1e-9)


def test_top_p_keeps_smallest_prefix_reaching_mass() -> None:
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    # 0.4 + 0.3 = 0.7 >= 0.6: two tokens survive.
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.6))
    np.testing.assert_allclose(probs, [0, 4 / 7, 0, 3 / 7], rtol=1e-9)
    # A tiny top_p still keeps the most likely token.
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))
    np.testing.assert_allclose(probs, [0, 1, 0, 0])


def test_top_p_applies_to_the_renormalised_top_k_distribution() -> None:
    # After top-k=2: [0.45, 0.25] / 0.70 = [0.643, 0.357]; top-p 0.6 then keeps one token
    # (as Hugging Face's warpers do), though 0.45 < 0.6 in the unnormalised distribution.
    logits = np.log(np.array([0.05, 0.45, 0.25, 0.25]))
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6))
    np.testing.assert_allclose(probs, [0, 1, 0, 0])
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.5))
    np.testing.assert_allclose(probs, [0, 0.45 / 0.70, 0.25 / 0.70, 0], rtol=1e-9)


def test_ties_break_by_token_id() -> None:
    logits = np.zeros(5)
    probs = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(probs, [0.5, 0.5, 0, 0, 0])


def test_processing_is_batched_row_by_row() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 50))
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9)
    batched = process_logits(logits, params)
    for i in range(3):
        for j in range(4):
            np.testing.assert_allclose(batched[i, j], process_logits(logits[i, j], params))


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_sampling_params_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)  # type: ignore[arg-type]


def test_truncate_keeps_support_and_renormalises() -> None:
    dist = truncate(np.array([0.1, 0.5, 0.0, 0.4]), max_support=2)
    assert dist.ids == (1, 3)
    np.testing.assert_allclose(dist.probs, [5 / 9, 4 / 9])
    assert truncate(np.array([0.0, 1.0, 0.0]), max_support=8).ids == (1,)


def _reference_process(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The textbook formula: a full stable sort of the vocabulary per row (the fast path must equal it)."""
    probs = softmax(np.asarray(logits, dtype=np.float64) / params.temperature)
    vocab = probs.shape[-1]
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    if 0 < params.top_k < vocab:
        sorted_probs = np.where(np.arange(vocab) < params.top_k, sorted_probs, 0.0)
        sorted_probs /= sorted_probs.sum(axis=-1, keepdims=True)
    if 0.0 < params.top_p < 1.0:
        mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs
        sorted_probs = np.where(mass_before < params.top_p, sorted_probs, 0.0)
    out = np.empty_like(sorted_probs)
    np.put_along_axis(out, order, sorted_probs, axis=-1)
    return out / out.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.0, top_k=7),
        SamplingParams(temperature=1.3, top_p=0.9),
        SamplingParams(temperature=0.2, top_p=0.999),  # a nucleus larger than the first head
        SamplingParams(temperature=3.0, top_p=0.995),  # nearly flat: most of the vocabulary
        SamplingParams(temperature=0.7, top_k=40, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=100, top_p=0.99),
    ],
)
def test_fast_processing_and_truncation_equal_the_full_sort(params: SamplingParams) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(6, 2000))
    logits[:3] = np.round(logits[:3])  # many exact ties, also at the top-k and top-p cut-offs
    fast, reference = process_logits(logits, params), _reference_process(logits, params)
    np.testing.assert_array_equal(fast > 0, reference > 0)  # the same support, ties included
    np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-15)
    for row in reference:
        for support in (1, 5, 64):
            order = np.argsort(-row, kind="stable")[: min(support, np.count_nonzero(row))]
            dist = truncate(row, support)
            assert dist.ids == tuple(int(i) for i in order)
            np.testing.assert_allclose(dist.probs, row[order] / row[order].sum(), rtol=1e-12)


# ---------------------------------------------------------------- acceptance rule


def test_greedy_accepts_longest_matching_prefix() -> None:
    argmax = np.array([4, 7, 9, 3])
    judgement = verify_greedy(argmax, (4, 7, 1))
    assert (judgement.num_accepted, judgement.next_token, judgement.labels) == (2, 9, (True, True, False))
    full = verify_greedy(argmax, (4, 7, 9))
    assert (full.num_accepted, full.next_token) == (3, 3)  # bonus
    deferred = verify_greedy(argmax, (4, 7, 9), defer_bonus=True)
    assert (deferred.num_accepted, deferred.next_token) == (3, None)
    assert verify_greedy(argmax, (5,)).next_token == 4  # correction = target argmax


def test_labels_exist_past_the_first_rejection() -> None:
    judgement = verify_greedy(np.array([1, 2, 3, 0]), (9, 2, 3))
    assert judgement.labels == (False, True, True)
    assert judgement.num_accepted == 0


def test_residual_is_normalised_positive_part() -> None:
    p = np.array([0.5, 0.3, 0.2, 0.0])
    q = SparseDist(ids=(0, 3), probs=(0.6, 0.4))
    np.testing.assert_allclose(residual_distribution(p, q), [0, 0.6, 0.4, 0])


def _sample_tokens(p: np.ndarray, q: np.ndarray, num_draws: int, block: int, max_support: int) -> np.ndarray:
    """Generate ``block`` tokens per run by drafting from truncated q and verifying against p.

    Distributions are context-free (p[i], q[i] per position), so a lossless procedure
    emits tokens whose marginal at position i is p[i]: [num_draws, block].
    """
    out = np.empty((num_draws, block), dtype=np.int64)
    for run in range(num_draws):
        emitted: list[int] = []
        rng = seeded_rng(run, 0)
        while len(emitted) < block:
            start = len(emitted)
            k = block - start
            dists = tuple(truncate(q[start + i], max_support) for i in range(k))
            draft = tuple(int(rng.choice(d.ids, p=np.asarray(d.probs) / sum(d.probs))) for d in dists)
            targets = np.vstack([p[start : start + k], p[-1:]])  # one extra row for the bonus
            judgement = verify_sampling(targets, draft, dists, rng)
            emitted.extend(draft[: judgement.num_accepted])
            assert judgement.next_token is not None
            emitted.append(judgement.next_token)
        out[run] = emitted[:block]
    return out


def test_rejection_sampling_reproduces_target_distribution() -> None:
    """>= 100,000 draws: every emitted position follows p, though the drafter's q is far off."""
    vocab, block, num_draws = 6, 3, 100_000
    p = np.array(
        [
            [0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
            [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
            [0.30, 0.05, 0.30, 0.05, 0.25, 0.05],
            [0.10, 0.20, 0.30, 0.20, 0.10, 0.10],
        ]
    )
    q = np.array(
        [
            [0.10, 0.10, 0.40, 0.20, 0.10, 0.10],
            [0.30, 0.30, 0.20, 0.10, 0.05, 0.05],
            [0.05, 0.40, 0.05, 0.40, 0.05, 0.05],
        ]
    )
    # Truncating q to 4 tokens makes it sparse, as on the wire; the rule must still be exact.
    tokens = _sample_tokens(p, q, num_draws, block, max_support=4)
    bound = tv_bound(vocab, num_draws)
    for position in range(block):
        empirical = np.bincount(tokens[:, position], minlength=vocab) / num_draws
        assert total_variation(empirical, p[position]) < bound, position
        # The test has power: the drafter's own distribution is far outside the bound.
        assert total_variation(q[position], p[position]) > 10 * bound


def test_verification_is_reproducible_for_a_seed() -> None:
    p = np.full((3, 5), 0.2)
    dists = (SparseDist((0, 1), (0.5, 0.5)),) * 2
    first = verify_sampling(p, (0, 1), dists, seeded_rng(7, 12))
    second = verify_sampling(p, (0, 1), dists, seeded_rng(7, 12))
    assert first == second


def test_processing_matches_hugging_face_warpers() -> None:
    """The edge's numpy math equals transformers' temperature/top-k/top-p warpers."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(8, 64))
    for params in (
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=12, top_p=0.7),
    ):
        warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
        if params.top_k:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        scores = torch.tensor(logits, dtype=torch.float64)
        expected = torch.softmax(warpers(torch.zeros((8, 1), dtype=torch.long), scores), dim=-1).numpy()
        np.testing.assert_allclose(process_logits(logits, params), expected, atol=1e-9)

"""Sampling math that the edge and the cloud must agree on, bit for bit (numpy only).

Both sides turn raw logits into a distribution with :func:`process_logits` and the cloud
judges drafts with :func:`verify_greedy` or :func:`verify_sampling`. The acceptance rule is
the speculative sampling of Leviathan et al. (arXiv:2211.17192) and Chen et al.
(arXiv:2302.01318): accept draft token x with probability min(1, p(x)/q(x)); at the first
rejection emit a token from the normalised residual max(0, p - q); after a fully accepted
block emit a bonus token from p. The emitted tokens then follow p exactly, whatever q is,
provided q is the distribution the drafter really sampled from. The drafter therefore
samples from a *truncated* distribution (:func:`truncate`) and sends exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tandemspec.types import SamplingParams, SparseDist

# Probabilities below this are treated as zero when normalising a residual.
_RESIDUAL_EPS = 1e-12
# First guess at how many tokens a top-p nucleus holds (grown until it holds them all).
_FIRST_HEAD = 64


def seeded_rng(seed: int, position: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, position, stream): reproducible across runs and batching."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, position, stream])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64."""
    shifted = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Logits -> the distribution to sample from, after temperature, top-k and top-p.

    ``logits``: [..., vocab]. Greedy (temperature 0) returns a one-hot at the argmax.
    Ties in top-k/top-p are broken by token id (as a stable sort would), identically on both
    sides. Only the kept support is ever sorted (a partition finds it), never the vocabulary.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if params.is_greedy:
        one_hot = np.zeros_like(logits)
        np.put_along_axis(one_hot, np.argmax(logits, axis=-1)[..., None], 1.0, axis=-1)
        return one_hot
    # Same order as Hugging Face's warpers: temperature, then top-k, then top-p on the
    # renormalised top-k distribution.
    probs = softmax(logits / params.temperature)
    vocab = probs.shape[-1]
    if 0 < params.top_k < vocab:
        probs = keep_most_likely(probs, np.full((*probs.shape[:-1], 1), params.top_k))
        probs /= probs.sum(axis=-1, keepdims=True)
    if 0.0 < params.top_p < 1.0:
        counts, head = nucleus_size(probs, params.top_p, params.top_k)
        probs = keep_most_likely(probs, counts, head)
    return probs / probs.sum(axis=-1, keepdims=True)


def nucleus_size(probs: np.ndarray, top_p: float, top_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``probs`` ([..., vocab]): how many of the most likely tokens top-p keeps
    ([..., 1]), and the sorted head of values that holds them ([..., head], descending).

    The smallest prefix (most likely first) whose mass reaches ``top_p``: a token stays while
    the mass before it is below ``top_p``, so the first always stays. Only a growing head of
    the sorted values is computed, until it is known to hold the whole prefix.
    """
    vocab = probs.shape[-1]
    head = min(vocab, top_k if 0 < top_k < vocab else _FIRST_HEAD)
    while True:
        top = sorted_head(probs, head)  # [..., head], descending
        mass_before = np.cumsum(top, axis=-1) - top
        if head == vocab or bool(np.all(mass_before[..., -1] >= top_p)):
            return np.sum(mass_before < top_p, axis=-1, keepdims=True), top
        # A wide nucleus: past a sixteenth of the vocabulary one sort costs less than more tries.
        head = vocab if 16 * head > vocab else 8 * head


def sorted_head(probs: np.ndarray, num: int) -> np.ndarray:
    """The ``num`` largest values of each row of ``probs`` ([..., vocab]), descending: [..., num]."""
    if num >= probs.shape[-1]:
        return -np.sort(-probs, axis=-1)
    head = -np.partition(-probs, num - 1, axis=-1)[..., :num]
    return -np.sort(-head, axis=-1)


def keep_most_likely(probs: np.ndarray, counts: np.ndarray, head: np.ndarray | None = None) -> np.ndarray:
    """Zero all but the ``counts`` ([..., 1]) most likely tokens of each row; ties go to the lower id.

    The same tokens as the first ``counts`` of a stable descending sort, found without one:
    everything above the ``counts``-th largest value, then the lowest ids equal to it.
    ``head``: the rows' largest values, descending, at least ``max(counts)`` of them, if known.
    """
    if head is None:
        head = sorted_head(probs, int(np.max(counts)))
    threshold = np.take_along_axis(head, counts - 1, axis=-1)  # [..., 1]
    above = probs > threshold
    tied = probs == threshold
    tie_rank = np.cumsum(tied, axis=-1)  # 1 for the lowest tied id
    keep = above | (tied & (tie_rank <= counts - above.sum(axis=-1, keepdims=True)))
    return np.where(keep, probs, 0.0)


def truncate(probs: np.ndarray, max_support: int) -> SparseDist:
    """Keep the ``max_support`` most likely tokens of a 1-D distribution and renormalise.

    This is the drafter's *exact* sampling distribution q: the edge samples from it and
    sends it, so the cloud's residual max(0, p - q) is computed on the true q. Ids come most
    likely first, ties by id (a stable sort's order).
    """
    support = min(max_support, int(np.count_nonzero(probs)))
    if support == 0:
        return SparseDist(ids=(), probs=())
    ids = np.flatnonzero(keep_most_likely(probs[None], np.array([[support]]))[0])
    ids = ids[np.lexsort((ids, -probs[ids]))]  # most likely first, ties by id
    kept = probs[ids]
    return SparseDist(ids=tuple(int(i) for i in ids), probs=tuple(float(p) for p in kept / kept.sum()))


def sample(dist: SparseDist, rng: np.random.Generator) -> int:
    """Draw one token id from a sparse distribution."""
    probs = np.asarray(dist.probs, dtype=np.float64)
    return int(dist.ids[int(rng.choice(len(probs), p=probs / probs.sum()))])


def sample_dense(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a dense 1-D distribution."""
    probs = np.asarray(probs, dtype=np.float64)
    return int(rng.choice(probs.shape[-1], p=probs / probs.sum()))


@dataclass(frozen=True)
class Judgement:
    """Outcome of verifying one block of draft tokens."""

    num_accepted: int
    # The correction (at the first rejection) or bonus (after a full block); None when a
    # fully accepted block defers its bonus to a pipelined continuation frame.
    next_token: int | None
    # Per draft token: would standard verification accept it (the SPRINTER label)?
    labels: tuple[bool, ...]


def verify_greedy(
    target_argmax: Sequence[int] | np.ndarray, draft_ids: tuple[int, ...], defer_bonus: bool = False
) -> Judgement:
    """Greedy verification: accept the longest prefix that equals the target's argmax.

    ``target_argmax``: [k + 1] argmax of the target at each draft position and one past it.
    """
    k = len(draft_ids)
    labels = tuple(bool(target_argmax[i] == draft_ids[i]) for i in range(k))
    num_accepted = labels.index(False) if False in labels else k
    if num_accepted == k and defer_bonus:
        return Judgement(num_accepted, None, labels)
    return Judgement(num_accepted, int(target_argmax[num_accepted]), labels)


def verify_sampling(
    target_probs: np.ndarray,
    draft_ids: tuple[int, ...],
    draft_dists: tuple[SparseDist, ...],
    rng: np.random.Generator,
    defer_bonus: bool = False,
) -> Judgement:
    """Rejection-sampling verification (arXiv:2211.17192, Algorithm 1).

    ``target_probs``: [k + 1, vocab] processed target distributions p at each draft position
    and one past it. ``draft_dists``: the drafter's exact truncated q per draft token.
    Every draft token gets its own uniform draw, so labels exist past the first rejection
    and the number of draws per block is fixed (reproducible).
    """
    k = len(draft_ids)
    uniforms = rng.random(k)
    p_draft = [float(target_probs[i, token]) for i, token in enumerate(draft_ids)]
    labels = accept_drafts(p_draft, draft_ids, draft_dists, uniforms)
    num_accepted = labels.index(False) if False in labels else k
    if num_accepted == k:
        if defer_bonus:
            return Judgement(k, None, labels)
        return Judgement(k, sample_dense(target_probs[k], rng), labels)
    residual = residual_distribution(target_probs[num_accepted], draft_dists[num_accepted])
    return Judgement(num_accepted, sample_dense(residual, rng), labels)


def accept_drafts(
    p_draft: Sequence[float], draft_ids: tuple[int, ...], draft_dists: tuple[SparseDist, ...], uniforms: np.ndarray
) -> tuple[bool, ...]:
    """Per draft token: is ``uniform < min(1, p(x) / q(x))``? ``p_draft``: p of each draft token."""
    labels: list[bool] = []
    for token, dist, p_token, uniform in zip(draft_ids, draft_dists, p_draft, uniforms, strict=True):
        q_token = dist.prob_of(token)
        # q_token > 0 always holds for a token the drafter sampled from q.
        labels.append(q_token > 0 and uniform < min(1.0, p_token / q_token))
    return tuple(labels)


def residual_distribution(p: np.ndarray, q: SparseDist) -> np.ndarray:
    """The normalised residual max(0, p - q) over the full vocabulary: [vocab]."""
    residual = np.asarray(p, dtype=np.float64).copy()
    ids = np.asarray(q.ids, dtype=np.int64)
    residual[ids] -= np.asarray(q.probs, dtype=np.float64)
    residual = np.maximum(residual, 0.0)
    total = residual.sum()
    if total <= _RESIDUAL_EPS:
        # p == q up to rounding: rejection had probability ~0; fall back to p itself.
        return np.asarray(p, dtype=np.float64) / np.sum(p)
    return residual / total

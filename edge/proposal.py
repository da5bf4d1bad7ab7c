"""The drafter's proposal distribution q, computed fast (top candidates only).

Lossless verification needs q to be *exactly* the distribution the edge sampled from, not
any particular formula; the edge is therefore free to compute it cheaply. This gives the
same distribution as ``truncate(process_logits(logits, params), max_support)`` from
:mod:`tandemspec.sampling` (temperature, top-k, top-p on the renormalised top-k, then the
``max_support`` most likely tokens, renormalised), but partitions out the few
candidates instead of sorting the whole vocabulary: ~10x faster at an 8k vocabulary.
Ties are broken by token id, as there.
"""

from __future__ import annotations

import numpy as np

from tandemspec.sampling import softmax
from tandemspec.types import SamplingParams, SparseDist

_FIRST_CANDIDATES = 64


def draft_distribution(logits: np.ndarray, params: SamplingParams, max_support: int) -> SparseDist:
    """The truncated q for one position: ``logits`` [vocab] -> at most ``max_support`` ids."""
    ids, probs = _top_distribution(logits, params, max_support)
    return SparseDist(ids=tuple(int(i) for i in ids), probs=tuple(float(p) for p in probs))


def _top_distribution(logits: np.ndarray, params: SamplingParams, max_support: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [m], probs [m]) of ``truncate(process_logits(logits, params), max_support)``."""
    assert not params.is_greedy, "greedy drafting sends no distribution"
    scaled = np.asarray(logits, dtype=np.float64) / params.temperature  # [vocab]
    vocab = scaled.shape[0]
    top_k = params.top_k if 0 < params.top_k < vocab else vocab
    m = min(max_support, top_k)
    peak = scaled.max()
    if top_k < vocab:
        kept = np.argpartition(-scaled, top_k - 1)[:top_k]  # [top_k]
        normaliser = np.exp(scaled[kept] - peak).sum()  # top-p acts on the renormalised top-k
        candidates = kept[np.argpartition(-scaled[kept], m - 1)[:m]] if m < top_k else kept
    else:
        normaliser = np.exp(scaled - peak).sum()
        candidates = np.argpartition(-scaled, m - 1)[:m] if m < vocab else np.arange(vocab)
    candidates = np.sort(candidates)  # by id, so the stable sort below breaks ties by id
    order = candidates[np.argsort(-scaled[candidates], kind="stable")]  # most likely first
    probs = np.exp(scaled[order] - peak) / normaliser  # [m]
    if 0.0 < params.top_p < 1.0:
        keep = (np.cumsum(probs) - probs) < params.top_p  # the smallest prefix reaching top_p
        order, probs = order[keep], probs[keep]
    nonzero = probs > 0
    order, probs = order[nonzero], probs[nonzero]
    return order, probs / probs.sum()


def local_distribution(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """``process_logits``' distribution, untruncated, as (ids [n], probs [n]) for drafter-only decoding.

    Pure temperature sampling returns the dense softmax; with top-k or top-p the kept
    tokens are found among a growing number of top candidates (64, 512, ...), which
    usually stops long before the whole vocabulary is sorted.
    """
    vocab = logits.shape[0]
    if not 0 < params.top_k < vocab and not 0.0 < params.top_p < 1.0:
        return np.arange(vocab), softmax(np.asarray(logits, dtype=np.float64) / params.temperature)
    support = _FIRST_CANDIDATES
    while True:
        ids, probs = _top_distribution(logits, params, support)
        # Exact once the kept set ended inside the candidates (or could not be larger).
        if len(ids) < support or support >= min(params.top_k or vocab, vocab):
            return ids, probs
        support *= 8

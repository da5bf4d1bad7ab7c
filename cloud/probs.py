"""The target's distributions on the model's device: torch twins of :mod:`tandemspec.sampling`.

Verification needs little from the target's logits: the argmax of each row (greedy), p of
each draft token, one draw from the residual or the bonus row, and the top-k of a few rows
when asked. Computing those where the model runs moves a handful of numbers per row to
the host instead of the whole vocabulary. Each function is the same formula as its numpy
twin (``process_logits``, ``keep_most_likely``, ``nucleus_size``, ``truncate``,
``sample_dense``; tests check equality), in float64, with ties broken by token id, and
never sorts the vocabulary: only the head that top-k or top-p keeps.
"""

from __future__ import annotations

import numpy as np
import torch

from tandemspec.types import SamplingParams, SparseDist

_FIRST_HEAD = 64  # first guess at a top-p nucleus size (grown until it holds the nucleus)
_RESIDUAL_EPS = 1e-12  # as tandemspec.sampling: a residual below this falls back to p


def process_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, vocab] logits -> [n, vocab] float64 probabilities, as ``tandemspec.sampling.process_logits``."""
    logits = logits.double()
    if params.is_greedy:
        one_hot = torch.zeros_like(logits)
        return one_hot.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax(logits / params.temperature, dim=-1)  # [n, vocab]
    vocab = probs.shape[-1]
    if 0 < params.top_k < vocab:
        probs = keep_most_likely(probs, torch.full_like(probs[:, :1], params.top_k, dtype=torch.long))
        probs = probs / probs.sum(-1, keepdim=True)
    if 0.0 < params.top_p < 1.0:
        counts, head = nucleus_size(probs, params.top_p, params.top_k)
        probs = keep_most_likely(probs, counts, head)
    return probs / probs.sum(-1, keepdim=True)


def nucleus_size(probs: torch.Tensor, top_p: float, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many of the most likely tokens top-p keeps ([n, 1], see the numpy twin), and
    the sorted head of values that holds them ([n, head], for :func:`keep_most_likely`)."""
    vocab = probs.shape[-1]
    head = min(vocab, top_k if 0 < top_k < vocab else _FIRST_HEAD)
    while True:
        top = torch.topk(probs, head, dim=-1).values  # [n, head], descending
        mass_before = torch.cumsum(top, -1) - top
        # Host<->device sync: one bool per head size tried (usually one).
        if head == vocab or bool((mass_before[:, -1] >= top_p).all()):
            return (mass_before < top_p).sum(-1, keepdim=True), top
        # A wide nucleus: past a sixteenth of the vocabulary one sort costs less than more tries.
        head = vocab if 16 * head > vocab else 8 * head


def keep_most_likely(probs: torch.Tensor, counts: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
    """Zero all but the ``counts`` ([n, 1]) most likely tokens of each row; ties go to the lower id.

    ``head``: the rows' largest values, descending, at least ``counts.max()`` of them, if known.
    """
    if head is None:
        head = torch.topk(probs, int(counts.max()), dim=-1).values  # host sync: one int
    threshold = head.gather(-1, counts - 1)  # [n, 1]
    above = probs > threshold
    tied = probs == threshold
    tie_rank = torch.cumsum(tied, -1)  # 1 for the lowest tied id
    keep = above | (tied & (tie_rank <= counts - above.sum(-1, keepdim=True)))
    return torch.where(keep, probs, torch.zeros_like(probs))


def truncate(probs: torch.Tensor, max_support: int) -> SparseDist:
    """The ``max_support`` most likely tokens of a [vocab] distribution, renormalised (ties by id)."""
    support = min(max_support, int(torch.count_nonzero(probs)))  # host sync
    if support == 0:
        return SparseDist(ids=(), probs=())
    kept = keep_most_likely(probs[None], torch.full((1, 1), support, device=probs.device))[0]
    ids_t = torch.nonzero(kept).flatten()
    # Host<->device sync: ``support`` ids and probabilities.
    ids, values = ids_t.cpu().numpy(), kept[ids_t].cpu().numpy()
    order = np.lexsort((ids, -values))  # most likely first, ties by id
    ids, values = ids[order], values[order]
    return SparseDist(ids=tuple(int(i) for i in ids), probs=tuple(float(p) for p in values / values.sum()))


def sample(probs: torch.Tensor, rng: np.random.Generator) -> int:
    """One draw from a [vocab] distribution: the same inverse-CDF draw as ``rng.choice(vocab, p=probs)``.

    NumPy's ``Generator.choice`` takes one ``rng.random()`` and searches the normalised
    cumulative sum (side right, so a zero-probability token is never drawn); here the
    search runs on the device and only the index comes back.
    """
    cdf = torch.cumsum(probs.double(), 0)
    cdf = cdf / cdf[-1]
    uniform = torch.tensor([rng.random()], dtype=torch.float64, device=probs.device)
    return int(torch.searchsorted(cdf, uniform, right=True)[0])  # host sync: one int


def residual(p: torch.Tensor, q: SparseDist) -> torch.Tensor:
    """The normalised residual max(0, p - q): [vocab], as ``tandemspec.sampling.residual_distribution``."""
    out = p.double().clone()
    ids = torch.tensor(q.ids, dtype=torch.long, device=p.device)
    out[ids] -= torch.tensor(q.probs, dtype=torch.float64, device=p.device)
    out = out.clamp_(min=0.0)
    total = float(out.sum())  # host sync: one float
    if total <= _RESIDUAL_EPS:
        # p == q up to rounding: rejection had probability ~0; fall back to p itself.
        return p.double() / p.double().sum()
    return out / total

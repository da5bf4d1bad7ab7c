"""Sampling math that the edge and the cloud must agree on, bit for bit (numpy only).

Both sides turn raw logits into a distribution with :func:`process_logits` and the cloud
judges drafts with :func:`verify_greedy` or :func:`verify_sampling`. The acceptance rule is
the speculative sampling of Leviathan et al. (arXiv:2211.17192) and Chen et al.
(arXiv:2302.01318): accept draft token x with probability min(1, p(x)/q(x)); at the first
rejection emit a token from the normalised residual max(0, p - q); after a fully accepted
block emit a bonus token from p. The emitted tokens then follow p exactly, whatever q is,
provided q is the distribution the drafter really sampled from. The drafter therefore
samples from a *truncated* distribution (:func:`truncate`) and sends exactly that.

Draft trees (:class:`DraftTree`) generalise the block: both rules walk the tree from the
context (:func:`walk_tree`), trying each node's children in order; a chain is the tree with
one child per node, so chains and trees share one verification path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from tandemspec.types import SamplingParams, SparseDist

# Probabilities below this are treated as zero when normalising a residual.
_RESIDUAL_EPS = 1e-12
# First guess at how many tokens a top-p nucleus holds (grown until it holds them all).
_FIRST_HEAD = 64

Dist = TypeVar("Dist")  # a target distribution as :func:`walk_tree`'s caller holds it


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


def chain_parents(num_tokens: int) -> tuple[int, ...]:
    """The parents of a chain of ``num_tokens`` draft tokens: each token follows the previous one."""
    return tuple(range(-1, num_tokens - 1))


@dataclass(frozen=True)
class DraftTree:
    """Draft tokens as a tree (SpecInfer, arXiv:2305.09781; EAGLE-2, arXiv:2406.16858).

    ``parents[i]`` is the index of token ``i``'s parent among the draft tokens, -1 for a
    child of the context; every parent comes before its child. A chain is the tree whose
    parents are ``-1, 0, 1, ...``; an empty ``parents`` means that chain.

    *Rows* number the distributions that judge tokens: row 0 is the target's distribution
    after the context, row ``i + 1`` the one after draft token ``i``; token ``i`` is judged
    by row ``parents[i] + 1``, and a path that ends at token ``j`` gets its bonus from row
    ``j + 1``. The *tip* is the last token: a frame is *fully accepted* when the accepted
    path reaches it (for a chain: every token accepted), which is what a pipelined
    continuation frame assumes.
    """

    parents: tuple[int, ...]

    @staticmethod
    def of(parents: tuple[int, ...], num_tokens: int) -> DraftTree:
        """The tree of a frame: ``parents``, or the chain when they are empty."""
        return DraftTree(parents or chain_parents(num_tokens))

    def __post_init__(self) -> None:
        assert all(-1 <= parent < i for i, parent in enumerate(self.parents)), self.parents

    @property
    def num_tokens(self) -> int:
        return len(self.parents)

    @property
    def is_chain(self) -> bool:
        return self.parents == chain_parents(len(self.parents))

    def rows(self) -> list[int]:
        """The row that judges each token: [num_tokens]."""
        return [parent + 1 for parent in self.parents]

    def children(self) -> list[list[int]]:
        """Per row (0 = the context, ``i + 1`` = token ``i``): the tokens it judges, in order."""
        out: list[list[int]] = [[] for _ in range(len(self.parents) + 1)]
        for i, parent in enumerate(self.parents):
            out[parent + 1].append(i)
        return out

    def depths(self) -> list[int]:
        """Per token: 0 for a child of the context, its parent's depth + 1 otherwise."""
        depths: list[int] = []
        for parent in self.parents:
            depths.append(0 if parent < 0 else depths[parent] + 1)
        return depths

    def tip_path(self) -> list[int]:
        """The path from the context to the tip (for a chain: every token)."""
        path: list[int] = []
        node = len(self.parents) - 1
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def reaches_tip(self, path: tuple[int, ...]) -> bool:
        """Whether the accepted ``path`` ends at the tip (a tree with no tokens counts as reached)."""
        return not self.parents or (bool(path) and path[-1] == len(self.parents) - 1)


@dataclass(frozen=True)
class Judgement:
    """Outcome of verifying one block (chain or tree) of draft tokens."""

    # The accepted draft tokens' indices, root to leaf (for a chain: 0 .. num_accepted - 1).
    path: tuple[int, ...]
    # The correction (where the path stops) or bonus (after the tip); None when a fully
    # accepted block defers its bonus to a pipelined continuation frame.
    next_token: int | None
    # Per draft token: would standard verification accept it (the SPRINTER label)? For a
    # tree: judged by its parent's row alone, as if it were the only child.
    labels: tuple[bool, ...]

    @property
    def num_accepted(self) -> int:
        return len(self.path)


def verify_greedy(
    target_argmax: Sequence[int] | np.ndarray,
    draft_ids: tuple[int, ...],
    defer_bonus: bool = False,
    parents: tuple[int, ...] = (),
) -> Judgement:
    """Greedy verification: accept the longest path whose tokens equal the target's argmax.

    ``target_argmax``: [k + 1] argmax of each row (see :class:`DraftTree`; for a chain, at
    each draft position and one past it). ``parents``: the tree (empty = a chain). Among
    siblings the first that matches is followed.
    """
    tree = DraftTree.of(parents, len(draft_ids))
    labels = tuple(bool(target_argmax[row] == token) for row, token in zip(tree.rows(), draft_ids, strict=True))
    children = tree.children()
    path: list[int] = []
    node = -1
    while (match := next((c for c in children[node + 1] if labels[c]), None)) is not None:
        path.append(match)
        node = match
    if defer_bonus and tree.reaches_tip(tuple(path)):
        return Judgement(tuple(path), None, labels)
    return Judgement(tuple(path), int(target_argmax[node + 1]), labels)


def verify_sampling(
    target_probs: np.ndarray,
    draft_ids: tuple[int, ...],
    draft_dists: tuple[SparseDist, ...],
    rng: np.random.Generator,
    defer_bonus: bool = False,
    parents: tuple[int, ...] = (),
) -> Judgement:
    """Rejection-sampling verification (arXiv:2211.17192, Algorithm 1), over siblings for trees.

    ``target_probs``: [k + 1, vocab] processed target distributions p per row (see
    :class:`DraftTree`; for a chain, at each draft position and one past it). ``draft_dists``:
    the drafter's exact truncated q per draft token. Every draft token gets its own uniform
    draw, so labels exist past the first rejection and the number of draws per block is
    fixed (reproducible). The walk itself is :func:`walk_tree`.
    """
    tree = DraftTree.of(parents, len(draft_ids))
    uniforms = rng.random(len(draft_ids))
    p_draft = [float(target_probs[row, token]) for row, token in zip(tree.rows(), draft_ids, strict=True)]
    labels = accept_drafts(p_draft, draft_ids, draft_dists, uniforms)
    return walk_tree(
        tree,
        draft_ids,
        draft_dists,
        labels,
        uniforms,
        TreeOps(
            row=lambda row: target_probs[row],
            prob=lambda p, token: float(p[token]),
            residual=residual_distribution,
            sample=lambda p, row: sample_dense(p, rng),
        ),
        defer_bonus,
    )


@dataclass(frozen=True)
class TreeOps(Generic[Dist]):
    """What :func:`walk_tree` needs of the target's distributions, wherever they live (numpy, torch)."""

    row: Callable[[int], Dist]  # the processed p of a row
    prob: Callable[[Dist, int], float]  # p(token)
    residual: Callable[[Dist, SparseDist], Dist]  # norm(max(p - q, 0))
    # one draw from p (the verifier's seeded stream); ``row``: where the walk stopped (the
    # last accepted node + 1), which picks the stream of a merged frame's part
    sample: Callable[[Dist, int], int]


def walk_tree(
    tree: DraftTree,
    draft_ids: tuple[int, ...],
    draft_dists: tuple[SparseDist, ...],
    labels: tuple[bool, ...],
    uniforms: np.ndarray,
    ops: TreeOps[Dist],
    defer_bonus: bool,
) -> Judgement:
    """Recursive rejection sampling down a draft tree (SpecInfer arXiv:2305.09781, EAGLE arXiv:2401.15077).

    At each accepted node (the context first), its children are tried in order: child ``x``
    with q ``q_x`` is accepted when ``u_x < min(1, p(x) / q_x(x))``; else ``p <- norm(max(p - q_x, 0))``
    and the next sibling is tried against that residual. When every child is refused, the
    next token is drawn from the last residual; after a leaf, the bonus from the leaf's row.
    Lossless when each child was drawn from its q given the siblings before it (the edge sends
    that q: e.g. a point mass for a deterministic top-k child); for a chain this is exactly
    the one-draft rule. The first child's test is its label (p is not yet reduced there).
    """
    children = tree.children()
    path: list[int] = []
    node = -1
    p = ops.row(0)
    while True:
        accepted = None
        for order, child in enumerate(children[node + 1]):
            if order == 0:
                ok = labels[child]
            else:
                q_child = draft_dists[child].prob_of(draft_ids[child])
                ok = q_child > 0 and uniforms[child] < min(1.0, ops.prob(p, draft_ids[child]) / q_child)
            if ok:
                accepted = child
                break
            p = ops.residual(p, draft_dists[child])
        if accepted is None:
            break
        path.append(accepted)
        node = accepted
        p = ops.row(node + 1)
    if defer_bonus and tree.reaches_tip(tuple(path)):
        return Judgement(tuple(path), None, labels)
    return Judgement(tuple(path), ops.sample(p, node + 1), labels)


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

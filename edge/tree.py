"""Dynamic draft trees on the edge, after EAGLE-2 (arXiv:2406.16858).

A tree spends a frame's budget of verified tokens where the drafter is unsure: instead of
one chain it sends several likely continuations, and the verifier accepts the longest path
the target agrees with (docs/architecture.md "Draft trees").

Growing: the context's ``top_k`` most likely next tokens are the first nodes; a node's
*score* is its path's cumulative drafter log-probability. At each depth the ``top_k``
best-scoring nodes of the newest depth are expanded, all in one batched drafter call
(:meth:`~tandemspec.edge.drafter.OnnxDrafter.extend_branches`), each adding its own
``top_k`` children. A node whose score is already below the ``budget``-th best score is
not expanded: its children score lower still and could never be sent.

Reranking: the ``budget`` best-scoring nodes are sent (ties: shallower first), which is
closed under ancestors since a child never scores above its parent, in the order they were
made, so every parent comes before its children, except that the end of the likeliest path
goes last: it is the frame's *tip*, which a pipelined next frame assumes accepted. Each sent
node's place in that ranking comes with the tree (``ranks``): the ``b`` best are the tree a
budget of ``b`` grows (nodes outside it were never expanded for it, or scored below), which
lets ``auto_draft`` see what a smaller budget would have accepted in the same round.

Sampling: the children are the deterministic top-k, so each is sent with the q it was drawn
from given its context and earlier siblings, a point mass at itself; the verifier's
recursive rejection sampling over siblings then accepts a child with the target's own
probability of it (after the earlier siblings' removal), which is lossless.

The device log (greedy trees): after the context and after each node it expanded, a tree
knows the drafter's top token and its gate features (``greedy_steps``), which is all a greedy
chain would have drafted along the accepted path. The edge logs that chain, each token
labelled against the target's own token there, so tree rounds train the gate as chain rounds
do (siblings share one drafter distribution, so per-node features would not tell them apart).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from tandemspec.edge.drafter import OnnxDrafter
from tandemspec.edge.features import token_features
from tandemspec.edge.proposal import draft_distribution
from tandemspec.types import SamplingParams, SparseDist


@dataclass(frozen=True)
class TreeShape:
    """How big a draft tree grows: ``budget`` tokens sent, ``top_k`` children per expanded node
    (and nodes expanded per depth), at most ``max_depth`` tokens deep."""

    budget: int
    top_k: int = 2
    max_depth: int = 16

    def __post_init__(self) -> None:
        if self.budget < 1 or self.top_k < 1 or self.max_depth < 1:
            raise ValueError(f"a tree needs budget, top_k and max_depth >= 1, got {self}")


@dataclass(frozen=True)
class GreedyStep:
    """The token a greedy chain drafts next at some point of a tree, and its gate features."""

    token: int
    features: np.ndarray  # [feature_dim], edge.features.token_features


@dataclass(frozen=True)
class GrownTree:
    """A tree ready to send: ids, parents (-1 = after the context), q per token when sampling, and
    each token's place among the sent ones by score (0 = the likeliest).

    ``greedy_steps`` (when asked for): by sent node (-1 = the context), the drafter's top token
    after it and its features, for the context and every sent node the tree expanded."""

    ids: tuple[int, ...]
    parents: tuple[int, ...]
    dists: tuple[SparseDist, ...]
    ranks: tuple[int, ...] = ()
    greedy_steps: Mapping[int, GreedyStep] = field(default_factory=dict)


def grow_tree(
    drafter: OnnxDrafter,
    root_logits: np.ndarray,
    shape: TreeShape,
    sampling: SamplingParams,
    max_support: int,
    eos_ids: Collection[int],
    greedy_from: tuple[np.ndarray, int] | None = None,
) -> GrownTree:
    """Grow a tree after the drafter's cached sequence; ``root_logits`` [vocab]: its last token's logits.

    ``greedy_from``: (the drafter's hidden state [hidden] after the context, the gate's position
    feature of the tree's first token) to record ``greedy_steps``; None records none.
    """
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    depths: list[int] = []
    path_kv: dict[int, list[np.ndarray]] = {}  # expanded node -> per past input its path's [depth + 1, h, d]
    steps: dict[int, GreedyStep] = {}  # expanded node (-1: the context) -> the greedy chain's next token there

    def record_step(node: int, logits: np.ndarray, hidden: np.ndarray) -> None:
        if greedy_from is not None:
            position = greedy_from[1] + (depths[node] + 1 if node >= 0 else 0)
            features = token_features(logits[None], hidden[None], np.array([position]))[0]
            steps[node] = GreedyStep(int(np.argmax(logits)), features)

    def add_children(parent: int, logits: np.ndarray) -> list[int]:
        base = scores[parent] if parent >= 0 else 0.0
        depth = depths[parent] + 1 if parent >= 0 else 0
        made = []
        for token, log_prob in _top_children(logits, shape.top_k, sampling, max_support):
            tokens.append(token)
            parents.append(parent)
            scores.append(base + log_prob)
            depths.append(depth)
            made.append(len(tokens) - 1)
        return made

    frontier = add_children(-1, root_logits)
    if greedy_from is not None:
        record_step(-1, root_logits, greedy_from[0])
    for _ in range(shape.max_depth - 1):
        cutoff = sorted(scores, reverse=True)[shape.budget - 1] if len(scores) >= shape.budget else -np.inf
        ranked = sorted(frontier, key=lambda n: (-scores[n], n))
        chosen = [n for n in ranked if scores[n] > cutoff and tokens[n] not in eos_ids][: shape.top_k]
        if not chosen:
            break
        branch_past = None
        if parents[chosen[0]] >= 0:  # past: the chosen nodes' ancestors, [B, depth, h, d] per past input
            branch_past = [np.stack([path_kv[parents[n]][i] for n in chosen]) for i in range(len(drafter.past_names))]
        logits, hidden, presents = drafter.extend_branches([tokens[n] for n in chosen], branch_past)
        frontier = []
        for row, node in enumerate(chosen):
            record_step(node, logits[row], hidden[row])
            own = [present[row] for present in presents]  # per past input [1, h, d]
            parent = parents[node]
            if parent < 0:
                path_kv[node] = own
            else:
                path_kv[node] = [np.concatenate(pair) for pair in zip(path_kv[parent], own, strict=True)]
            frontier.extend(add_children(node, logits[row]))
    best = sorted(range(len(tokens)), key=lambda n: (-scores[n], depths[n], n))[: shape.budget]
    rank = {node: i for i, node in enumerate(best)}
    kept = _tip_last(sorted(best), parents, scores)
    index = {node: i for i, node in enumerate(kept)}
    ids = tuple(tokens[n] for n in kept)
    dists = () if sampling.is_greedy else tuple(SparseDist((token,), (1.0,)) for token in ids)
    return GrownTree(
        ids=ids,
        parents=tuple(index[parents[n]] if parents[n] >= 0 else -1 for n in kept),
        dists=dists,
        ranks=tuple(rank[n] for n in kept),
        greedy_steps={index[n] if n >= 0 else -1: step for n, step in steps.items() if n < 0 or n in index},
    )


def _tip_last(kept: list[int], parents: list[int], scores: list[float]) -> list[int]:
    """``kept`` (parents first) with the end of the likeliest path moved last, as the tree's tip.

    The likeliest path follows the best-scoring kept child from the context down to a kept
    leaf; a leaf can go last without breaking the parents-first order. A pipelined next
    frame continues from it.
    """
    kept_set = set(kept)
    node = -1
    while children := [n for n in kept if parents[n] == node]:
        node = max(children, key=lambda n: (scores[n], -n))
    return [n for n in kept if n != node] + [node] if node in kept_set else kept


def _top_children(
    logits: np.ndarray, top_k: int, sampling: SamplingParams, max_support: int
) -> list[tuple[int, float]]:
    """The ``top_k`` most likely next tokens and their drafter log-probabilities (most likely first).

    Greedy: under the drafter's softmax; sampling: under the distribution it samples from
    (temperature, top-k, top-p, truncated to ``max_support``), so tokens it would never draw never enter.
    """
    if sampling.is_greedy:
        logits = np.asarray(logits, dtype=np.float64)
        top = np.argpartition(-logits, top_k - 1)[:top_k] if top_k < logits.shape[0] else np.arange(logits.shape[0])
        top = top[np.lexsort((top, -logits[top]))]  # most likely first, ties by id
        log_norm = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        return [(int(t), float(logits[t] - log_norm)) for t in top]
    q = draft_distribution(logits, sampling, max_support)
    return [(token, float(np.log(prob))) for token, prob in zip(q.ids[:top_k], q.probs[:top_k], strict=True)]

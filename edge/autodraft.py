"""Choosing a frame's draft size from what the edge measures (``auto_draft``, docs/trees.md).

One model for chains and trees. A *round* of a draft size (a chain of ``k`` tokens, a tree
of budget ``B``) is a :class:`Round`: the draft tokens the target judges, the tokens it
commits ``E`` (the accepted ones and the correction or bonus), the seconds drafting it takes,
and the chance that it is accepted to its tip. It takes ``T = draft + c0 + c1 size + h R``
seconds: the target's pass ``c0 + c1 size`` (its compute as the verdicts report it, fitted to
the frame size), and the round trip ``R`` (verdict arrival minus send minus that compute,
from frames sent with nothing else in flight). ``h = 1`` synchronously; pipelined (depth 1)
a frame whose predecessor was accepted to its tip (probability ``p``) left during that
predecessor's round trip, and two frames share one round trip, so ``h = 1 / (1 + p)``: the
structural limit ``p / (1 + p)`` on the share hidden. With branches (chains pre-drafted on the
likeliest other outcomes of a verdict, docs/trees.md "Branches") a round not accepted to its
tip is followed by a frame already at the verifier with the measured hit rate ``b``, so
``p`` becomes ``p + (1 - p) b``. The size chosen minimises ``T / E``, the expected time per
generated token.

* Chains, from a per-token acceptance ``a`` (tokens accepted independently, until the first
  rejection): ``E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)``, drafting ``k d`` at
  ``d`` s per drafter call, ``p = a^k``; the length is the ``k`` in ``1 .. max_length``.
* Trees: ``E(B)``, the tree's depth (drafting it takes depth-many batched drafter calls at
  ``d`` each, not ``B`` of them) and ``p(B)`` (frames accepted to the tip, the path a
  pipelined successor assumes) are measured per budget; a greedy tree also shows, by its
  tokens' ranks, what each smaller budget on the ladder would have accepted in the same
  round, and ``E`` of a budget is that of the next smaller one plus the gain measured in
  such pairs (much less noisy than separate means of rarely drafted budgets). A budget not
  yet measured takes the chain model's values for a chain as deep as the tree is likely to
  be, ``ceil(B / top_k)`` (with ``top_k`` children per expanded node, about that many
  levels), scaled by how the nearest measured budget did against its own such chain (a tree
  commits more than its tip's chain where second choices are right); that guess also starts
  its means, as a prior worth one observation. The budget is one of :data:`TREE_LADDER` up
  to the largest allowed.

:class:`CostEstimator` keeps the estimates online, with exponential forgetting and priors,
so a decoder adapts to its link and verifier across generations. The verify cost's slope
``c1`` is a ridge fit over chain and tree frames alike: a least-squares line whose slope is
shrunk towards a flat pass by a prior worth a spread of ``_RIDGE`` squared tokens, since a
line fitted to a narrow spread of noisy timings on shared cores extrapolates wildly
(measured: a 10 ms-per-token slope and no fixed cost, which chose 1-2 token frames). One
round in ``_EXPLORE_EVERY`` takes a neighbour of the choice (alternately larger and smaller:
a chain two tokens away, a tree the next budget on the ladder; a greedy tree, whose smaller
budgets are seen inside it, the next larger one), which spreads the sizes for the slope and
keeps the sizes near the optimum measured; the rule is deterministic.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tandemspec.sampling import DraftTree

_DECAY = 0.97  # weight of the past per observation (a half-life of ~23 observations)
_EXPLORE_EVERY = 8  # one round in this many takes a neighbour of the choice
_RIDGE = 4.0  # the flat-pass prior on the verify slope, as a variance of frame sizes (tokens^2)
TREE_LADDER = (2, 4, 8, 12, 16, 24, 32)  # the tree budgets auto_draft chooses from (up to the largest allowed)


@dataclass(frozen=True)
class Round:
    """One round of a draft size, as expected: its tokens judged, tokens committed, drafting
    seconds, and the chance it is accepted to its tip."""

    size: int
    tokens: float
    draft_s: float
    tip_rate: float


@dataclass(frozen=True)
class Costs:
    """What a round costs, as measured: seconds, the per-token acceptance in [0, 1], and the
    measured tree rounds by budget (``tree_top_k``: children per expanded node, for the prior)."""

    rtt_s: float  # R: verdict arrival minus send minus the pass (a wait for a batch included)
    draft_s_per_token: float  # d: per drafter call (a chain token, a tree level)
    verify_s: float  # c0: the target's pass, fixed part
    verify_s_per_token: float  # c1: its growth per draft token
    acceptance: float
    trees: Mapping[int, Round] = field(default_factory=dict)
    tree_top_k: int = 2
    branch_hit_rate: float = 0.0  # b: chance a branch came true after a round not accepted to its tip
    link_rtt_s: float = 0.0  # the round trip of the link alone (R less the verifier's wait for a batch)

    def chain(self, k: int) -> Round:
        """A chain of ``k`` draft tokens under the per-token model."""
        a = min(self.acceptance, 1.0 - 1e-9)
        return Round(k, (1.0 - a ** (k + 1)) / (1.0 - a), k * self.draft_s_per_token, self.acceptance**k)

    def tree(self, budget: int) -> Round:
        """A tree of ``budget`` tokens: measured, else the chain as deep as it likely is (the prior)."""
        measured = self.trees.get(budget)
        return measured if measured is not None else self.tree_prior(budget)

    def tree_prior(self, budget: int) -> Round:
        """The chain model's guess for a tree of ``budget`` tokens: the chain of its likely depth
        ``ceil(budget / top_k)``, scaled by how the nearest measured budget on the ladder did
        against its own chain (with none measured, the chain itself)."""
        chain = self.chain(self._depth(budget))
        anchors = [b for b in self.trees if b in TREE_LADDER and b != budget]
        if not anchors:
            return Round(budget, chain.tokens, chain.draft_s, chain.tip_rate)
        near = min(anchors, key=lambda b: (abs(b - budget), b))
        seen, base = self.trees[near], self.chain(self._depth(near))
        return Round(
            budget,
            seen.tokens * chain.tokens / base.tokens,
            seen.draft_s * chain.draft_s / base.draft_s if base.draft_s > 0 else chain.draft_s,
            min(seen.tip_rate * chain.tip_rate / base.tip_rate, 1.0) if base.tip_rate > 0 else chain.tip_rate,
        )

    def _depth(self, budget: int) -> int:
        return -(-budget // max(self.tree_top_k, 1))

    def round_seconds(self, round_: Round, pipelined: bool) -> float:
        """``T``: the expected seconds of a round."""
        ahead = round_.tip_rate + (1.0 - round_.tip_rate) * self.branch_hit_rate  # successor already there
        hidden = 1.0 / (1.0 + ahead) if pipelined else 1.0
        return round_.draft_s + self.verify_s + round_.size * self.verify_s_per_token + hidden * self.rtt_s

    def per_token(self, round_: Round, pipelined: bool) -> float:
        """``T / E``: the expected seconds per generated token."""
        return self.round_seconds(round_, pipelined) / max(round_.tokens, 1e-9)

    def tokens_per_round(self, k: int) -> float:
        """``E(k)``: expected tokens a round of ``k`` draft tokens commits."""
        return self.chain(k).tokens

    def seconds_per_round(self, k: int, pipelined: bool) -> float:
        """``T(k)``: expected seconds a round of ``k`` draft tokens takes."""
        return self.round_seconds(self.chain(k), pipelined)

    def seconds_per_token(self, k: int, pipelined: bool) -> float:
        return self.per_token(self.chain(k), pipelined)


def _best(costs: Costs, rounds: Sequence[Round], pipelined: bool) -> int:
    """The index of the round with the least expected time per token (ties: the smaller)."""
    return min(range(len(rounds)), key=lambda i: (costs.per_token(rounds[i], pipelined), rounds[i].size))


def best_length(costs: Costs, max_length: int, pipelined: bool) -> int:
    """The draft length in ``1 .. max_length`` with the least expected time per token (ties: the shorter)."""
    return _best(costs, [costs.chain(k) for k in range(1, max(1, max_length) + 1)], pipelined) + 1


def tree_budgets(max_budget: int) -> tuple[int, ...]:
    """The budgets to choose from: :data:`TREE_LADDER` up to ``max_budget``, and ``max_budget`` itself."""
    return (*(b for b in TREE_LADDER if b < max_budget), max(max_budget, 1))


def best_budget(costs: Costs, max_budget: int, pipelined: bool) -> int:
    """The tree budget among :func:`tree_budgets` with the least expected time per token (ties: the smaller)."""
    budgets = tree_budgets(max_budget)
    return budgets[_best(costs, [costs.tree(b) for b in budgets], pipelined)]


class _Mean:
    """A mean with exponential forgetting and a prior worth ``weight`` observations."""

    def __init__(self, prior: float, weight: float) -> None:
        self.total = prior * weight
        self.weight = weight

    def add(self, value: float, count: float = 1.0) -> None:
        self.total = self.total * _DECAY + value
        self.weight = self.weight * _DECAY + count

    @property
    def value(self) -> float:
        return self.total / self.weight


class _TreeMeans:
    """The measured rounds of one tree budget (also seen inside larger greedy trees), from the prior."""

    def __init__(self, tokens: float, tip_rate: float, levels: float) -> None:
        self.tokens = _Mean(tokens, 1.0)
        self.tip = _Mean(tip_rate, 1.0)
        self.levels = _Mean(levels, 1.0)  # the tree's depth: batched drafter calls
        # tokens over the next smaller budget on the ladder, paired within the same rounds (greedy trees)
        self.gain: _Mean | None = None


class CostEstimator:
    """Online estimates of :class:`Costs` from a decoder's rounds (thread-safe; shared across generations).

    Priors (each worth a few observations, soon outweighed): no round trip, 2 ms per drafter
    call, a 20 ms pass that does not grow with the frame, acceptance 0.7; a tree budget's
    means start from :meth:`Costs.tree_prior` when it is first observed.
    """

    def __init__(self, tree_top_k: int = 2) -> None:
        self._lock = threading.Lock()
        self._tree_top_k = tree_top_k
        self._rtt = _Mean(0.0, 1.0)
        self._link_rtt = _Mean(0.0, 1.0)  # the round trip without the verifier's batch wait
        self._draft = _Mean(0.002, 1.0)
        self._accepted = _Mean(0.7, 4.0)  # accepted tokens per judged-until-rejection token
        self._branch_hits = _Mean(0.0, 1.0)  # per verdict whose branches were settled: one came true
        self._trees: dict[int, _TreeMeans] = {}
        # verify compute against frame size: weighted sums for a least-squares line
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self._y_prior = 0.02
        self._rounds = 0

    def observe_rtt(self, seconds: float, link_seconds: float | None = None) -> None:
        """A clean round: ``seconds`` from send to verdict less the pass; ``link_seconds`` less
        also any wait for a batch at the verifier (``Verdict.server_ms``; None: not reported)."""
        with self._lock:
            self._rtt.add(max(seconds, 0.0))
            self._link_rtt.add(max(seconds if link_seconds is None else link_seconds, 0.0))

    def observe_branches(self, hit: bool) -> None:
        """A verdict not accepted to a live continuation settled the branches sent for it: one came true or none."""
        with self._lock:
            self._branch_hits.add(float(hit))

    def observe_draft(self, seconds: float, num_tokens: int) -> None:
        """A chain drafted: ``num_tokens`` drafter calls in ``seconds``."""
        if num_tokens > 0:
            with self._lock:
                self._draft.add(seconds, num_tokens)

    def observe_tree_draft(self, parents: tuple[int, ...], seconds: float) -> None:
        """A tree drafted in ``seconds``: about one (batched) drafter call per level."""
        if parents:
            with self._lock:
                self._draft.add(seconds, max(DraftTree(parents).depths()) + 1)

    def observe_round(self, num_draft: int, num_accepted: int, fully_accepted: bool, compute_s: float) -> None:
        """One judged chain frame: ``num_accepted`` of ``num_draft`` accepted; its pass took ``compute_s``."""
        with self._lock:
            self._observe_acceptance(num_accepted, fully_accepted)
            self._observe_pass(num_draft, compute_s)

    def observe_tree_round(
        self,
        parents: tuple[int, ...],
        path: Sequence[int],
        num_new: int,
        known_root: int | None = None,
        compute_s: float | None = None,
        ranks: Sequence[int] = (),
    ) -> None:
        """One judged tree frame: ``path`` accepted (root to leaf), ``num_new`` tokens committed.

        ``known_root``: the root an earlier verdict's bonus committed (a kept continuation: the
        verifier judged only that root's subtree); ``compute_s``: its pass (None: it shared one).
        The tip path feeds the per-token acceptance as a chain would. ``ranks`` (greedy trees:
        each token's place by score, :attr:`~tandemspec.edge.tree.GrownTree.ranks`): the smaller
        budgets on the ladder are observed too, as the tree of their ``b`` best tokens, which
        would have accepted the part of ``path`` inside it (the matching child of a node is
        the target's argmax, whichever tree holds it).
        """
        tree = DraftTree(parents)
        tip = tree.tip_path()
        reached = tree.reaches_tip(tuple(path))
        on_tip = next((i for i, (a, b) in enumerate(zip(path, tip, strict=False)) if a != b), min(len(path), len(tip)))
        known = int(known_root is not None)
        rounds = [(len(parents), num_new, reached, max(tree.depths()) + 1)]
        rounds += [_nested_round(tree, ranks, b, path, num_new, known) for b in TREE_LADDER if b < len(ranks)]
        with self._lock:
            below: tuple[int, int] | None = None  # the last (smaller) budget of this round and its tokens
            for budget, tokens, tip_reached, levels in [*rounds[1:], rounds[0]]:  # ascending
                means = self._tree(budget)
                means.tokens.add(tokens)
                means.tip.add(float(tip_reached))
                means.levels.add(levels)
                if below is not None:
                    if means.gain is None:
                        now = self._costs().trees
                        means.gain = _Mean(max(now[budget].tokens - now[below[0]].tokens, 0.0), 1.0)
                    means.gain.add(tokens - below[1])
                below = (budget, tokens)
            self._observe_acceptance(max(on_tip - known, 0), reached)
            if compute_s is not None:
                size = len(parents) if known_root is None else _subtree_size(parents, known_root)
                self._observe_pass(size, compute_s)

    def _tree(self, budget: int) -> _TreeMeans:
        if budget not in self._trees:
            prior = self._costs().tree_prior(budget)
            levels = prior.draft_s / self._draft.value if self._draft.value > 0 else 1.0
            self._trees[budget] = _TreeMeans(prior.tokens, prior.tip_rate, levels)
        return self._trees[budget]

    def _observe_acceptance(self, num_accepted: int, fully_accepted: bool) -> None:
        # Bernoulli trials up to the first rejection: the accepted tokens, and the rejected one if any.
        self._accepted.add(num_accepted, num_accepted + (0 if fully_accepted else 1))

    def _observe_pass(self, size: int, compute_s: float) -> None:
        d = _DECAY
        self._n, self._x, self._y = self._n * d + 1, self._x * d + size, self._y * d + compute_s
        self._xx, self._xy = self._xx * d + size**2, self._xy * d + size * compute_s

    def costs(self) -> Costs:
        with self._lock:
            return self._costs()

    def _costs(self) -> Costs:
        slope, intercept = 0.0, self._y_prior
        if self._n > 0:
            mean_x, mean_y = self._x / self._n, self._y / self._n
            var = self._xx / self._n - mean_x**2
            slope = max(0.0, (self._xy / self._n - mean_x * mean_y) / (max(var, 0.0) + _RIDGE))
            intercept = max(0.0, mean_y - slope * mean_x)
        # E(B): the next smaller ladder budget's plus the paired gain where measured (greedy trees), a
        # less noisy estimate for budgets drafted rarely; else the budget's own mean
        tokens: dict[int, float] = {}
        for b in sorted(self._trees):
            means, below = self._trees[b], [p for p in tokens if p in TREE_LADDER and p < b]
            tokens[b] = (
                tokens[max(below)] + means.gain.value if means.gain is not None and below else means.tokens.value
            )
        d = self._draft.value
        return Costs(
            rtt_s=self._rtt.value,
            link_rtt_s=self._link_rtt.value,
            draft_s_per_token=d,
            verify_s=intercept,
            verify_s_per_token=slope,
            acceptance=min(max(self._accepted.value, 0.0), 1.0),
            trees={
                b: Round(b, tokens[b], d * m.levels.value, min(max(m.tip.value, 0.0), 1.0))
                for b, m in self._trees.items()
            },
            tree_top_k=self._tree_top_k,
            branch_hit_rate=min(max(self._branch_hits.value, 0.0), 1.0),
        )

    def choose(self, max_length: int, pipelined: bool) -> int:
        """The next chain frame's draft length: :func:`best_length`, 2 away one round in ``_EXPLORE_EVERY``."""
        lengths = range(1, max(1, max_length) + 1)
        return lengths[self._explore(len(lengths), best_length(self.costs(), max_length, pipelined) - 1, 2)]

    def choose_budget(self, max_budget: int, pipelined: bool, nested: bool = False) -> int:
        """The next tree frame's budget: :func:`best_budget`, the next rung one round in ``_EXPLORE_EVERY``
        (``nested``: greedy trees, whose smaller budgets are seen inside them: always the rung above)."""
        budgets = tree_budgets(max_budget)
        best = budgets.index(best_budget(self.costs(), max_budget, pipelined))
        return budgets[self._explore(len(budgets), best, 1, nested)]

    def _explore(self, num: int, best: int, step: int, up_only: bool = False) -> int:
        """``best``, or one round in ``_EXPLORE_EVERY`` the index ``step`` away, alternately up and down
        (or up while it can)."""
        with self._lock:
            self._rounds += 1
            explore = self._rounds % _EXPLORE_EVERY == 0 and num > 1
            up = up_only or (self._rounds // _EXPLORE_EVERY) % 2 == 1
        if not explore:
            return best
        return min(best + step, num - 1) if (up and best < num - 1) or best == 0 else max(best - step, 0)


def _nested_round(
    tree: DraftTree, ranks: Sequence[int], budget: int, path: Sequence[int], num_new: int, known: int
) -> tuple[int, int, bool, int]:
    """(budget, tokens committed, tip reached, levels) of the tree of the ``budget`` best-ranked tokens,
    judged greedily by the same target rows as the whole tree (whose accepted ``path`` committed ``num_new``)."""
    inside = [rank < budget for rank in ranks]
    accepted = list(itertools.takewhile(lambda node: inside[node], path))
    children = tree.children()
    tip: list[int] = []
    while kids := [c for c in children[(tip[-1] if tip else -1) + 1] if inside[c]]:
        tip.append(min(kids, key=lambda c: ranks[c]))  # the likeliest child: the smaller tree's tip path
    # a path cut short ends at a correction (or at the bonus after the smaller tree's tip)
    tokens = num_new if len(accepted) == len(path) else max(len(accepted) - known, 0) + 1
    levels = max(depth for depth, keep in zip(tree.depths(), inside, strict=True) if keep) + 1
    return budget, tokens, accepted == tip, levels


def _subtree_size(parents: tuple[int, ...], root: int) -> int:
    """The tokens below ``root`` (its descendants, not itself)."""
    inside = [False] * len(parents)
    for i, parent in enumerate(parents):
        inside[i] = i == root or (parent >= 0 and inside[parent])
    return sum(inside) - 1

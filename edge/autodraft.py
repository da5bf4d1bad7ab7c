"""Choosing a chain's draft length from what the edge measures (``auto_draft``, docs/trees.md).

The model, per round of lossless chain decoding with ``k`` draft tokens:

* tokens per round: with a per-token acceptance ``a`` (tokens accepted independently, until
  the first rejection), a round commits ``E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)``
  tokens (the accepted ones and the correction or bonus);
* time per round: ``T(k) = k d + c0 + c1 k + h(k) R``: drafting at ``d`` s per token, the
  target's pass ``c0 + c1 k`` (its compute as the verdicts report it, fitted to the frame
  size), and the round trip ``R`` (verdict arrival minus send minus that compute, from frames
  sent with nothing else in flight). ``h(k) = 1`` synchronously; pipelined (depth 1) a frame
  whose predecessor was fully accepted (probability ``a^k``) left during that predecessor's
  round trip, and two frames share one round trip, so ``h(k) = 1 / (1 + a^k)``: the
  structural limit ``p / (1 + p)`` on the share hidden;
* the length: the ``k`` in ``1 .. max_length`` that minimises ``T(k) / E(k)``, the expected
  time per generated token.

:class:`CostEstimator` keeps the estimates online, with exponential forgetting and priors,
so a decoder adapts to its link and verifier across generations. The verify cost's slope
``c1`` is a ridge fit: a least-squares line whose slope is shrunk towards a flat pass by a
prior worth a spread of ``_RIDGE`` squared tokens, since a line fitted to a narrow spread
of noisy timings on shared cores extrapolates wildly (measured: a 10 ms-per-token slope
and no fixed cost, which chose 1-2 token frames); one round in ``_EXPLORE_EVERY`` drafts
two tokens more or less than the choice, to spread the sizes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

_DECAY = 0.97  # weight of the past per observation (a half-life of ~23 observations)
_EXPLORE_EVERY = 8  # one round in this many tries a length 2 away (spreads the sizes for the verify slope)
_RIDGE = 4.0  # the flat-pass prior on the verify slope, as a variance of frame sizes (tokens^2)


@dataclass(frozen=True)
class Costs:
    """What a round costs, as measured: seconds, and the per-token acceptance in [0, 1]."""

    rtt_s: float
    draft_s_per_token: float
    verify_s: float  # c0: the target's pass, fixed part
    verify_s_per_token: float  # c1: its growth per draft token
    acceptance: float

    def tokens_per_round(self, k: int) -> float:
        """``E(k)``: expected tokens a round of ``k`` draft tokens commits."""
        a = min(self.acceptance, 1.0 - 1e-9)
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def seconds_per_round(self, k: int, pipelined: bool) -> float:
        """``T(k)``: expected seconds a round of ``k`` draft tokens takes."""
        hidden = 1.0 / (1.0 + self.acceptance**k) if pipelined else 1.0
        return k * self.draft_s_per_token + self.verify_s + k * self.verify_s_per_token + hidden * self.rtt_s

    def seconds_per_token(self, k: int, pipelined: bool) -> float:
        return self.seconds_per_round(k, pipelined) / self.tokens_per_round(k)


def best_length(costs: Costs, max_length: int, pipelined: bool) -> int:
    """The draft length in ``1 .. max_length`` with the least expected time per token (ties: the shorter)."""
    return min(range(1, max(1, max_length) + 1), key=lambda k: (costs.seconds_per_token(k, pipelined), k))


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


class CostEstimator:
    """Online estimates of :class:`Costs` from a decoder's rounds (thread-safe; shared across generations).

    Priors (each worth a few observations, soon outweighed): no round trip, 2 ms per drafted
    token, a 20 ms pass that does not grow with the frame, acceptance 0.7.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rtt = _Mean(0.0, 1.0)
        self._draft = _Mean(0.002, 1.0)
        self._accepted = _Mean(0.7, 4.0)  # accepted tokens per judged-until-rejection token
        # verify compute against frame size: weighted sums for a least-squares line
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self._y_prior = 0.02
        self._rounds = 0

    def observe_rtt(self, seconds: float) -> None:
        with self._lock:
            self._rtt.add(max(seconds, 0.0))

    def observe_draft(self, seconds: float, num_tokens: int) -> None:
        if num_tokens > 0:
            with self._lock:
                self._draft.add(seconds, num_tokens)

    def observe_round(self, num_draft: int, num_accepted: int, fully_accepted: bool, compute_s: float) -> None:
        """One judged chain frame: ``num_accepted`` of ``num_draft`` accepted; its pass took ``compute_s``."""
        with self._lock:
            # Bernoulli trials up to the first rejection: the accepted tokens, and the rejected one if any.
            self._accepted.add(num_accepted, num_accepted + (0 if fully_accepted else 1))
            d = _DECAY
            self._n, self._x, self._y = self._n * d + 1, self._x * d + num_draft, self._y * d + compute_s
            self._xx, self._xy = self._xx * d + num_draft**2, self._xy * d + num_draft * compute_s

    def costs(self) -> Costs:
        with self._lock:
            slope, intercept = 0.0, self._y_prior
            if self._n > 0:
                mean_x, mean_y = self._x / self._n, self._y / self._n
                var = self._xx / self._n - mean_x**2
                slope = max(0.0, (self._xy / self._n - mean_x * mean_y) / (max(var, 0.0) + _RIDGE))
                intercept = max(0.0, mean_y - slope * mean_x)
            return Costs(
                rtt_s=self._rtt.value,
                draft_s_per_token=self._draft.value,
                verify_s=intercept,
                verify_s_per_token=slope,
                acceptance=min(max(self._accepted.value, 0.0), 1.0),
            )

    def choose(self, max_length: int, pipelined: bool) -> int:
        """The next frame's draft length: :func:`best_length`, a neighbour one round in ``_EXPLORE_EVERY``."""
        k = best_length(self.costs(), max_length, pipelined)
        with self._lock:
            self._rounds += 1
            explore = self._rounds % _EXPLORE_EVERY == 0 and max_length > 1
            up = (self._rounds // _EXPLORE_EVERY) % 2 == 1
        if explore:  # alternately longer and shorter by 2, within 1 .. max_length
            k = min(k + 2, max_length) if (up and k < max_length) or k == 1 else max(k - 2, 1)
        return k

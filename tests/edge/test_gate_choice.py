"""Operating points of gated mode: held-out curves, quality floor and λ to threshold, baselines' scales."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from tandemspec.edge.bundle import load_bundle
from tandemspec.edge.features import token_features
from tandemspec.edge.gate import (
    GATE_JSON_NAME,
    GateChoice,
    TrustGate,
    curve_from_json,
    curve_to_json,
    operating_curve,
    threshold_for_lambda,
    threshold_for_quality,
)
from tandemspec.edge.runtime import EdgeConfig


def _scores_and_labels(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    labels = rng.random(n) < scores  # higher score, likelier accepted
    return scores, labels


def test_curve_spans_trust_nothing_to_trust_all() -> None:
    scores, labels = _scores_and_labels()
    curve = operating_curve("learned", scores, labels)
    nothing = max(curve, key=lambda p: p.threshold)
    everything = min(curve, key=lambda p: p.threshold)
    assert nothing.trust_rate == 0.0 and nothing.rejections_caught == 1.0 and nothing.missed_rejections == 0.0
    assert everything.trust_rate == 1.0 and everything.rejections_caught == 0.0
    assert everything.missed_rejections == pytest.approx(float((~labels).mean()))
    ordered = sorted(curve, key=lambda p: p.threshold)
    assert all(a.trust_rate >= b.trust_rate for a, b in itertools.pairwise(ordered))
    assert curve_from_json(json.loads(json.dumps(curve_to_json(curve))))[:-1] == curve[:-1]


def test_quality_floor_picks_the_most_trusting_point_that_meets_it() -> None:
    scores, labels = _scores_and_labels()
    curve = operating_curve("learned", scores, labels)
    previous_trust = 1.1
    for floor in (0.3, 0.5, 0.7, 0.9, 0.99):
        point = threshold_for_quality(curve, floor)
        assert point.rejections_caught >= floor
        assert all(p.trust_rate <= point.trust_rate for p in curve if p.rejections_caught >= floor)
        assert point.trust_rate <= previous_trust  # a higher floor never trusts more
        previous_trust = point.trust_rate
    assert threshold_for_quality(curve, 1.0).missed_rejections == 0.0
    with pytest.raises(ValueError):
        threshold_for_quality(curve, 1.5)


def test_lambda_trades_missed_rejections_for_checks() -> None:
    scores, labels = _scores_and_labels()
    curve = operating_curve("learned", scores, labels)
    free = threshold_for_lambda(curve, 0.0)  # checks are free: trust only what is never rejected
    assert free.missed_rejections == 0.0 and free.trust_rate < 0.5
    assert threshold_for_lambda(curve, 10.0).trust_rate == 1.0  # checks are dear: trust everything
    trust = [threshold_for_lambda(curve, w).trust_rate for w in (0.05, 0.2, 0.5, 0.8)]
    assert trust == sorted(trust) and 0.0 < trust[1] < 1.0


def test_entropy_threshold_is_in_nats_and_trusts_low_entropy() -> None:
    peaked = np.array([8.0, 0.0, 0.0, 0.0])  # entropy ~0.01 nats, top-1 ~0.998
    flat = np.zeros(4)  # entropy ln 4 ~1.386 nats, top-1 0.25
    hidden = np.zeros(3)
    gate = TrustGate("entropy", threshold=1.0)
    assert gate.trusts(token_features(peaked[None], hidden[None], np.array([0])))
    assert not gate.trusts(token_features(flat[None], hidden[None], np.array([0])))
    top1 = TrustGate("top1", threshold=0.5)
    assert top1.trusts(token_features(peaked[None], hidden[None], np.array([0])))
    assert not top1.trusts(token_features(flat[None], hidden[None], np.array([0])))
    # The features are raw (as logged and trained on): the learned gate clamps positions itself.
    assert TrustGate("top1", 0.5).features(peaked, hidden, 30)[0, 3] == 30


def test_choices_are_exclusive_and_need_a_curve() -> None:
    with pytest.raises(ValueError, match="at most one"):
        GateChoice("entropy", quality=0.9, threshold=1.0)
    with pytest.raises(ValueError, match="unknown gate kind"):
        GateChoice("margin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="operating curve"):
        GateChoice("entropy", quality=0.9).resolve(None)
    assert GateChoice("entropy", threshold=1.25).resolve(None) == 1.25
    with pytest.raises(ValueError, match="at most one"):
        EdgeConfig(mode="gated", gate_quality=0.9, gate_lambda=0.5)


def test_bundled_gate_maps_floors_to_thresholds() -> None:
    """The reference bundle's gate.json carries the three curves; floors resolve for every kind."""
    bundle = load_bundle(Path(__file__).resolve().parents[2] / "models" / "reference" / "edge")
    assert bundle.gate_path is not None and GATE_JSON_NAME in bundle.manifest.files
    for kind in ("learned", "entropy", "top1"):
        loose = TrustGate.from_choice(GateChoice(kind, quality=0.5), bundle.gate_path)  # type: ignore[arg-type]
        strict = TrustGate.from_choice(GateChoice(kind, quality=0.95), bundle.gate_path)  # type: ignore[arg-type]
        if kind == "entropy":
            assert strict.threshold <= loose.threshold  # trust only lower entropy
        else:
            assert strict.threshold >= loose.threshold

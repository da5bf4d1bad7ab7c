"""The uncertainty gate on the edge: ONNX Runtime inference, numpy features in, p(accept) out.

The graph (built by :mod:`tandemspec.federated.gate`) takes ``features`` [batch, dim]
float32 - the vectors of :func:`tandemspec.edge.features.token_features` - and returns
``p_accept`` [batch], the estimated probability that the target accepts each drafted
token. No torch here: the edge runs the gate on ONNX Runtime only.

Two uses:

* :class:`SurvivalDraftLength` - ``lossless`` mode's dynamic draft length;
* :class:`TrustGate` - ``gated`` mode's decision per token: trust (emit at once, send as
  committed) or doubt (have the cloud verify). Three scores share that code path: the
  learned gate, and the two baselines - the drafter's entropy (U-HLM / FedHLM) and its
  top-1 probability (Hugging Face's ``assistant_confidence_threshold``).

Operating points. ``gate.json`` (written by ``tandem gate train``) carries, per score, the
curve measured on held-out logs: for each threshold, the share of tokens trusted and the
share of would-be-rejected tokens the gate doubts (*rejections caught*, the token-level
stand-in for quality: 1 when nothing is trusted, 0 when everything is). A user picks a
point as a quality floor (the most trusting threshold that still catches that share), as a
cost weight λ (minimise missed rejections + λ x cloud checks, per token; FedHLM's
objective) or as a raw threshold on the score's own scale.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import onnxruntime as ort

from tandemspec.edge.features import SCALAR_FEATURES, token_features

logger = logging.getLogger(__name__)

INPUT_NAME = "features"
OUTPUT_NAME = "p_accept"


class OnnxGate:
    """A gate graph on the CPU provider; :meth:`predict` maps features to accept probabilities.

    The ``position`` feature (tokens since the last check, :mod:`tandemspec.edge.features`)
    is clamped to ``max_position``, the largest the gate was trained on (``gate.json``
    beside the graph says it): callers pass, log and train on the raw features, and the
    clamp belongs to the model, like a normalisation.
    """

    def __init__(self, path: Path, intra_op_threads: int = 1, max_position: int | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self._session.get_inputs()
        outputs = {o.name for o in self._session.get_outputs()}
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ValueError(f"{path}: a gate graph takes '{INPUT_NAME}' and returns '{OUTPUT_NAME}'")
        dim = inputs[0].shape[1]
        self.feature_dim = dim if isinstance(dim, int) else None
        if max_position is None:
            info_path = path.with_name(GATE_JSON_NAME)
            max_position = GateInfo.read(info_path if info_path.is_file() else None).max_position
        self.max_position = max_position
        logger.debug("loaded gate %s (feature dim %s, max position %d)", path, self.feature_dim, max_position)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Accept probability per row: features [n, dim] -> [n] float32."""
        x = np.array(features, dtype=np.float32)  # a copy: the position column is clamped in place
        if x.ndim != 2 or (self.feature_dim is not None and x.shape[1] != self.feature_dim):
            raise ValueError(f"gate expects features [n, {self.feature_dim}], got {x.shape}")
        np.minimum(x[:, _POSITION], self.max_position, out=x[:, _POSITION])
        (p_accept,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return np.asarray(p_accept, np.float32).reshape(len(x))


class SurvivalDraftLength:
    """Dynamic draft length from the gate (EAGLE-2, arXiv:2406.16858: calibrated confidence predicts acceptance).

    The gate estimates, per drafted token, the chance the target accepts it; the block is
    cut when the estimated chance that every token so far survives falls below
    ``min_survival``, or at ``max_length``. A :class:`~tandemspec.edge.decoder.DraftPolicy`.
    """

    uses_features = True

    def __init__(self, gate: OnnxGate, min_survival: float, max_length: int) -> None:
        if not 0.0 <= min_survival <= 1.0:
            raise ValueError(f"min_survival must be in [0, 1], got {min_survival}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.gate = gate
        self.min_survival = min_survival
        self.max_length = max_length
        self._survival = 1.0

    def keep_drafting(self, index: int, features: np.ndarray | None) -> bool:
        """``index`` tokens drafted in this block; ``features`` [1, feature_dim] of the last of them."""
        if features is None:
            raise ValueError("SurvivalDraftLength needs the drafted token's features")
        if index == 1:  # a new block
            self._survival = 1.0
        self._survival *= float(self.gate.predict(features)[0])
        return index < self.max_length and self._survival >= self.min_survival


GateKind = Literal["learned", "entropy", "top1"]
GATE_KINDS: tuple[GateKind, ...] = get_args(GateKind)
GATE_JSON_NAME = "gate.json"
DEFAULT_MAX_POSITION = 7  # the largest block position a gate.json without one is assumed to know
_ENTROPY = SCALAR_FEATURES.index("entropy")
_TOP1 = SCALAR_FEATURES.index("top1_prob")
_POSITION = SCALAR_FEATURES.index("position")


def trust_scores(kind: GateKind, features: np.ndarray, gate: OnnxGate | None = None) -> np.ndarray:
    """Per token, a score where higher means more trust: [n, dim] features -> [n].

    ``learned``: the gate's p(accept); ``top1``: the drafter's top-1 probability;
    ``entropy``: minus the drafter's entropy (nats).
    """
    if kind == "learned":
        if gate is None:
            raise ValueError("the learned gate needs gate.onnx")
        return gate.predict(features).astype(np.float64)
    if kind == "top1":
        return np.asarray(features[:, _TOP1], np.float64)
    if kind == "entropy":
        return -np.asarray(features[:, _ENTROPY], np.float64)
    raise ValueError(f"unknown gate kind {kind!r}; known: {', '.join(GATE_KINDS)}")


def score_threshold(kind: GateKind, threshold: float) -> float:
    """A threshold on the kind's own scale (entropy: trust when entropy <= it) as a score threshold."""
    return -threshold if kind == "entropy" else threshold


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold of a score, measured on held-out logs."""

    threshold: float  # on the score's own scale (p_accept, entropy in nats, top-1 probability)
    trust_rate: float  # share of tokens trusted
    rejections_caught: float  # share of would-be-rejected tokens doubted (1 - missed / rejected)
    missed_rejections: float  # share of all tokens trusted although the target rejects them


def operating_curve(
    kind: GateKind, scores: np.ndarray, labels: np.ndarray, num_points: int = 101
) -> list[OperatingPoint]:
    """The curve of ``kind`` from held-out trust ``scores`` (higher = trust) and accept ``labels``.

    Thresholds are the score's quantiles plus the two extremes (trust nothing, trust all).
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    rejected = max(int((~labels).sum()), 1)
    cuts = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, num_points)))
    cuts = np.concatenate([cuts, [np.inf]])  # inf: trust nothing; the smallest score: trust all
    points = []
    for cut in cuts:
        trusted = scores >= cut
        missed = int((trusted & ~labels).sum())
        points.append(
            OperatingPoint(
                threshold=float(score_threshold(kind, float(cut))),
                trust_rate=float(trusted.mean()),
                rejections_caught=1.0 - missed / rejected,
                missed_rejections=missed / len(labels),
            )
        )
    return points


def threshold_for_quality(curve: Sequence[OperatingPoint], quality: float) -> OperatingPoint:
    """The most trusting point that still catches at least ``quality`` of the rejections."""
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"the quality floor must be in [0, 1], got {quality}")
    meeting = [p for p in curve if p.rejections_caught >= quality - 1e-12]
    if not meeting:
        raise ValueError(f"no operating point catches {quality} of the rejections")
    return max(meeting, key=lambda p: (p.trust_rate, p.rejections_caught))


def threshold_for_lambda(curve: Sequence[OperatingPoint], weight: float) -> OperatingPoint:
    """The point minimising missed rejections + ``weight`` x checks (both per token)."""
    if weight < 0:
        raise ValueError(f"the cost weight must be >= 0, got {weight}")
    return min(curve, key=lambda p: (p.missed_rejections + weight * (1.0 - p.trust_rate), -p.trust_rate))


def curve_to_json(curve: Sequence[OperatingPoint]) -> list[dict[str, float]]:
    return [
        {
            "threshold": p.threshold if math.isfinite(p.threshold) else (1e30 if p.threshold > 0 else -1e30),
            "trust_rate": p.trust_rate,
            "rejections_caught": p.rejections_caught,
            "missed_rejections": p.missed_rejections,
        }
        for p in curve
    ]


def curve_from_json(rows: Sequence[Mapping[str, Any]]) -> list[OperatingPoint]:
    return [
        OperatingPoint(
            threshold=float(r["threshold"]),
            trust_rate=float(r["trust_rate"]),
            rejections_caught=float(r["rejections_caught"]),
            missed_rejections=float(r["missed_rejections"]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class GateChoice:
    """How the user picks the operating point: exactly one of the three, or none for the default floor."""

    kind: GateKind = "learned"
    quality: float | None = None
    weight: float | None = None  # λ
    threshold: float | None = None

    DEFAULT_QUALITY = 0.9

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"unknown gate kind {self.kind!r}; known: {', '.join(GATE_KINDS)}")
        given = [v for v in (self.quality, self.weight, self.threshold) if v is not None]
        if len(given) > 1:
            raise ValueError("give at most one of the gate quality floor, the cost weight λ and the raw threshold")

    def resolve(self, curve: Sequence[OperatingPoint] | None) -> float:
        """The threshold on the kind's own scale."""
        if self.threshold is not None:
            return self.threshold
        if not curve:
            raise ValueError(
                f"choosing the {self.kind} gate's threshold from a quality floor or λ needs its operating "
                f"curve ({GATE_JSON_NAME} from `tandem gate train`); or give a raw threshold"
            )
        if self.weight is not None:
            return threshold_for_lambda(curve, self.weight).threshold
        return threshold_for_quality(curve, self.DEFAULT_QUALITY if self.quality is None else self.quality).threshold


@dataclass(frozen=True)
class GateInfo:
    """What ``gate.json`` says: operating curves per score and the largest block position trained on."""

    curves: dict[str, list[OperatingPoint]]
    max_position: int

    @classmethod
    def read(cls, path: Path | None) -> GateInfo:
        if path is None or not path.is_file():
            return cls(curves={}, max_position=DEFAULT_MAX_POSITION)
        data = json.loads(path.read_text(encoding="utf-8"))
        curves = {kind: curve_from_json(rows) for kind, rows in data.get("operating_curves", {}).items()}
        return cls(curves=curves, max_position=int(data.get("max_position", DEFAULT_MAX_POSITION)))


class TrustGate:
    """``gated`` mode's per-token decision: trust when the score reaches the threshold.

    ``threshold`` is on the kind's own scale: p(accept) for ``learned``, the top-1
    probability for ``top1``, entropy in nats for ``entropy`` (trusted when at or below it).
    """

    def __init__(self, kind: GateKind, threshold: float, gate: OnnxGate | None = None) -> None:
        if kind == "learned" and gate is None:
            raise ValueError("the learned gate needs gate.onnx (a bundle with a gate, or --gate)")
        self.kind = kind
        self.threshold = threshold
        self.gate = gate
        self._cut = score_threshold(kind, threshold)

    @classmethod
    def from_choice(cls, choice: GateChoice, gate_path: Path | None) -> TrustGate:
        """Load the graph (for ``learned``) and ``gate.json`` beside it, and resolve the operating point."""
        info = GateInfo.read(gate_path.with_name(GATE_JSON_NAME) if gate_path is not None else None)
        gate = None
        if choice.kind == "learned":
            if gate_path is None or not gate_path.is_file():
                raise ValueError("the learned gate needs gate.onnx (a bundle with a gate, or --gate)")
            gate = OnnxGate(gate_path, max_position=info.max_position)
        threshold = choice.resolve(info.curves.get(choice.kind))
        logger.info("gated mode: %s gate, threshold %.4g", choice.kind, threshold)
        return cls(choice.kind, threshold, gate)

    def features(self, logits: np.ndarray, hidden: np.ndarray, position: int) -> np.ndarray:
        """The feature row [1, dim] of one drafted position; ``position``: tokens since the last check."""
        return token_features(logits[None], hidden[None], np.array([position]))

    def trusts(self, features: np.ndarray) -> bool:
        """Whether the token these features [1, dim] describe may be emitted without the cloud."""
        return bool(trust_scores(self.kind, features, self.gate)[0] >= self._cut)

"""``tandem gate train``: fit the uncertainty gate centrally from a device log, export ONNX.

The gate estimates, per drafted token, the probability that the target would accept it
(the SPRINTER label stored in the device log). Inputs are the features of
:mod:`tandemspec.edge.features` (entropy, top-1 probability, margin, block position, then
the drafter's last hidden state), standardised with the training split's mean and std.

Two candidates are trained with numpy (mini-batch Adam, L2): a logistic regression and a
one-hidden-layer ReLU MLP; the one with the lower log-loss on a validation split of the
training sessions is kept and refitted on all of them. It is exported as a hand-built ONNX
graph (``Sub, Mul, MatMul, Add, [Relu, MatMul, Add,] Sigmoid, Squeeze``; opset 18; input
``features`` [batch, dim] float32, output ``p_accept`` [batch]).

Train and held-out are split by session (whole generations), since tokens of one session
share context and nearly identical hidden states. Held-out evaluation compares the gate
with the two published baselines, each turned into a probability by a one-feature
logistic fit on the training split (Platt scaling, which leaves ROC AUC unchanged): the
drafter's top-1 probability (Hugging Face's ``assistant_confidence_threshold``) and its
negative entropy (U-HLM / FedHLM).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tandemspec.edge.bundle import GATE_NAME, MANIFEST_NAME, hash_files, load_bundle
from tandemspec.edge.devicelog import DeviceLog
from tandemspec.edge.features import NUM_SCALAR_FEATURES, SCALAR_FEATURES
from tandemspec.edge.gate import (
    GATE_JSON_NAME,
    INPUT_NAME,
    OUTPUT_NAME,
    GateKind,
    OperatingPoint,
    curve_to_json,
    operating_curve,
    trust_scores,
)

logger = logging.getLogger(__name__)

GATE_ONNX_NAME = GATE_NAME
GATE_FORMAT_VERSION = 1
ONNX_OPSET = 18
NUM_BINS = 10
_EPS = 1e-7

# "scalar-mlp" reads only the scalar features (zero weights on the hidden state): with
# few sessions the hidden state's dimensions invite overfitting, so it competes too.
ModelKind = Literal["logistic", "mlp", "scalar-mlp"]
# The published baselines the gate is compared with, by their trust-score kind (edge/gate.py).
BASELINES: dict[GateKind, str] = {"top1": "drafter top-1 prob", "entropy": "drafter -entropy"}
CANDIDATES: tuple[ModelKind, ...] = ("logistic", "mlp", "scalar-mlp")


@dataclass(frozen=True)
class TrainConfig:
    """How the gate is fitted."""

    holdout: float = 0.2
    seed: int = 0
    hidden_units: int = 32
    steps: int = 600
    batch_size: int = 1024
    learning_rate: float = 0.01
    weight_decay: float = 1e-2  # 1e-4 let the MLP overfit the hidden state on reference-pair logs


@dataclass(frozen=True)
class GateModel:
    """A standardise-then-MLP gate; a logistic gate is the MLP with no hidden layer."""

    kind: ModelKind
    mean: np.ndarray  # [dim] float32
    std: np.ndarray  # [dim] float32, never zero
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight [in, out], bias [out]); ReLU between

    @property
    def feature_dim(self) -> int:
        """Length of the input vector."""
        return int(self.mean.size)


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability table: predicted probabilities in [low, high)."""

    low: float
    high: float
    mean_predicted: float  # NaN when empty
    observed_rate: float  # NaN when empty
    count: int


@dataclass(frozen=True)
class ScoreReport:
    """Held-out quality of one probability estimate."""

    name: str
    auc: float
    log_loss: float
    reliability: tuple[ReliabilityBin, ...]


# ---------------------------------------------------------------- metrics


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank statistic (ties share their average rank)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, np.float64)
    # Group equal scores: each run of ties gets the mean of the 1-based ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    run_ranks = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return float((ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy (nats), probabilities clipped away from 0 and 1."""
    p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def reliability_table(probs: np.ndarray, labels: np.ndarray, num_bins: int = NUM_BINS) -> tuple[ReliabilityBin, ...]:
    """Equal-width bins over [0, 1]: mean predicted vs observed accept rate, and count."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.float64)
    index = np.clip((probs * num_bins).astype(np.int64), 0, num_bins - 1)
    table = []
    for b in range(num_bins):
        mask = index == b
        count = int(mask.sum())
        table.append(
            ReliabilityBin(
                low=b / num_bins,
                high=(b + 1) / num_bins,
                mean_predicted=float(probs[mask].mean()) if count else float("nan"),
                observed_rate=float(labels[mask].mean()) if count else float("nan"),
                count=count,
            )
        )
    return tuple(table)


def score_report(name: str, probs: np.ndarray, labels: np.ndarray) -> ScoreReport:
    """AUC, log-loss and reliability of ``probs`` against ``labels``."""
    return ScoreReport(name, roc_auc(probs, labels), log_loss(probs, labels), reliability_table(probs, labels))


# ---------------------------------------------------------------- model


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def forward(model: GateModel, features: np.ndarray) -> np.ndarray:
    """Accept probability per row, [n] float32 (the reference the ONNX graph must match)."""
    h = (np.asarray(features, np.float32) - model.mean) * (1.0 / model.std)  # [n, dim]
    for i, (weight, bias) in enumerate(model.layers):
        h = h @ weight + bias
        if i < len(model.layers) - 1:
            h = np.maximum(h, 0.0)
    return _sigmoid(h[:, 0]).astype(np.float32)


def _init_layers(dims: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    params: list[np.ndarray] = []
    for fan_in, fan_out in itertools.pairwise(dims):
        params.append((rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float64))
        params.append(np.zeros(fan_out, np.float64))
    return params


def gradients(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, weight_decay: float) -> list[np.ndarray]:
    """Backprop of mean cross-entropy + L2 on weights through Linear(-ReLU-Linear)*."""
    activations = [x]
    h = x
    num_layers = len(params) // 2
    for i in range(num_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < num_layers - 1:
            h = np.maximum(h, 0.0)
            activations.append(h)
    delta = (_sigmoid(h[:, 0]) - y)[:, None] / len(y)  # d loss / d logit, [b, 1]
    grads: list[np.ndarray] = [np.empty(0)] * len(params)
    for i in reversed(range(num_layers)):
        grads[2 * i] = activations[i].T @ delta + weight_decay * params[2 * i]
        grads[2 * i + 1] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ params[2 * i].T) * (activations[i] > 0)
    return grads


def _fit(x: np.ndarray, y: np.ndarray, dims: list[int], config: TrainConfig, seed: int) -> list[np.ndarray]:
    """Mini-batch Adam (Kingma & Ba, arXiv:1412.6980) on standardised ``x`` [n, dim]."""
    rng = np.random.default_rng(seed)
    params = _init_layers(dims, rng)
    adam_steps(params, x, y, config.steps, config.batch_size, config.learning_rate, config.weight_decay, rng)
    return params


def adam_steps(
    params: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    rng: np.random.Generator,
) -> None:
    """``steps`` mini-batch Adam steps (Kingma & Ba, arXiv:1412.6980) on ``params``, in place."""
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    beta1, beta2 = 0.9, 0.999
    batch = min(batch_size, len(y))
    for step in range(1, steps + 1):
        rows = rng.integers(0, len(y), batch)
        grads = gradients(params, x[rows], y[rows], weight_decay)
        for p, g, m, v in zip(params, grads, first, second, strict=True):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            p -= learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (constant columns get std 1), float32."""
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def train_model(kind: ModelKind, features: np.ndarray, labels: np.ndarray, config: TrainConfig) -> GateModel:
    """Fit a logistic, one-hidden-layer MLP, or scalar-features-only MLP gate."""
    mean, std = standardiser(features)
    x = ((features - mean) / std).astype(np.float64)  # [n, dim]
    dim = features.shape[1]
    used = NUM_SCALAR_FEATURES if kind == "scalar-mlp" else dim
    dims = [used, 1] if kind == "logistic" else [used, config.hidden_units, 1]
    params = _fit(x[:, :used], labels.astype(np.float64), dims, config, config.seed)
    first = np.zeros((dim, dims[1]), np.float64)
    first[:used] = params[0]  # unused columns (the hidden state for scalar-mlp) get zero weight
    params[0] = first
    layers = tuple((params[i].astype(np.float32), params[i + 1].astype(np.float32)) for i in range(0, len(params), 2))
    return GateModel(kind=kind, mean=mean, std=std, layers=layers)


def platt_baseline(train_scores: np.ndarray, train_labels: np.ndarray, config: TrainConfig) -> GateModel:
    """A one-feature logistic calibration of a baseline score, fitted on the training split."""
    return train_model("logistic", train_scores.reshape(-1, 1), train_labels, config)


# ---------------------------------------------------------------- ONNX export


def to_onnx(model: GateModel) -> onnx.ModelProto:
    """The gate as an ONNX graph: standardise, MatMul/Add(/Relu)..., Sigmoid, Squeeze to [batch]."""
    initializers = [
        numpy_helper.from_array(model.mean, "mean"),
        numpy_helper.from_array((1.0 / model.std).astype(np.float32), "inv_std"),
        numpy_helper.from_array(np.array([1], np.int64), "squeeze_axes"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["h0"]),
    ]
    current = "h0"
    for i, (weight, bias) in enumerate(model.layers):
        initializers += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"]),
        ]
        current = f"z{i}"
        if i < len(model.layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"a{i}"]))
            current = f"a{i}"
    nodes += [
        helper.make_node("Sigmoid", [current], ["p_column"]),
        helper.make_node("Squeeze", ["p_column", "squeeze_axes"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "uncertainty_gate",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", model.feature_dim])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch"])],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="tandemspec")
    proto.ir_version = 9  # readable by ONNX Runtime >= 1.16
    onnx.checker.check_model(proto)
    return proto


# ---------------------------------------------------------------- training run


@dataclass(frozen=True)
class GateTrainResult:
    """The chosen gate and its held-out comparison with the baselines."""

    model: GateModel
    num_train: int
    num_holdout: int
    candidates: dict[str, float]  # validation log-loss per candidate (a group split of train)
    reports: tuple[ScoreReport, ...]  # gate first, then the baselines
    curves: dict[GateKind, list[OperatingPoint]]  # held-out operating curves: learned, entropy, top1
    max_position: int  # the largest block position in the training rows


def split_indices(groups: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) row indices with whole groups (sessions) on one side.

    Tokens of one session share context and near-identical hidden states, so a token-level
    split leaks; with a single group it falls back to a token-level split (and says so).
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError("holdout must be in (0, 1)")
    groups = np.asarray(groups)
    if groups.size < 2:
        raise ValueError("need at least two labelled tokens")
    names, group_of_row = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        logger.warning("one session only: splitting by token, held-out metrics will be optimistic")
        group_of_row = np.arange(groups.size)
    num_groups = int(group_of_row.max()) + 1
    order = np.random.default_rng(seed).permutation(num_groups)
    num_holdout = min(max(1, round(num_groups * holdout)), num_groups - 1)
    held = np.isin(group_of_row, order[:num_holdout])
    return np.flatnonzero(~held), np.flatnonzero(held)


def choose_kind(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, config: TrainConfig) -> dict[str, float]:
    """Validation log-loss of each candidate, on a group split of the training rows only."""
    fit, val = split_indices(groups, config.holdout, config.seed + 1)
    losses: dict[str, float] = {}
    for kind in CANDIDATES:
        model = train_model(kind, features[fit], labels[fit], config)
        losses[kind] = log_loss(forward(model, features[val]), labels[val])
    return losses


def train_gate(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, config: TrainConfig) -> GateTrainResult:
    """Split by session, pick logistic vs MLP on a validation split of train, refit, evaluate held-out."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, bool)
    groups = np.asarray(groups)
    train, held = split_indices(groups, config.holdout, config.seed)
    x_train, y_train, x_held, y_held = features[train], labels[train], features[held], labels[held]
    losses = choose_kind(x_train, y_train, groups[train], config)
    best = min(CANDIDATES, key=lambda kind: losses[kind])
    model = train_model(best, x_train, y_train, config)
    logger.info("gate candidates validation log-loss: %s; keeping %s", losses, best)
    p_held = forward(model, x_held)
    reports = [score_report(f"gate ({best})", p_held, y_held)]
    curves: dict[GateKind, list[OperatingPoint]] = {"learned": operating_curve("learned", p_held, y_held)}
    for kind, name in BASELINES.items():
        held_scores = trust_scores(kind, x_held)
        calibration = platt_baseline(trust_scores(kind, x_train), y_train, config)
        reports.append(score_report(name, forward(calibration, held_scores.reshape(-1, 1)), y_held))
        curves[kind] = operating_curve(kind, held_scores, y_held)
    max_position = int(x_train[:, SCALAR_FEATURES.index("position")].max())
    return GateTrainResult(model, len(train), len(held), losses, tuple(reports), curves, max_position)


def read_log(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [n, dim] float32, labels [n] bool, session index [n] of the tokens of the newest dim."""
    with DeviceLog(path) as log:
        tokens = [(token, record.session) for record in log.iter_rounds() for token in record.tokens]
    if not tokens:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool), np.zeros(0, np.int64)
    dim = tokens[-1][0].features.size  # rows of another size (an older bundle) are skipped
    kept = [(token, session) for token, session in tokens if token.features.size == dim]
    sessions: dict[str, int] = {}
    groups = np.array([sessions.setdefault(session, len(sessions)) for _, session in kept], np.int64)
    features = np.stack([token.features for token, _ in kept]).astype(np.float32)
    labels = np.array([token.label for token, _ in kept], bool)
    return features, labels, groups


def read_logs(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`read_log` of several logs pooled; sessions stay apart (one group per log and session)."""
    parts = [read_log(path) for path in paths]
    parts = [part for part in parts if len(part[1])]
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool), np.zeros(0, np.int64)
    dims = {part[0].shape[1] for part in parts}
    if len(dims) > 1:
        raise ValueError(f"the logs hold features of different sizes {sorted(dims)} (different drafters)")
    offsets = np.cumsum([0] + [int(part[2].max()) + 1 for part in parts[:-1]])
    features = np.concatenate([part[0] for part in parts])
    labels = np.concatenate([part[1] for part in parts])
    groups = np.concatenate([part[2] + offset for part, offset in zip(parts, offsets, strict=True)])
    return features, labels, groups


def feature_names(feature_dim: int) -> list[str]:
    """Names of the input columns: the scalar features, then ``hidden.{i}``."""
    return list(SCALAR_FEATURES) + [f"hidden.{i}" for i in range(feature_dim - NUM_SCALAR_FEATURES)]


def _report_json(report: ScoreReport) -> dict[str, object]:
    return {
        "auc": report.auc,
        "log_loss": report.log_loss,
        "reliability": [
            {
                "low": b.low,
                "high": b.high,
                "mean_predicted": b.mean_predicted,
                "observed": b.observed_rate,
                "count": b.count,
            }
            for b in report.reliability
        ],
    }


def gate_metadata(result: GateTrainResult) -> dict[str, object]:
    """What ``gate.json`` holds: version, inputs, chosen model and held-out metrics."""
    dim = result.model.feature_dim
    return {
        "version": GATE_FORMAT_VERSION,
        "feature_dim": dim,
        "feature_names": feature_names(dim),
        "model": result.model.kind,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "num_train": result.num_train,
        "num_holdout": result.num_holdout,
        "candidate_validation_log_loss": result.candidates,
        "holdout": {r.name: _report_json(r) for r in result.reports},
        "max_position": result.max_position,
        "operating_curves": {kind: curve_to_json(curve) for kind, curve in result.curves.items()},
    }


def write_gate(result: GateTrainResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``gate.onnx`` and ``gate.json`` into ``out_dir``; in an edge bundle, list them in its manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, json_path = out_dir / GATE_ONNX_NAME, out_dir / GATE_JSON_NAME
    onnx.save(to_onnx(result.model), str(onnx_path))
    json_path.write_text(json.dumps(gate_metadata(result), indent=2) + "\n")
    if (out_dir / MANIFEST_NAME).is_file():
        _list_in_manifest(out_dir, (GATE_ONNX_NAME, GATE_JSON_NAME))
    return onnx_path, json_path


def _list_in_manifest(bundle_dir: Path, names: tuple[str, ...]) -> None:
    """Add (or re-hash) ``names`` in a bundle's manifest, so the edge loads and verifies them."""
    manifest = load_bundle(bundle_dir, verify_hashes=False).manifest
    files = {**manifest.files, **hash_files(bundle_dir, list(names))}
    (bundle_dir / MANIFEST_NAME).write_text(dataclasses.replace(manifest, files=files).to_json(), encoding="utf-8")


def format_report(result: GateTrainResult) -> str:
    """Human-readable held-out report: a summary line per score, then reliability tables."""
    lines = [
        f"train {result.num_train} tokens, held-out {result.num_holdout}; "
        f"candidate validation log-loss: " + ", ".join(f"{k} {v:.4f}" for k, v in result.candidates.items()),
        f"{'score':<22} {'AUC':>7} {'log-loss':>9}",
    ]
    lines += [f"{r.name:<22} {r.auc:>7.4f} {r.log_loss:>9.4f}" for r in result.reports]
    lines.append("\nheld-out operating points: share of tokens trusted at a given share of rejections caught")
    lines.append(f"{'caught':>7} " + " ".join(f"{kind:>8}" for kind in result.curves))
    for floor in (0.5, 0.7, 0.8, 0.9, 0.95):
        cells = []
        for curve in result.curves.values():
            meeting = [p.trust_rate for p in curve if p.rejections_caught >= floor]
            cells.append(f"{max(meeting):>8.3f}" if meeting else f"{'-':>8}")
        lines.append(f"{floor:>7.2f} " + " ".join(cells))
    for report in result.reports:
        lines.append(f"\nreliability: {report.name}\n{'bin':<11} {'predicted':>9} {'observed':>9} {'count':>7}")
        for b in report.reliability:
            lines.append(f"[{b.low:.1f}, {b.high:.1f}) {b.mean_predicted:>9.3f} {b.observed_rate:>9.3f} {b.count:>7d}")
    return "\n".join(lines)


def train_main(args: argparse.Namespace) -> int:
    """``tandem gate train``: read the device log, train, print the report, write the gate."""
    config = TrainConfig(holdout=args.holdout, seed=args.seed)
    paths: list[Path] = args.log
    try:
        features, labels, groups = read_logs(paths)
    except ValueError as error:
        print(f"gate train: {error}")
        return 1
    names = ", ".join(str(p) for p in paths)
    if len(labels) < 4 or labels.all() or not labels.any():
        print(f"gate train: need both accepted and rejected tokens in {names} (have {len(labels)})")
        return 1
    logger.info("read %d labelled tokens of dim %d from %s", len(labels), features.shape[1], names)
    result = train_gate(features, labels, groups, config)
    print(format_report(result))
    if args.out is not None:
        onnx_path, json_path = write_gate(result, args.out)
        print(f"\nwrote {onnx_path} and {json_path}")
    return 0

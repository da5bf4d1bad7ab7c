"""Uncertainty gate: AUC by ranks, training beats the baselines, ONNX parity, ``gate train`` end to end."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tandemspec.cli import main
from tandemspec.edge.devicelog import DeviceLog, RoundRecord, records_from_sequences
from tandemspec.edge.features import SCALAR_FEATURES, token_features
from tandemspec.edge.gate import OnnxGate
from tandemspec.federated.gate import (
    GATE_JSON_NAME,
    GATE_ONNX_NAME,
    TrainConfig,
    forward,
    read_log,
    reliability_table,
    roc_auc,
    split_indices,
    to_onnx,
    train_gate,
    train_model,
)

HIDDEN = 8
VOCAB = 16


def _brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels], scores[~labels]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token features from random logits/hidden states; acceptance follows a known linear score.

    The score mixes hidden-state directions with a little of top-1 probability, so the
    drafter's own confidence is informative but far from sufficient.
    """
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, VOCAB)) * rng.uniform(0.5, 3.0, (n, 1))
    hidden = rng.standard_normal((n, HIDDEN)).astype(np.float32)
    positions = rng.integers(0, 4, n)
    features = token_features(logits, hidden, positions)
    direction = np.linspace(-1.0, 1.0, HIDDEN)
    score = 2.0 * hidden @ direction + 2.0 * (features[:, SCALAR_FEATURES.index("top1_prob")] - 0.5)
    labels = rng.random(n) < 1.0 / (1.0 + np.exp(-score))
    return features, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count(seed: int) -> None:
    """Rank AUC == brute-force pairwise wins (ties count half), including heavy ties."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, 120).astype(np.float64)  # many ties
    labels = rng.random(120) < 0.4
    assert roc_auc(scores, labels) == pytest.approx(_brute_force_auc(scores, labels), abs=1e-12)
    continuous = rng.standard_normal(80)
    assert roc_auc(continuous, labels[:80]) == pytest.approx(_brute_force_auc(continuous, labels[:80]), abs=1e-12)


def test_reliability_table_counts_every_row() -> None:
    """Ten bins, counts add up, and a bin's observed rate is the mean label in it."""
    probs = np.array([0.05, 0.05, 0.95, 1.0, 0.5])
    labels = np.array([False, True, True, True, False])
    table = reliability_table(probs, labels)
    assert len(table) == 10 and sum(b.count for b in table) == 5
    assert table[0].observed_rate == pytest.approx(0.5) and table[9].count == 2


def test_learned_gate_beats_baselines() -> None:
    """When acceptance depends on the hidden state, the gate's held-out AUC beats top-1 prob and entropy."""
    features, labels = _synthetic(4000, seed=3)
    groups = np.arange(len(labels)) // 40  # sessions of 40 tokens
    result = train_gate(features, labels, groups, TrainConfig(seed=0, steps=400))
    gate, top1, entropy = result.reports
    assert gate.name.startswith("gate")
    assert gate.auc > top1.auc + 0.1 and gate.auc > entropy.auc + 0.1
    assert gate.auc > 0.75
    assert gate.log_loss < min(top1.log_loss, entropy.log_loss)


def test_split_keeps_sessions_whole() -> None:
    """No session has tokens on both sides; the split is deterministic in the seed."""
    groups = np.repeat(np.arange(20), 7)
    train, held = split_indices(groups, 0.2, seed=4)
    assert not set(groups[train]) & set(groups[held]) and len(set(groups[held])) == 4
    again = split_indices(groups, 0.2, seed=4)
    np.testing.assert_array_equal(held, again[1])
    _, single = split_indices(np.zeros(10), 0.2, seed=0)  # one session: falls back to tokens
    assert len(single) == 2


@pytest.mark.parametrize("kind", ["logistic", "mlp", "scalar-mlp"])
def test_onnx_gate_matches_numpy_forward(kind: str, tmp_path: Path) -> None:
    """OnnxGate on ONNX Runtime == the training-side numpy forward."""
    import onnx

    features, labels = _synthetic(600, seed=5)
    model = train_model(kind, features, labels, TrainConfig(steps=50))  # type: ignore[arg-type]
    path = tmp_path / "gate.onnx"
    onnx.save(to_onnx(model), str(path))
    gate = OnnxGate(path)
    assert gate.feature_dim == features.shape[1]
    np.testing.assert_allclose(gate.predict(features), forward(model, features), atol=1e-5)
    assert gate.predict(features[:1]).shape == (1,)
    with pytest.raises(ValueError):
        gate.predict(features[:, :-1])
    if kind == "scalar-mlp":  # the hidden state has no say
        shuffled = features.copy()
        shuffled[:, len(SCALAR_FEATURES) :] = features[::-1, len(SCALAR_FEATURES) :]
        np.testing.assert_allclose(gate.predict(shuffled), gate.predict(features), atol=1e-6)


def _fill_log(path: Path, num_rounds: int, seed: int) -> None:
    """A device log of synthetic rounds of four drafted tokens each, via the DeviceLog API."""
    features, labels = _synthetic(num_rounds * 4, seed)
    with DeviceLog(path) as log:
        for r in range(num_rounds):
            rows = slice(4 * r, 4 * r + 4)
            tokens = records_from_sequences(range(4), labels[rows].tolist(), features[rows], num_committed=1)
            session = f"session-{r // 10}"  # ten rounds per generation
            log.record_round(RoundRecord(session=session, position=4 * r, mode="lossless", tokens=tokens))


def test_gate_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tandem gate train --log DB --out DIR`` prints the report and writes gate.onnx / gate.json."""
    db, out = tmp_path / "log.db", tmp_path / "bundle"
    _fill_log(db, num_rounds=300, seed=7)
    assert main(["gate", "train", "--log", str(db), "--out", str(out), "--holdout", "0.25", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "drafter top-1 prob" in printed and "drafter -entropy" in printed and "reliability" in printed
    meta = json.loads((out / GATE_JSON_NAME).read_text())
    assert meta["feature_dim"] == len(SCALAR_FEATURES) + HIDDEN
    assert meta["feature_names"][:4] == list(SCALAR_FEATURES)
    assert meta["model"] in ("logistic", "mlp", "scalar-mlp")
    assert meta["num_holdout"] == 8 * 40 and meta["num_train"] == 22 * 40  # 8 of 30 sessions held out
    assert len(next(iter(meta["holdout"].values()))["reliability"]) == 10
    features, _, _ = read_log(db)
    p = OnnxGate(out / GATE_ONNX_NAME).predict(features)
    assert p.shape == (len(features),) and np.all((p >= 0) & (p <= 1))


def test_gate_train_refuses_single_class_log(tmp_path: Path) -> None:
    """A log with only accepted tokens cannot train a gate: exit status 1, nothing written."""
    db = tmp_path / "log.db"
    features, _ = _synthetic(8, seed=0)
    with DeviceLog(db) as log:
        tokens = records_from_sequences(range(8), [True] * 8, features, num_committed=0)
        log.record_round(RoundRecord(session="s", position=0, mode="lossless", tokens=tokens))
    assert main(["gate", "train", "--log", str(db), "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_gate_json_carries_operating_curves(tmp_path: Path) -> None:
    """gate.json holds a held-out curve per score (learned, entropy, top1) and the largest trained position."""
    db, out = tmp_path / "log.db", tmp_path / "gate"
    _fill_log(db, num_rounds=200, seed=3)
    assert main(["gate", "train", "--log", str(db), "--out", str(out)]) == 0
    meta = json.loads((out / GATE_JSON_NAME).read_text())
    assert meta["max_position"] == 3
    assert set(meta["operating_curves"]) == {"learned", "entropy", "top1"}
    for rows in meta["operating_curves"].values():
        rates = [row["trust_rate"] for row in rows]
        assert min(rates) == 0.0 and max(rates) == 1.0
        assert all(0.0 <= row["rejections_caught"] <= 1.0 for row in rows)


def test_gate_train_into_a_bundle_lists_the_gate(
    tmp_path: Path, tiny_bundle_dir: Callable[..., Path], tiny_model_dir: Callable[..., Path]
) -> None:
    """``tandem gate collect`` logs a real pair; ``gate train --out BUNDLE`` installs a gate the edge loads."""
    import shutil

    from tandemspec.edge.bundle import load_bundle
    from tandemspec.edge.gate import GateChoice, TrustGate
    from tandemspec.federated.collect import CollectConfig, collect

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir("llama"), bundle_dir)
    db = tmp_path / "log.db"
    summary = collect(
        CollectConfig(
            log_db=db, target_dir=tiny_model_dir("llama", 0), bundle_dir=bundle_dir, num_prompts=12, max_new_tokens=16
        )
    )
    assert summary.num_prompts == 12 and summary.num_drafted > 0 and 0 < summary.num_accepted < summary.num_drafted
    with DeviceLog(db) as log:
        assert log.count() == summary.num_drafted
    assert main(["gate", "train", "--log", str(db), "--out", str(bundle_dir)]) == 0
    bundle = load_bundle(bundle_dir)  # hashes verified: the manifest lists the new files
    assert bundle.gate_path is not None and GATE_JSON_NAME in bundle.manifest.files
    gate = TrustGate.from_choice(GateChoice("learned", quality=0.9), bundle.gate_path)
    assert 0.0 <= gate.threshold <= 1.0 and gate.gate is not None and gate.gate.max_position == 7


def test_gate_train_pools_several_logs(tmp_path: Path) -> None:
    """``--log A B``: both logs' tokens are used, and equal session names in two logs stay two sessions."""
    from tandemspec.federated.gate import read_logs

    first, second = tmp_path / "a.db", tmp_path / "b.db"
    _fill_log(first, num_rounds=100, seed=1)
    _fill_log(second, num_rounds=60, seed=2)
    features, labels, groups = read_logs([first, second])
    assert len(labels) == 4 * 160 and features.shape[0] == len(labels)
    assert len(np.unique(groups)) == 10 + 6  # ten rounds per session name, names repeat across logs
    out = tmp_path / "gate"
    assert main(["gate", "train", "--log", str(first), str(second), "--out", str(out)]) == 0
    meta = json.loads((out / GATE_JSON_NAME).read_text())
    assert meta["num_train"] + meta["num_holdout"] == 4 * 160

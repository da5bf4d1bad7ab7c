"""Federated rounds, the parts without a fleet: the weights codec, guard rails, cost curves, local training, config."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from tandemspec.edge.features import SCALAR_FEATURES, token_features
from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.guard import acceptance_dropped, screen_updates
from tandemspec.federated.fed.server_app import GuardedFedAvg, RoundLog
from tandemspec.federated.fed.tasks import (
    THRESHOLD_GRID,
    CostCurve,
    LocalData,
    LocalTrainConfig,
    best_threshold,
    cost_curve,
    threshold_for_catch,
    train_gate_local,
)
from tandemspec.federated.fed.weights import GlobalModel, flat_numpy, from_arrays, read_gate_onnx, to_arrays
from tandemspec.federated.gate import TrainConfig, forward, log_loss, to_onnx, train_model

HIDDEN = 8


def _features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gate features whose acceptance follows a hidden-state direction (as tests/federated/test_gate.py)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, 16)) * rng.uniform(0.5, 3.0, (n, 1))
    hidden = rng.standard_normal((n, HIDDEN)).astype(np.float32)
    features = token_features(logits, hidden, rng.integers(0, 4, n))
    score = 2.0 * hidden @ np.linspace(-1.0, 1.0, HIDDEN) + features[:, SCALAR_FEATURES.index("top1_prob")]
    return features, rng.random(n) < 1.0 / (1.0 + np.exp(-score))


def _model(seed: int = 0) -> GlobalModel:
    features, labels = _features(400, seed)
    gate = train_model("mlp", features, labels, TrainConfig(steps=50, hidden_units=4))
    rng = np.random.default_rng(seed)
    drafter = {"embed.weight": rng.standard_normal((10, 4)).astype(np.float32), "norm": np.ones(4, np.float32)}
    return GlobalModel(gate=gate, drafter=drafter)


def test_codec_round_trip_and_onnx_reader(tmp_path: Path) -> None:
    """to_arrays/from_arrays keep every array; a gate read back from its ONNX graph predicts the same."""
    model = _model()
    back = from_arrays(to_arrays(model))
    for a, b in zip(model.gate.layers, back.gate.layers, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert set(back.drafter) == set(model.drafter)
    np.testing.assert_array_equal(back.drafter["embed.weight"], model.drafter["embed.weight"])
    import onnx

    onnx.save(to_onnx(model.gate), str(tmp_path / "gate.onnx"))
    features, _ = _features(50, 3)
    np.testing.assert_allclose(
        forward(read_gate_onnx(tmp_path / "gate.onnx"), features), forward(model.gate, features), atol=1e-5
    )


def _perturbed(model: GlobalModel, scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: v + scale * rng.standard_normal(v.shape).astype(np.float32) for k, v in flat_numpy(to_arrays(model)).items()
    }


def test_screening_rejects_nan_and_far_updates() -> None:
    """A NaN update and one 100x farther than the others are dropped; honest ones pass."""
    model = _model()
    reference = flat_numpy(to_arrays(model))
    honest = [_perturbed(model, 0.01, seed) for seed in range(3)]
    with_nan = _perturbed(model, 0.01, 7)
    with_nan["drafter.norm"][0] = np.nan
    far = {k: reference[k] + 100.0 * (v - reference[k]) for k, v in _perturbed(model, 0.01, 8).items()}
    screening = screen_updates([*honest, with_nan, far], reference, factor=10.0)
    assert screening.kept == (0, 1, 2)
    assert "non-finite" in screening.rejected[3] and "norm" in screening.rejected[4]
    # With two updates the lower median is the honest one's distance, so the wild one cannot lift the bound.
    assert screen_updates([honest[0], far], reference, factor=10.0).kept == (0,)


def _reply(content: RecordDict, node: int) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"i{node}",
        group_id="1", created_at=time.time(), ttl=60.0, message_type="train",
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


def _train_reply(arrays: dict[str, np.ndarray], num_examples: int, node: int, cluster: str = "a") -> Message:
    from flwr.app import Array

    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return _reply(
        RecordDict(
            {
                "arrays": record,
                "metrics": MetricRecord({"num-examples": num_examples}),
                "device": ConfigRecord({"name": f"d{node}", "cluster": cluster}),
            }
        ),
        node,
    )


def test_strategy_drops_bad_updates_and_averages_the_rest_by_examples(tmp_path: Path) -> None:
    """aggregate_train on Flower Messages: NaN and 100x updates out, FedAvg by num-examples of the rest."""
    model = _model()
    initial = to_arrays(model)
    reference = flat_numpy(initial)
    strategy = GuardedFedAvg(FedConfig(out_dir=tmp_path), initial, cloud="127.0.0.1:1")
    strategy._round = RoundLog(round=1)  # configure_train opens the round's log
    a, b = _perturbed(model, 0.01, 1), _perturbed(model, 0.01, 2)
    with_nan = _perturbed(model, 0.01, 3)
    with_nan["gate.w0"][0, 0] = np.inf
    far = {k: reference[k] + 100.0 * (v - reference[k]) for k, v in _perturbed(model, 0.01, 4).items()}
    replies = [_train_reply(a, 30, 1), _train_reply(b, 10, 2), _train_reply(with_nan, 10, 3), _train_reply(far, 10, 4)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    merged = flat_numpy(arrays)
    for key in reference:
        np.testing.assert_allclose(merged[key], 0.75 * a[key] + 0.25 * b[key], rtol=1e-5, atol=1e-6)
    assert set(strategy._round.rejected_updates) == {"d3", "d4"}
    # The model devices train from is still the initial one until an evaluation accepts the candidate.
    for key, value in flat_numpy(strategy.accepted).items():
        np.testing.assert_array_equal(value, reference[key])
    # Only bad updates: no candidate at all.
    strategy._round = RoundLog(round=2)
    assert strategy.aggregate_train(2, [_train_reply(with_nan, 10, 3)]) == (None, None)


def test_hierarchical_mode_averages_within_clusters_then_clusters_equally(tmp_path: Path) -> None:
    """FedHLM's two levels: cluster a = FedAvg of its two devices by examples, then a and b count the same."""
    model = _model()
    initial = to_arrays(model)
    strategy = GuardedFedAvg(FedConfig(out_dir=tmp_path, hierarchical=True), initial, cloud="127.0.0.1:1")
    strategy._round = RoundLog(round=1)
    a, b, c = (_perturbed(model, 0.01, seed) for seed in (1, 2, 3))
    replies = [_train_reply(a, 30, 1, "a"), _train_reply(b, 10, 2, "a"), _train_reply(c, 1000, 3, "b")]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    merged = flat_numpy(arrays)
    for key in a:
        np.testing.assert_allclose(
            merged[key], 0.5 * (0.75 * a[key] + 0.25 * b[key]) + 0.5 * c[key], rtol=1e-5, atol=1e-6
        )


def test_dp_clipping_clips_against_the_accepted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's fixed clipping around the guard: updates are clipped to C around the model devices trained from."""
    from tandemspec.federated.fed.guard import update_distance
    from tandemspec.federated.fed.server_app import GuardedDpClipping

    model = _model()
    accepted = to_arrays(model)
    guarded = GuardedFedAvg(FedConfig(out_dir=tmp_path), accepted, cloud="127.0.0.1:1")
    strategy = GuardedDpClipping(guarded, noise_multiplier=0.0, clipping_norm=0.5, num_clients=2)
    rejected_candidate = to_arrays(GlobalModel(model.gate, {k: v + 5.0 for k, v in model.drafter.items()}))
    monkeypatch.setattr(guarded, "configure_train", lambda *args: [])  # sending needs a running Flower task
    strategy.configure_train(1, rejected_candidate, ConfigRecord(), None)  # type: ignore[arg-type]
    assert strategy.current_arrays is accepted
    guarded._round = RoundLog(round=1)  # configure_train opens the round's log
    far = [_perturbed(model, 1.0, seed) for seed in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, [_train_reply(far[0], 10, 1), _train_reply(far[1], 10, 2)])
    assert arrays is not None
    distance = update_distance(flat_numpy(arrays), flat_numpy(accepted))
    assert math.sqrt(sum(d * d for d in distance.values())) <= 0.5 + 1e-4


def test_acceptance_guard() -> None:
    assert not acceptance_dropped(2.0, None, 0.02)
    assert not acceptance_dropped(2.97, 3.0, 0.02)
    assert acceptance_dropped(2.9, 3.0, 0.02)
    assert acceptance_dropped(math.nan, 3.0, 0.02)


def test_central_schedule_decays_once_over_the_run() -> None:
    from tandemspec.federated.fed.centralised import MIN_LR_FACTOR, lr_factor

    factors = [lr_factor(r, 5, "cosine") for r in range(1, 6)]
    assert factors[0] == 1.0 and all(a > b for a, b in itertools.pairwise(factors))
    assert min(factors) >= MIN_LR_FACTOR and factors[-1] < 0.2
    assert {lr_factor(r, 5, "constant") for r in range(1, 6)} == {1.0} and lr_factor(1, 1, "cosine") == 1.0


def test_quality_recovered_from_summed_nll() -> None:
    """The bench's definition on fleet sums: 1 = the target's own text, 0 = the drafter's."""
    from tandemspec.federated.fed.evaluate import EvalSums

    base = dict(num_prompts=2, lossless_rounds=10, lossless_committed=30, lossless_tokens=40, lossless_passes=10,
                gated_tokens=40, gated_passes=8, gated_matching=30, bytes_up=0, bytes_down=0,
                local_tokens=20)  # fmt: skip
    # per token: target 1.0, drafter 3.0, gated 1.5 -> (3 - 1.5) / (3 - 1) = 0.75
    one = EvalSums(**base, nll_lossless=40.0, nll_gated=60.0, nll_local=60.0)  # type: ignore[arg-type]
    metrics = (one + one).metrics()
    assert metrics["nll-lossless"] == 1.0 and metrics["nll-local"] == 3.0 and metrics["nll-gated"] == 1.5
    assert metrics["quality-recovered"] == pytest.approx(0.75)
    assert "quality-recovered" not in EvalSums(**base).metrics()  # type: ignore[arg-type]  # unscored: no NLL


def test_cost_curves_add_up_and_thresholds_follow_the_objective() -> None:
    """Curves of two halves sum to the whole's; λ picks the extremes at its extremes; the catch floor holds."""
    rng = np.random.default_rng(0)
    p = rng.random(500)
    labels = rng.random(500) < p  # calibrated
    whole = cost_curve(p, labels, 0.02)
    halves = cost_curve(p[:250], labels[:250], 0.02) + cost_curve(p[250:], labels[250:], 0.02)
    np.testing.assert_allclose(halves.missed, whole.missed)
    np.testing.assert_allclose(halves.checks, whole.checks)
    assert halves.num_tokens == 500 and halves.num_rejected == (~labels).sum()
    assert best_threshold(whole, 0.0) == THRESHOLD_GRID[-1]  # checks cost nothing: doubt everything
    assert best_threshold(whole, 10.0) == THRESHOLD_GRID[0]  # checks are dear: trust everything
    t = threshold_for_catch(whole, 0.9)
    trusted = p >= t
    caught = 1.0 - (trusted & ~labels).sum() / (~labels).sum()
    assert caught >= 0.85  # the smoothed step is close to the hard one
    assert threshold_for_catch(CostCurve(whole.missed, whole.checks, whole.num_rejected, 500), 1.01) == 1.0


def test_local_gate_training_lowers_the_devices_loss() -> None:
    """A few Adam steps from a weak global gate fit the device's labels better; the standardiser stays."""
    features, labels = _features(2000, 5)
    weak = train_model("mlp", features[:100], labels[:100], TrainConfig(steps=5, hidden_units=8))
    data = LocalData(features=features, labels=labels, examples=())
    trained, before, after = train_gate_local(weak, data, LocalTrainConfig(gate_steps=150))
    assert after < before - 0.02
    assert before == pytest.approx(log_loss(forward(weak, features), labels))
    np.testing.assert_array_equal(trained.mean, weak.mean)
    np.testing.assert_array_equal(trained.std, weak.std)


def test_run_config_round_trip_and_refusal() -> None:
    config = FedConfig(num_rounds=5, thresholds="global", local=LocalTrainConfig(distill_steps=3))
    assert FedConfig.from_run_config(config.to_run_config()) == config
    with pytest.raises(ValueError, match="unknown"):
        FedConfig.from_run_config({"num-round": 3})


def test_pyproject_run_config_matches_the_defaults() -> None:
    """``flwr run .`` reads [tool.flwr.app.config]: the same names and defaults as FedConfig."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert set(app["config"]) == set(FedConfig().to_run_config())
    assert FedConfig.from_run_config(app["config"]) == FedConfig()
    assert app["components"]["serverapp"].endswith("server_app:app")


def test_cli_settings_are_typed_like_the_run_config() -> None:
    from tandemspec.federated.fed.commands import with_settings

    config = with_settings(FedConfig(), ["local-distill-steps=24", "thresholds=global", "gate-quality=0.8"])
    assert config.local.distill_steps == 24 and config.thresholds == "global" and config.gate_quality == 0.8
    with pytest.raises(ValueError):
        with_settings(FedConfig(), ["no-such-key=1"])

"""The ServerApp: FedAvg by examples with guard rails, fleet thresholds, and a published bundle per accepted round.

A round, driven by Flower's ``FedAvg.start(grid=...)`` loop:

1. ``train``: the accepted global model goes out; updates come back; :func:`screen_updates`
   drops non-finite and out-of-norm ones; FedAvg (weighted by ``num-examples``) averages
   the rest into a *candidate*.
2. ``evaluate.curve``: devices return the candidate gate's cost curve; summed globally and
   per cluster they give the thresholds (the most trusting one that still catches
   ``gate_quality`` of the rejections); the candidate bundle is staged.
3. ``evaluate``: devices decode their held-out prompts with the staged bundle through the
   verifier. If the fleet's accepted length dropped (``max_acceptance_drop``), the
   candidate is discarded and the previous global model stays; otherwise the bundle is
   published as a new version and becomes ``current``.

Round 0 runs steps 2-3 on the starting model (the baseline row, and the first version of a
fresh ``--out``). The verifier the devices decode against is started here, on the pair's
target, for the run's length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from tandemspec.edge.bundle import GATE_NAME
from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.evaluate import EvalSums
from tandemspec.federated.fed.guard import acceptance_dropped, screen_updates
from tandemspec.federated.fed.publish import (
    CURRENT_NAME,
    DRAFTER_WEIGHTS_NAME,
    RELEASE_NAME,
    clear_staging,
    current_release,
    discard,
    publish_version,
    stage_version,
)
from tandemspec.federated.fed.tasks import CostCurve, threshold_for_catch
from tandemspec.federated.fed.weights import GATE_PREFIX, GlobalModel, flat_numpy, from_arrays, to_arrays

logger = logging.getLogger(__name__)

HISTORY_NAME = "history.json"


@dataclass
class RoundLog:
    """What one round did, for ``history.json``."""

    round: int
    accepted: bool = False
    version: str | None = None
    num_updates: int = 0
    rejected_updates: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    cluster_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    bytes_down_per_client: float = 0.0
    bytes_up_per_client: float = 0.0
    wall_s: float = 0.0


class GuardedFedAvg(FedAvg):
    """FedAvg whose global model changes only through screened updates and an evaluation that holds acceptance."""

    def __init__(self, config: FedConfig, initial: ArrayRecord, cloud: str, **kwargs: Any) -> None:
        super().__init__(fraction_evaluate=1.0, **kwargs)
        self.config = config
        self.cloud = cloud
        self.accepted = initial  # the global model devices train from
        self.accepted_length: float | None = None
        self.history: list[RoundLog] = []
        self._staged: Path | None = None
        self._round: RoundLog | None = None
        self._started = time.perf_counter()

    # -- 1. train ------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = RoundLog(round=server_round)
        self._started = time.perf_counter()
        messages = list(super().configure_train(server_round, self.accepted, config, grid))
        self._round.bytes_down_per_client = float(self.accepted.count_bytes())
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._round is not None
        valid = [m for m in replies if not m.has_error()]
        reference = flat_numpy(self.accepted)
        updates = [flat_numpy(m.content["arrays"]) for m in valid]  # type: ignore[arg-type]
        screening = screen_updates(updates, reference, self.config.norm_factor)
        for index, reason in screening.rejected.items():
            name = str(valid[index].content["device"].get("name", index))
            self._round.rejected_updates[name] = reason
            logger.warning("round %d: update of %s rejected: %s", server_round, name, reason)
        kept = [valid[i] for i in screening.kept]
        self._round.num_updates = len(kept)
        if kept:
            self._round.bytes_up_per_client = float(np.mean([m.content["arrays"].count_bytes() for m in kept]))
        if not kept:
            return None, None
        if not self.config.hierarchical:
            return super().aggregate_train(server_round, kept)
        by_cluster: dict[str, list[Message]] = {}
        for m in kept:
            by_cluster.setdefault(_cluster(m), []).append(m)
        cluster_models = [super(GuardedFedAvg, self).aggregate_train(server_round, ms)[0] for ms in by_cluster.values()]
        equal = [
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
            for arrays in cluster_models
            if arrays is not None
        ]
        _, metrics = super().aggregate_train(server_round, kept)
        return aggregate_arrayrecords(equal, "num-examples"), metrics

    # -- 2. thresholds and staging, 3. decoding --------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._round is None or self._round.round != server_round:
            self._round = RoundLog(round=server_round)
            self._started = time.perf_counter()
        if server_round > 0 and self._round.num_updates == 0:
            return []  # nothing new to evaluate: the global model stays
        model = from_arrays(arrays)
        # the curve needs the candidate drafter only when devices recompute their features with it
        refresh = self.config.local.refresh_features
        gate_only = arrays if refresh else ArrayRecord({k: v for k, v in arrays.items() if k.startswith(GATE_PREFIX)})
        node_ids = list(grid.get_node_ids())
        queries = [
            Message(RecordDict({"arrays": gate_only, "config": ConfigRecord({"server-round": server_round})}),
                    dst_node_id=node, message_type=f"{MessageType.EVALUATE}.curve")
            for node in node_ids
        ]  # fmt: skip
        curves = _sum_curves(grid.send_and_receive(queries))
        thresholds = {
            cluster: threshold_for_catch(curve, self.config.gate_quality) for cluster, curve in curves.items()
        }
        if self.config.thresholds == "global":
            thresholds = {"": thresholds[""]}
        pair = self.config.resolved_pair()
        self._staged = stage_version(
            self.config.out_dir,
            model,
            pair / "edge",
            pair / "drafter",
            curves.get(""),
            thresholds,
        )
        self._round.thresholds = thresholds
        self._candidate = arrays
        settings = ConfigRecord(
            {
                "server-round": server_round,
                "bundle-dir": str(self._staged),
                "cloud": self.cloud,
                "thresholds": json.dumps(thresholds),
            }
        )
        return [
            Message(RecordDict({"config": settings}), dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in node_ids
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        assert self._round is not None
        if self._staged is None:
            self._finish_round(accepted=False)
            return None
        valid = [m for m in replies if not m.has_error()]
        for m in replies:
            if m.has_error():
                logger.warning("round %d: evaluation failed on node %d: %s", server_round, m.metadata.src_node_id,
                               m.error.reason)  # fmt: skip
        overall, by_cluster = fleet_metrics((_cluster(m), _sums(m)) for m in valid)
        self._round.metrics = overall
        self._round.cluster_metrics = by_cluster
        candidate = overall.get("accepted-length", float("nan"))
        if not valid or acceptance_dropped(candidate, self.accepted_length, self.config.max_acceptance_drop):
            logger.warning("round %d: accepted length %.3f < %s: keeping the previous model", server_round,
                           candidate, self.accepted_length)  # fmt: skip
            discard(self._staged)
            self._staged = None
            self._finish_round(accepted=False)
            return _metric_record(overall)
        fresh = current_release(self.config.out_dir) is None
        if server_round > 0 or fresh:
            release = publish_version(self.config.out_dir, self._staged, server_round, overall, self._round.thresholds)
            self._round.version = release.version
        else:
            discard(self._staged)  # round 0 of a continued run: the current version is the baseline
            self._round.version = current_release(self.config.out_dir).version  # type: ignore[union-attr]
        self._staged = None
        self.accepted = self._candidate
        self.accepted_length = candidate
        self._finish_round(accepted=True)
        return _metric_record(overall)

    def _finish_round(self, accepted: bool) -> None:
        assert self._round is not None
        self._round.accepted = accepted
        self._round.wall_s = time.perf_counter() - self._started
        self.history.append(self._round)
        write_history(self.config.out_dir, self.history)


class GuardedDpClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around :class:`GuardedFedAvg`, clipping against the *accepted* model.

    Flower's loop hands ``configure_train`` the last aggregate, which after a round the
    acceptance guard refused is not the model devices train from.
    """

    def __init__(
        self, strategy: GuardedFedAvg, noise_multiplier: float, clipping_norm: float, num_clients: int
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_clients)
        self.guarded = strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, self.guarded.accepted, config, grid)


def _cluster(message: Message) -> str:
    device = message.content["device"]
    return str(device.get("cluster", "")) if isinstance(device, ConfigRecord) else ""


def _scalar(record: Any, key: str) -> float:
    """A number of a reply's MetricRecord (anything else is a malformed reply)."""
    value = record[key]
    if not isinstance(value, int | float):
        raise ValueError(f"metric {key!r} is not a number: {type(value).__name__}")
    return float(value)


def _metric_record(values: dict[str, float]) -> MetricRecord:
    record = MetricRecord()
    for key, value in values.items():
        record[key] = value
    return record


def _sum_curves(replies: Iterable[Message]) -> dict[str, CostCurve]:
    """Cost curves added up over devices: the fleet's (key "") and each cluster's."""
    curves: dict[str, CostCurve] = {}
    for m in replies:
        if m.has_error():
            logger.warning("cost curve failed on node %d: %s", m.metadata.src_node_id, m.error.reason)
            continue
        metrics = m.content["metrics"]
        curve = CostCurve(
            missed=np.asarray(metrics["missed"], np.float64),
            checks=np.asarray(metrics["checks"], np.float64),
            num_rejected=_scalar(metrics, "num-rejected"),
            num_tokens=_scalar(metrics, "num-examples"),
        )
        cluster = _cluster(m)
        for key in {"", cluster}:
            curves[key] = curves[key] + curve if key in curves else curve
    if "" not in curves:
        raise RuntimeError("no device returned a cost curve")
    return curves


def _sums(message: Message) -> EvalSums:
    metrics = message.content["metrics"]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(EvalSums):
        if f.name in metrics:
            value = _scalar(metrics, f.name)
            values[f.name] = value if f.name.startswith("nll_") else int(value)
    return EvalSums(**values)


def fleet_metrics(rows: Iterable[tuple[str, EvalSums]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Token-weighted fleet and per-cluster means of (cluster, evaluation sums) per device."""
    totals: dict[str, EvalSums] = {}
    for cluster, sums in rows:
        for key in {"", cluster}:
            totals[key] = totals[key] + sums if key in totals else sums
    if "" not in totals:
        return {}, {}
    overall = totals.pop("")
    return overall.metrics(), {cluster: sums.metrics() for cluster, sums in totals.items()}


def write_history(out_dir: Path, history: list[RoundLog]) -> None:
    """``OUT/history.json``: one entry per round of this run (written after every round)."""
    from dataclasses import asdict

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / HISTORY_NAME).write_text(json.dumps([asdict(r) for r in history], indent=2) + "\n")


def initial_arrays(config: FedConfig) -> ArrayRecord:
    """The starting global model: ``current`` of ``--out`` when continuing, else the pair's drafter and gate."""
    from safetensors.numpy import load_file

    from tandemspec.federated.fed.weights import read_gate_onnx

    if current_release(config.out_dir) is not None:
        bundle = config.out_dir / CURRENT_NAME
        state_path = bundle / DRAFTER_WEIGHTS_NAME
    else:
        bundle = config.resolved_pair() / "edge"
        state_path = config.resolved_pair() / "drafter" / "model.safetensors"
    gate = read_gate_onnx(bundle / GATE_NAME)
    drafter = load_file(str(state_path))
    return to_arrays(GlobalModel(gate=gate, drafter=drafter))


def run_rounds(grid: Grid, config: FedConfig) -> list[RoundLog]:
    """Round 0 (baseline) and ``config.num_rounds`` federated rounds; returns the history."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    clear_staging(config.out_dir)
    arrays = initial_arrays(config)
    server = serve_in_thread(CloudConfig(model_dir=config.resolved_pair() / "target", host="127.0.0.1", port=0))
    try:
        guarded = GuardedFedAvg(config, arrays, server.address)
        baseline = guarded.configure_evaluate(0, arrays, ConfigRecord(), grid)
        guarded.aggregate_evaluate(0, grid.send_and_receive(baseline))
        strategy: FedAvg | GuardedDpClipping = guarded
        if config.dp_clipping_norm > 0:
            num_clients = len(list(grid.get_node_ids()))
            strategy = GuardedDpClipping(guarded, config.dp_noise_multiplier, config.dp_clipping_norm, num_clients)
        if config.num_rounds > 0:
            strategy.start(grid=grid, initial_arrays=arrays, num_rounds=config.num_rounds)
    finally:
        server.stop()
    return guarded.history


def make_server_app(config: FedConfig | None = None) -> ServerApp:
    """A ServerApp with ``config`` fixed, or read from the run config when None (``flwr run``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, config if config is not None else FedConfig.from_run_config(context.run_config))

    return app


app = make_server_app()
__all__ = ["RELEASE_NAME", "GuardedFedAvg", "app", "make_server_app", "run_rounds"]

"""The ClientApp: one device. It reads only its own log; weights, counts and metrics leave it, never text.

Messages it answers (content keys: ``arrays`` the global model, ``config`` the round's settings):

``train``
    From the global weights: train the gate on the cloud's labels and distil the drafter
    toward the logged target distributions; reply ``arrays`` (the updated model),
    ``metrics`` (``num-examples`` = labelled tokens, FedAvg's weight; losses before/after)
    and ``device`` (its cluster).
``evaluate.curve``
    The candidate gate's smoothed cost curve on the device's labelled tokens (FedHLM), as
    sums per threshold of :data:`~tandemspec.federated.fed.tasks.THRESHOLD_GRID` (with
    ``local-refresh-features`` on features the candidate drafter recomputes, so the
    message then carries the drafter too).
``evaluate``
    Decode the held-out prompts through the verifier at ``config["cloud"]`` with the bundle
    at ``config["bundle-dir"]`` (lossless, then gated at the device's cluster threshold).

Which device it is: in deployment the SuperNode's ``--node-config`` names ``log-db``,
``heldout`` and ``cluster``; in simulation ``partition-id`` picks a device of the run
config's ``fleet-dir``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tandemspec.bench.prompts import load_prompts
from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.evaluate import evaluate_bundle, target_scorer
from tandemspec.federated.fed.fleet import read_fleet
from tandemspec.federated.fed.tasks import (
    cost_curve,
    distill_local,
    read_local,
    refresh_features,
    train_gate_local,
)
from tandemspec.federated.fed.weights import GlobalModel, from_arrays, to_arrays
from tandemspec.federated.gate import forward


@dataclass(frozen=True)
class DeviceContext:
    """Where a device's own files are."""

    name: str
    cluster: str
    log_path: Path
    heldout_path: Path


def device_of(context: Context, config: FedConfig) -> DeviceContext:
    """The device this ClientApp runs as (node config in deployment, partition of the fleet in simulation)."""
    node = context.node_config
    if "log-db" in node:
        log = Path(str(node["log-db"]))
        return DeviceContext(
            str(node.get("name", log.parent.name)),
            str(node.get("cluster", "")),
            log,
            Path(str(node.get("heldout", log.with_name("heldout.jsonl")))),
        )
    devices = read_fleet(config.fleet_dir)
    device = devices[int(node["partition-id"]) % len(devices)]
    return DeviceContext(
        device.name, device.cluster, device.log_path(config.fleet_dir), device.heldout_path(config.fleet_dir)
    )


def make_client_app(config: FedConfig | None = None) -> ClientApp:
    """A ClientApp with ``config`` fixed, or read from each message's run config when None (``flwr run``)."""
    app = ClientApp()

    def resolve(context: Context) -> FedConfig:
        return config if config is not None else FedConfig.from_run_config(context.run_config)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return train_reply(message, context, resolve(context))

    @app.evaluate("curve")
    def curve(message: Message, context: Context) -> Message:
        return curve_reply(message, context, resolve(context))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_reply(message, context, resolve(context))

    return app


def _device_record(device: DeviceContext) -> ConfigRecord:
    return ConfigRecord({"name": device.name, "cluster": device.cluster})


def train_reply(message: Message, context: Context, config: FedConfig) -> Message:
    """One round of local training from the global model in ``message``."""
    device = device_of(context, config)
    settings = message.content["config"]
    assert isinstance(settings, ConfigRecord)
    server_round = int(str(settings.get("server-round", 0)))
    seed_config = dataclasses.replace(config.local, seed=config.local.seed + 1000 * server_round)
    arrays = message.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    model = from_arrays(arrays)
    data = read_local(device.log_path)
    drafter_dir = config.resolved_pair() / "drafter"
    drafter, distill_first, distill_last = distill_local(drafter_dir, model.drafter, data, seed_config)
    gate_data = data
    if config.local.refresh_features:  # the features the edge will compute with this drafter
        gate_data = refresh_features(device.log_path, drafter_dir, drafter, data, config.local.threads)
    gate, gate_before, gate_after = train_gate_local(model.gate, gate_data, seed_config)
    metrics = MetricRecord(
        {
            "num-examples": data.num_tokens,
            "num-distill-examples": len(data.examples),
            "gate-loss-before": gate_before,
            "gate-loss-after": gate_after,
            "distill-loss-first": distill_first,
            "distill-loss-last": distill_last,
        }
    )
    content = RecordDict(
        {"arrays": to_arrays(GlobalModel(gate, drafter)), "metrics": metrics, "device": _device_record(device)}
    )
    return Message(content=content, reply_to=message)


def curve_reply(message: Message, context: Context, config: FedConfig) -> Message:
    """The candidate gate's cost curve on this device's labelled tokens."""
    device = device_of(context, config)
    arrays = message.content["arrays"]
    assert isinstance(arrays, ArrayRecord)
    candidate = from_arrays(arrays)
    gate = candidate.gate
    data = read_local(device.log_path)
    if config.local.refresh_features:
        if not candidate.drafter:
            raise ValueError("refresh-features: the curve message carries no drafter weights")
        data = refresh_features(
            device.log_path, config.resolved_pair() / "drafter", candidate.drafter, data, config.local.threads
        )
    curve = cost_curve(forward(gate, data.features), data.labels, config.local.curve_temperature)
    metrics = MetricRecord(
        {
            "num-examples": data.num_tokens,
            "missed": [float(v) for v in curve.missed],
            "checks": [float(v) for v in curve.checks],
            "num-rejected": curve.num_rejected,
        }
    )
    return Message(content=RecordDict({"metrics": metrics, "device": _device_record(device)}), reply_to=message)


def evaluate_reply(message: Message, context: Context, config: FedConfig) -> Message:
    """Real decoding of the held-out prompts with the round's bundle."""
    device = device_of(context, config)
    settings = message.content["config"]
    assert isinstance(settings, ConfigRecord)
    thresholds = json.loads(str(settings.get("thresholds", "{}")))
    threshold = thresholds.get(device.cluster, thresholds.get("", None))
    scorer = target_scorer(config.resolved_pair() / "target") if config.evaluation.score_nll else None
    sums = evaluate_bundle(
        Path(str(settings["bundle-dir"])),
        str(settings["cloud"]),
        load_prompts(device.heldout_path),
        None if threshold is None else float(threshold),
        config.evaluation,
        scorer,
    )
    metrics = MetricRecord({"num-examples": sums.num_prompts, **dataclasses.asdict(sums)})
    metrics["threshold"] = float(np.nan if threshold is None else threshold)
    return Message(content=RecordDict({"metrics": metrics, "device": _device_record(device)}), reply_to=message)


app = make_client_app()

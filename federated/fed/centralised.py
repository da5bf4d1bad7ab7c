"""``tandem fed central``: the centralised upper bound - the same training on the fleet's pooled logs, no Flower.

Per round the pooled log trains the gate and distils the drafter with the devices' local
settings times the number of devices (the compute a federated round spends in all),
thresholds come from the pooled cost curves (globally and per cluster, as the ServerApp
sets them), and every device's held-out prompts are decoded with that round's bundle
through a local verifier. The same acceptance guard as the ServerApp's keeps the previous
model when a round lowers the fleet's accepted length. One pooled optimiser run takes 8x
the steps of a device's, so its learning rates follow a per-round cosine schedule
(``cosine``: round r of R at 0.5 (1 + cos(pi (r - 1) / R)) of the devices' rates, at least
a tenth) rather than staying at the devices' rates (``constant``), where later rounds
overshoot. ``OUT/history.json`` has the federated run's format, so
``rounds.md`` compares line by line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Literal

import numpy as np

from tandemspec.federated.fed.config import FedConfig
from tandemspec.federated.fed.evaluate import EvalSums, evaluate_bundle, target_scorer
from tandemspec.federated.fed.fleet import read_fleet, read_heldout
from tandemspec.federated.fed.guard import acceptance_dropped
from tandemspec.federated.fed.publish import discard, stage_version
from tandemspec.federated.fed.server_app import RoundLog, fleet_metrics, initial_arrays, write_history
from tandemspec.federated.fed.tasks import (
    CostCurve,
    LocalData,
    cost_curve,
    distill_local,
    read_local,
    threshold_for_catch,
    train_gate_local,
)
from tandemspec.federated.fed.weights import GlobalModel, from_arrays
from tandemspec.federated.gate import forward


def pooled(parts: list[LocalData]) -> LocalData:
    """Every device's rows in one data set."""
    return LocalData(
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        examples=tuple(e for p in parts for e in p.examples),
    )


Schedule = Literal["constant", "cosine"]
MIN_LR_FACTOR = 0.1


def lr_factor(round_number: int, num_rounds: int, schedule: Schedule) -> float:
    """The share of the devices' learning rates that pooled round ``round_number`` (1-based) trains at."""
    if schedule == "constant" or num_rounds <= 1:
        return 1.0
    return max(MIN_LR_FACTOR, 0.5 * (1.0 + math.cos(math.pi * (round_number - 1) / num_rounds)))


def run_central(config: FedConfig, schedule: Schedule = "cosine") -> list[RoundLog]:
    """Round 0 (the starting model) and ``num_rounds`` rounds of pooled training, each evaluated by decoding."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread

    devices = read_fleet(config.fleet_dir)
    data = [read_local(d.log_path(config.fleet_dir)) for d in devices]
    everything = pooled(data)
    steps = dataclasses.replace(
        config.local,
        gate_steps=config.local.gate_steps * len(devices),
        distill_steps=config.local.distill_steps * len(devices),
    )
    model = from_arrays(initial_arrays(config))  # nothing is published under OUT: the pair's models
    pair = config.resolved_pair()
    history: list[RoundLog] = []
    accepted_length: float | None = None
    scorer = target_scorer(pair / "target") if config.evaluation.score_nll else None
    server = serve_in_thread(CloudConfig(model_dir=pair / "target", host="127.0.0.1", port=0))
    try:
        for round_number in range(config.num_rounds + 1):
            started = time.perf_counter()
            previous = model
            if round_number > 0:
                factor = lr_factor(round_number, config.num_rounds, schedule)
                round_steps = dataclasses.replace(
                    steps,
                    seed=steps.seed + 1000 * round_number,
                    gate_lr=steps.gate_lr * factor,
                    distill_lr=steps.distill_lr * factor,
                )
                gate, _, _ = train_gate_local(model.gate, everything, round_steps)
                drafter, _, _ = distill_local(pair / "drafter", model.drafter, everything, round_steps)
                model = GlobalModel(gate, drafter)
            curves: dict[str, CostCurve] = {}
            for device, part in zip(devices, data, strict=True):
                curve = cost_curve(forward(model.gate, part.features), part.labels, config.local.curve_temperature)
                for key in {"", device.cluster}:
                    curves[key] = curves[key] + curve if key in curves else curve
            thresholds = {key: threshold_for_catch(c, config.gate_quality) for key, c in curves.items()}
            if config.thresholds == "global":
                thresholds = {"": thresholds[""]}
            staged = stage_version(config.out_dir, model, pair / "edge", pair / "drafter", curves[""], thresholds)
            rows: list[tuple[str, EvalSums]] = []
            for device in devices:
                threshold = thresholds.get(device.cluster, thresholds[""])
                prompts = read_heldout(config.fleet_dir, device)
                sums = evaluate_bundle(staged, server.address, prompts, threshold, config.evaluation, scorer)
                rows.append((device.cluster, sums))
            discard(staged)
            overall, by_cluster = fleet_metrics(rows)
            candidate = overall.get("accepted-length", float("nan"))
            accepted = not acceptance_dropped(candidate, accepted_length, config.max_acceptance_drop)
            if accepted:
                accepted_length = candidate
            else:
                model = previous  # the guard: the next round starts from the last accepted model
            history.append(
                RoundLog(round=round_number, accepted=accepted, num_updates=1, metrics=overall,
                         cluster_metrics=by_cluster, thresholds=thresholds, wall_s=time.perf_counter() - started)
            )  # fmt: skip
            write_history(config.out_dir, history)
    finally:
        server.stop()
    return history


def central_main(args: argparse.Namespace) -> int:
    """``tandem fed central``."""
    from tandemspec.federated.fed.commands import format_history, with_settings
    from tandemspec.federated.fed.report import write_report

    config = FedConfig(fleet_dir=args.fleet, out_dir=args.out, num_rounds=args.rounds)
    if args.pair is not None:
        config = dataclasses.replace(config, pair_dir=args.pair)
    if args.set:
        config = with_settings(config, args.set)
    history = run_central(config, args.schedule)
    print(format_history(history))
    print(f"table: {write_report(config.out_dir)}")
    return 0

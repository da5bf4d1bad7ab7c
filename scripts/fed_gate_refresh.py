"""How stale are the logged gate features once the drafter has been distilled? (an offline check)

Devices log gate features computed by the drafter they ran (round 0's); after federated
distillation the edge computes them with a different drafter. This recomputes every logged
token's features with a published version's drafter (its logits and last hidden state on
the logged context and drafted ids; the block position as logged), keeps the labels (the
target's verdicts do not depend on the drafter), and compares the version's gate on the
stale and the refreshed features (log-loss, ROC AUC, on a session split). With ``--out`` it
also fine-tunes the version's gate on the refreshed features of the training sessions
(the devices' Adam steps, :func:`tandemspec.federated.gate.adam_steps`) and writes a copy of
the version with that gate, for ``tandem fed sweep``.

    python scripts/fed_gate_refresh.py --fleet runs/fed8/fleet --version runs/fed8/out/versions/v0006 \
        --out runs/fed8/v0006-fresh-gate
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import load_file

from tandemspec.edge.bundle import GATE_NAME
from tandemspec.federated.fed.fleet import read_fleet
from tandemspec.federated.fed.publish import DRAFTER_WEIGHTS_NAME
from tandemspec.federated.fed.tasks import read_local, refresh_features
from tandemspec.federated.fed.weights import read_gate_onnx
from tandemspec.federated.gate import (
    GateModel,
    _list_in_manifest,
    adam_steps,
    forward,
    log_loss,
    read_log,
    roc_auc,
    split_indices,
    to_onnx,
)


def rows(log_path: Path, drafter_dir: Path, state: dict[str, np.ndarray], device: int) -> tuple[np.ndarray, ...]:
    """(stale features, refreshed features, labels, session ids) of one device's logged tokens."""
    stale, labels, sessions = read_log(log_path)
    fresh = refresh_features(log_path, drafter_dir, state, read_local(log_path))
    if len(fresh.labels) != len(labels):
        raise SystemExit(f"{log_path}: tokens without their context; this check needs every token's context")
    return stale, fresh.features, labels, sessions + 1_000_000 * device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--version", type=Path, required=True, help="a published version folder")
    parser.add_argument("--pair", type=Path, default=Path("models/reference"))
    parser.add_argument("--out", type=Path, help="write the version with a gate tuned on refreshed features here")
    parser.add_argument("--steps", type=int, default=800, help="Adam steps (8 devices x 100)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    state = load_file(str(args.version / DRAFTER_WEIGHTS_NAME))
    devices = read_fleet(args.fleet)
    parts = [rows(d.log_path(args.fleet), args.pair / "drafter", state, i) for i, d in enumerate(devices)]
    stale, fresh, labels, sessions = (np.concatenate([p[i] for p in parts]) for i in range(4))
    _, groups = np.unique(sessions, return_inverse=True)
    train, test = split_indices(groups, 0.2, 0)
    gate = read_gate_onnx(args.version / GATE_NAME)
    print(f"{len(labels)} logged tokens with context, acceptance rate {labels.mean():.3f}")
    print(f"mean |refreshed - stale| per feature: scalars {np.abs(fresh - stale)[:, :4].mean(axis=0).round(3)}")
    for name, features in (("stale (logged)", stale), ("refreshed", fresh)):
        p = forward(gate, features[test])
        print(f"version's gate on {name} features (held-out sessions): log-loss {log_loss(p, labels[test]):.4f}, "
              f"AUC {roc_auc(p, labels[test]):.4f}")  # fmt: skip
    x = ((fresh - gate.mean) / gate.std).astype(np.float64)
    params = [a.astype(np.float64) for layer in gate.layers for a in layer]
    adam_steps(params, x[train], labels[train].astype(np.float64), args.steps, 512, 3e-3, 1e-2,
               np.random.default_rng(0))  # fmt: skip
    layers = tuple((params[i].astype(np.float32), params[i + 1].astype(np.float32)) for i in range(0, len(params), 2))
    tuned = GateModel(kind=gate.kind, mean=gate.mean, std=gate.std, layers=layers)
    p = forward(tuned, fresh[test])
    print(f"gate tuned on refreshed features, on refreshed (held-out sessions): "
          f"log-loss {log_loss(p, labels[test]):.4f}, AUC {roc_auc(p, labels[test]):.4f}")  # fmt: skip
    if args.out is not None:
        # the bundle's gate for the sweep: tuned on every session's refreshed features
        params = [a.astype(np.float64) for layer in gate.layers for a in layer]
        adam_steps(params, x, labels.astype(np.float64), args.steps, 512, 3e-3, 1e-2, np.random.default_rng(0))
        layers = tuple(
            (params[i].astype(np.float32), params[i + 1].astype(np.float32)) for i in range(0, len(params), 2)
        )
        shutil.copytree(args.version, args.out, dirs_exist_ok=True)
        onnx.save(to_onnx(GateModel(kind=gate.kind, mean=gate.mean, std=gate.std, layers=layers)), args.out / GATE_NAME)
        _list_in_manifest(args.out, (GATE_NAME,))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

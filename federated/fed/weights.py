"""The global model a round moves: the gate's layers and the drafter's weights, as one Flower ``ArrayRecord``.

Keys are ``gate.<name>`` (``mean``, ``std``: the standardiser, frozen at its round-0 value
so every device scales features alike; ``w0, b0, w1, b1, ...``: the MLP) and
``drafter.<state-dict key>`` (the whole drafter: the reference drafter is 2M parameters).
:func:`to_arrays` and :func:`from_arrays` are the codec pair; nothing else looks at keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from flwr.app import Array, ArrayRecord
from onnx import numpy_helper

from tandemspec.federated.gate import GateModel

GATE_PREFIX = "gate."
DRAFTER_PREFIX = "drafter."
_FROZEN = ("mean", "std")  # the standardiser: never trained, never averaged away from round 0


@dataclass(frozen=True)
class GlobalModel:
    """What FedAvg averages: the gate and the drafter's state dict (numpy, float32)."""

    gate: GateModel
    drafter: dict[str, np.ndarray]


def gate_arrays(gate: GateModel) -> dict[str, np.ndarray]:
    """The gate as named float32 arrays."""
    arrays = {"mean": gate.mean, "std": gate.std}
    for i, (weight, bias) in enumerate(gate.layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = weight, bias
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def gate_from_arrays(arrays: Mapping[str, np.ndarray], kind: str = "mlp") -> GateModel:
    """Inverse of :func:`gate_arrays`."""
    num_layers = sum(1 for k in arrays if k.startswith("w"))
    layers = tuple(
        (np.asarray(arrays[f"w{i}"], np.float32), np.asarray(arrays[f"b{i}"], np.float32)) for i in range(num_layers)
    )
    model_kind = kind if kind in ("logistic", "mlp", "scalar-mlp") else "mlp"
    return GateModel(
        kind=model_kind,  # type: ignore[arg-type]
        mean=np.asarray(arrays["mean"], np.float32),
        std=np.asarray(arrays["std"], np.float32),
        layers=layers,
    )


def read_gate_onnx(path: Path) -> GateModel:
    """A gate graph written by :func:`tandemspec.federated.gate.to_onnx`, back as a :class:`GateModel`."""
    initialisers = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    arrays = {k: v for k, v in initialisers.items() if k[0] in "wb" and k[1:].isdigit()}
    arrays["mean"] = initialisers["mean"]
    arrays["std"] = 1.0 / initialisers["inv_std"]
    kind = "logistic" if len([k for k in arrays if k.startswith("w")]) == 1 else "mlp"
    return gate_from_arrays(arrays, kind)


def to_arrays(model: GlobalModel) -> ArrayRecord:
    """Encode: one flat ``ArrayRecord`` with prefixed keys."""
    flat = {GATE_PREFIX + k: v for k, v in gate_arrays(model.gate).items()}
    flat.update({DRAFTER_PREFIX + k: np.ascontiguousarray(v, np.float32) for k, v in model.drafter.items()})
    return ArrayRecord({k: Array(v) for k, v in flat.items()})


def from_arrays(record: ArrayRecord, gate_kind: str = "mlp") -> GlobalModel:
    """Decode :func:`to_arrays`."""
    flat = flat_numpy(record)
    gate = {k[len(GATE_PREFIX) :]: a for k, a in flat.items() if k.startswith(GATE_PREFIX)}
    drafter = {k[len(DRAFTER_PREFIX) :]: a for k, a in flat.items() if k.startswith(DRAFTER_PREFIX)}
    return GlobalModel(gate=gate_from_arrays(gate, gate_kind), drafter=drafter)


def flat_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of a record by key (the guard rails' view)."""
    return {key: array.numpy() for key, array in record.items()}


def trainable(key: str) -> bool:
    """Whether a key of :func:`to_arrays` is trained by devices (the gate's standardiser is not)."""
    return not (key.startswith(GATE_PREFIX) and key[len(GATE_PREFIX) :] in _FROZEN)

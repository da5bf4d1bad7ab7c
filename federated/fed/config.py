"""The configuration of a federated run, from flags (``tandem fed run``) or Flower's run config (``flwr run``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tandemspec.federated.fed.evaluate import EvalConfig
from tandemspec.federated.fed.tasks import LocalTrainConfig

ThresholdScope = Literal["global", "cluster"]


@dataclass(frozen=True)
class FedConfig:
    """Everything a run needs; ``pyproject.toml``'s ``[tool.flwr.app.config]`` uses the same names, kebab-cased."""

    fleet_dir: Path = Path("runs/fleet")
    out_dir: Path = Path("runs/fed")
    pair_dir: Path = Path("")  # target/, drafter/ (its config.json) and edge/ (the starting bundle); "" = reference
    num_rounds: int = 2
    # guard rails: an update whose distance to the global model exceeds this many times the
    # round's median (lower median) distance is dropped; a round whose candidate lowers the
    # fleet's accepted length by more than ``max_acceptance_drop`` is not published
    norm_factor: float = 10.0
    max_acceptance_drop: float = 0.02
    # the gated threshold: the most trusting one that still catches this share of rejections
    gate_quality: float = 0.9
    thresholds: ThresholdScope = "cluster"
    # FedHLM's two levels: FedAvg within each cluster, then the clusters' models averaged with
    # equal weight (so a cluster of many or chatty devices does not drown a small one)
    hierarchical: bool = False
    # Flower's server-side fixed clipping (DifferentialPrivacyServerSideFixedClipping): each
    # update's distance to the global model is clipped to ``dp_clipping_norm`` (0 = off) and
    # Gaussian noise of std ``dp_noise_multiplier`` x norm / devices is added to the average
    dp_clipping_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def resolved_pair(self) -> Path:
        if str(self.pair_dir) not in ("", "."):
            return self.pair_dir
        from tandemspec.edge.bundle import default_bundle_dir

        return default_bundle_dir().parent

    def to_run_config(self) -> dict[str, Any]:
        """The flat, kebab-cased form Flower's run config holds (``--run-config``)."""
        flat: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if dataclasses.is_dataclass(value):
                for inner in dataclasses.fields(value):
                    flat[f"{item.name}-{inner.name}".replace("_", "-")] = getattr(value, inner.name)
            else:
                flat[item.name.replace("_", "-")] = str(value) if isinstance(value, Path) else value
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Inverse of :meth:`to_run_config`; absent keys keep their defaults, unknown ones are refused."""
        known = cls().to_run_config()
        unknown = set(run_config) - set(known)
        if unknown:
            raise ValueError(f"unknown run config keys: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"local": {}, "evaluation": {}}
        for item in dataclasses.fields(cls):
            default = getattr(cls(), item.name)
            if dataclasses.is_dataclass(default):
                for inner in dataclasses.fields(default):
                    key = f"{item.name}-{inner.name}".replace("_", "-")
                    if key in run_config:
                        kind = type(getattr(default, inner.name))
                        nested[item.name][inner.name] = kind(run_config[key])
                values[item.name] = dataclasses.replace(default, **nested[item.name])  # type: ignore[type-var]
            else:
                key = item.name.replace("_", "-")
                if key in run_config:
                    kind = type(default) if not isinstance(default, Path) else Path
                    values[item.name] = kind(run_config[key])
        return cls(**values)

"""Guard rails on devices' updates: drop non-finite ones and ones far out of the round's own norm range.

Distances are taken per part of the model (the gate, the drafter), since the drafter's
weights dwarf the gate's: an update is kept only when every part is finite and its
distance to the global model is at most ``factor`` times the round's lower median distance
of that part (the lower median, so that with two devices one wild update cannot lift the
bound itself).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tandemspec.federated.fed.weights import DRAFTER_PREFIX, GATE_PREFIX

PARTS: tuple[str, ...] = (GATE_PREFIX, DRAFTER_PREFIX)


@dataclass(frozen=True)
class Screening:
    """Which updates of a round pass, and why the others do not."""

    kept: tuple[int, ...]  # indices into the updates
    rejected: dict[int, str]  # index -> reason
    distances: tuple[dict[str, float], ...]  # per update, per part: L2 distance to the global model


def update_distance(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """L2 distance to ``reference`` per part (inf for a non-finite or mis-shaped part)."""
    sums = dict.fromkeys(PARTS, 0.0)
    for key, value in update.items():
        part = next((p for p in PARTS if key.startswith(p)), None)
        if part is None:
            continue
        base = reference.get(key)
        array = np.asarray(value, np.float64)
        if base is None or array.shape != np.shape(base) or not np.isfinite(array).all():
            sums[part] = math.inf
            continue
        sums[part] += float(np.square(array - np.asarray(base, np.float64)).sum())
    return {part: math.sqrt(total) for part, total in sums.items()}


def screen_updates(
    updates: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray], factor: float
) -> Screening:
    """Keep the finite updates within ``factor`` x the lower-median distance of each part."""
    distances = tuple(update_distance(u, reference) for u in updates)
    rejected: dict[int, str] = {}
    for index, d in enumerate(distances):
        bad = [part for part, value in d.items() if not math.isfinite(value)]
        if bad:
            rejected[index] = f"non-finite or mis-shaped {', '.join(p.rstrip('.') for p in bad)}"
    finite = [i for i in range(len(updates)) if i not in rejected]
    for part in PARTS:
        values = [distances[i][part] for i in finite]
        if not values:
            continue
        bound = factor * statistics.median_low(values)
        for i in finite:
            if distances[i][part] > bound and i not in rejected and bound > 0:
                rejected[i] = f"{part.rstrip('.')} update norm {distances[i][part]:.3g} > {bound:.3g}"
    kept = tuple(i for i in range(len(updates)) if i not in rejected)
    return Screening(kept=kept, rejected=rejected, distances=distances)


def acceptance_dropped(candidate: float, previous: float | None, max_drop: float) -> bool:
    """Whether the candidate's fleet accepted length fell by more than ``max_drop`` (relative)."""
    if previous is None or not math.isfinite(previous):
        return False
    return not math.isfinite(candidate) or candidate < previous * (1.0 - max_drop)

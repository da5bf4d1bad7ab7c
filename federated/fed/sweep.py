"""``tandem fed sweep``: gated cost against quality over a grid of thresholds, per published bundle.

A round's table compares bundles at the thresholds the server chose from the logs; this
compares them at *equal measured quality*: every device's held-out prompts are decoded
losslessly once (the target's greedy text, the reference), by the drafter alone once (for
quality recovered) and gated once per threshold, through one local verifier. For each
bundle it reports gated target passes per token, gated match and quality recovered per
threshold, and the cheapest threshold whose match reaches ``--match-floor``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandemspec.federated.fed.evaluate import EvalConfig, EvalSums, evaluate_thresholds, target_scorer
from tandemspec.federated.fed.fleet import read_fleet, read_heldout

SWEEP_NAME = "sweep.json"


def sweep_bundle(
    bundle_dir: Path, fleet_dir: Path, cloud: str, thresholds: Sequence[float], config: EvalConfig, target_dir: Path
) -> dict[float, dict[str, float]]:
    """Fleet means per threshold (every device at the same threshold)."""
    scorer = target_scorer(target_dir) if config.score_nll else None
    totals: dict[float, EvalSums] = {}
    for device in read_fleet(fleet_dir):
        prompts = read_heldout(fleet_dir, device)
        by_threshold = evaluate_thresholds(bundle_dir, cloud, prompts, thresholds, config, scorer)
        for threshold in thresholds:
            sums = by_threshold[threshold]
            totals[threshold] = totals[threshold] + sums if threshold in totals else sums
    return {t: totals[t].metrics() for t in thresholds}


def cheapest_at(points: dict[float, dict[str, float]], floor: float) -> tuple[float, dict[str, float]] | None:
    """The threshold with the fewest gated passes per token among those whose match is at least ``floor``."""
    meeting = [(t, m) for t, m in points.items() if m["gated-match"] >= floor]
    return min(meeting, key=lambda item: item[1]["gated-passes-per-token"]) if meeting else None


def sweep_table(results: dict[str, dict[float, dict[str, float]]], floor: float | None) -> str:
    """Markdown: one row per bundle and threshold; the cheapest point at the floor marked."""
    head = ["bundle", "threshold", "gated passes/token", "gated match", "quality recovered", "NLL gated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, points in results.items():
        best = cheapest_at(points, floor) if floor is not None else None
        for threshold, m in sorted(points.items()):
            mark = " (cheapest at the floor)" if best is not None and best[0] == threshold else ""
            cells = [label, f"{threshold:.2f}{mark}", f"{m['gated-passes-per-token']:.3f}", f"{m['gated-match']:.3f}"]
            cells += [_cell(m.get("quality-recovered")), _cell(m.get("nll-gated"))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def plot_sweep(results: dict[str, dict[float, dict[str, float]]], path: Path, floor: float | None) -> None:
    """Gated match against target passes per token, one curve per bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.6))
    for label, points in results.items():
        ordered = sorted(points.items())
        axis.plot([m["gated-passes-per-token"] for _, m in ordered], [m["gated-match"] for _, m in ordered],
                  "o-", label=label, markersize=4)  # fmt: skip
    if floor is not None:
        axis.axhline(floor, color="grey", linestyle="--", linewidth=1, label=f"match floor {floor:.3f}")
    axis.set(xlabel="gated target passes per token", ylabel="gated match")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_sweep(out: Path, results: dict[str, dict[float, dict[str, float]]], floor: float | None) -> None:
    """``sweep.json`` and ``sweep.md`` of the bundles swept so far."""
    document: dict[str, Any] = {
        "match_floor": floor,
        "bundles": {label: {f"{t:.4f}": m for t, m in points.items()} for label, points in results.items()},
    }
    (out / SWEEP_NAME).write_text(json.dumps(document, indent=2) + "\n")
    (out / "sweep.md").write_text(sweep_table(results, floor))


def sweep_main(args: argparse.Namespace) -> int:
    """``tandem fed sweep``."""
    from tandemspec.cloud.config import CloudConfig
    from tandemspec.cloud.server import serve_in_thread
    from tandemspec.edge.bundle import default_bundle_dir

    try:
        thresholds = sorted({float(t) for t in args.thresholds.split(",")})
    except ValueError:
        print(f"fed sweep: --thresholds takes comma-separated numbers, got {args.thresholds!r}")
        return 2
    if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
        print("fed sweep: thresholds must lie in [0, 1]")
        return 2
    pair = args.pair if args.pair is not None else default_bundle_dir().parent
    config = EvalConfig(max_new_tokens=args.max_new_tokens)
    bundles: list[tuple[str, Path]] = []
    for item in args.bundle:
        label, sep, folder = item.partition("=")
        bundles.append((label, Path(folder)) if sep else (Path(item).name, Path(item)))
    results: dict[str, dict[float, dict[str, float]]] = {}
    args.out.mkdir(parents=True, exist_ok=True)
    server = serve_in_thread(CloudConfig(model_dir=pair / "target", host="127.0.0.1", port=0))
    try:
        for label, bundle in bundles:
            results[label] = sweep_bundle(bundle, args.fleet, server.address, thresholds, config, pair / "target")
            write_sweep(args.out, results, args.match_floor)  # after every bundle: a long sweep keeps what it did
            print(f"{label}: done", flush=True)
    finally:
        server.stop()
    print(sweep_table(results, args.match_floor), end="")
    with contextlib.suppress(ImportError):  # matplotlib comes with the bench extra
        plot_sweep(results, args.out / "sweep.png", args.match_floor)
    return 0

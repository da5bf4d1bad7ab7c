"""The rounds table and plot of a federated run, from ``OUT/history.json``: ``OUT/rounds.md`` and ``OUT/rounds.png``."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tandemspec.federated.fed.server_app import HISTORY_NAME

TABLE_NAME = "rounds.md"
PLOT_NAME = "rounds.png"


def read_history(out_dir: Path) -> list[dict[str, Any]]:
    """The rounds of the last run under ``out_dir``."""
    return list(json.loads((Path(out_dir) / HISTORY_NAME).read_text(encoding="utf-8")))


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def rounds_table(history: Sequence[dict[str, Any]]) -> str:
    """Markdown: per round the fleet and per-cluster accepted length, gated cost and match, thresholds, bytes, time."""
    clusters = sorted({c for r in history for c in r.get("cluster_metrics", {})})
    head = ["round", "version", "published", "accepted length (k=4)"]
    head += [f"acc. len {c}" for c in clusters]
    head += ["gated passes/token", "gated match", "quality recovered", "thresholds"]
    head += ["KB down/client", "KB up/client", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in history:
        m = r.get("metrics", {})
        row = [str(r["round"]), r.get("version") or "-", "yes" if r.get("accepted") else "no"]
        row.append(_cell(m.get("accepted-length")))
        row += [_cell(r.get("cluster_metrics", {}).get(c, {}).get("accepted-length")) for c in clusters]
        row += [_cell(m.get("gated-passes-per-token")), _cell(m.get("gated-match")), _cell(m.get("quality-recovered"))]
        row.append(", ".join(f"{k or 'all'} {v:.2f}" for k, v in sorted(r.get("thresholds", {}).items())) or "-")
        row += [f"{r.get('bytes_down_per_client', 0) / 1e3:.0f}", f"{r.get('bytes_up_per_client', 0) / 1e3:.0f}"]
        row.append(f"{r.get('wall_s', 0.0):.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_rounds(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Accepted length and gated target passes per token by round (matplotlib, from the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(rounds, [r["metrics"].get("accepted-length", math.nan) for r in history], "o-", label="fleet")
    for cluster in sorted({c for r in history for c in r.get("cluster_metrics", {})}):
        values = [r.get("cluster_metrics", {}).get(cluster, {}).get("accepted-length", math.nan) for r in history]
        left.plot(rounds, values, ".--", label=cluster)
    left.set(xlabel="round", ylabel="accepted length (lossless, k=4)")
    left.legend()
    right.plot(rounds, [r["metrics"].get("gated-passes-per-token", math.nan) for r in history], "o-")
    right.set(xlabel="round", ylabel="gated target passes per token")
    from matplotlib.ticker import MaxNLocator

    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis, r in ((ax, r) for ax in (left, right) for r in history):
        if not r.get("accepted"):
            axis.axvline(r["round"], color="grey", alpha=0.2)  # a round the guard did not publish
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CURVES: tuple[tuple[str, str], ...] = (
    ("accepted-length", "accepted length (lossless, k=4)"),
    ("gated-passes-per-token", "gated target passes per token"),
    ("gated-match", "gated match (share of target tokens)"),
)


def compare_table(runs: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """Markdown: per run and round the fleet's accepted length, gated cost, match and quality recovered."""
    head = ["run", "round", "published", "accepted length", "gated passes/token", "gated match", "quality recovered"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, history in runs.items():
        for r in history:
            m = r.get("metrics", {})
            row = [label, str(r["round"]), "yes" if r.get("accepted") else "no"]
            row += [_cell(m.get(k)) for k in ("accepted-length", "gated-passes-per-token", "gated-match")]
            row.append(_cell(m.get("quality-recovered")))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(runs: Mapping[str, Sequence[dict[str, Any]]], path: Path) -> None:
    """One line per run in each of :data:`CURVES` by round (hollow markers: rounds the guard did not publish)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.4))
    for axis, (key, label) in zip(axes, CURVES, strict=True):
        for run, history in runs.items():
            rounds = [r["round"] for r in history]
            values = [r.get("metrics", {}).get(key, math.nan) for r in history]
            (line,) = axis.plot(rounds, values, "o-", label=run, markersize=4)
            refused = [(x, v) for x, v, r in zip(rounds, values, history, strict=True) if not r.get("accepted")]
            if refused:
                axis.plot(*zip(*refused, strict=True), "o", mfc="white", color=line.get_color(), markersize=6)
        axis.set(xlabel="round", ylabel=label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``python -m tandemspec.federated.fed.report --run LABEL=OUT ... --plot PNG``: runs side by side."""
    import argparse

    parser = argparse.ArgumentParser(description="compare federated runs' histories: a Markdown table and a plot")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=OUT", help="a run's --out folder")
    parser.add_argument("--plot", type=Path, help="write the comparison plot here (PNG)")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    for item in args.run:
        label, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"--run takes LABEL=OUT, got {item!r}")
        runs[label] = read_history(Path(folder))
    print(compare_table(runs), end="")
    if args.plot is not None:
        plot_compare(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


def write_report(out_dir: Path, plot: bool = True) -> Path:
    """Write ``rounds.md`` (and ``rounds.png`` when matplotlib is installed); returns the table's path."""
    history = read_history(out_dir)
    table = Path(out_dir) / TABLE_NAME
    table.write_text(rounds_table(history), encoding="utf-8")
    if plot:
        with contextlib.suppress(ImportError):  # matplotlib comes with the bench extra
            plot_rounds(history, Path(out_dir) / PLOT_NAME)
    return table


if __name__ == "__main__":
    raise SystemExit(compare_main())

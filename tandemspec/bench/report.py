"""What a bench writes: ``results.json``, ``results.md`` and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from tandemspec.bench.runner import BASELINE_MODE, MODES
from tandemspec.edge.gate import GATE_KINDS

PLOT_NAMES = ("tpot_vs_rtt.png", "quality_vs_target_passes.png", "throughput_vs_concurrency.png")
_PACKAGES = ("tandemspec", "torch", "transformers", "onnxruntime", "grpcio", "numpy", "tokenizers", "matplotlib")
_TABLE_FIGURES = (
    ("exact_match_rate", "exact match", "{:.0%}"),
    ("quality_recovered", "quality recovered", "{:.3f}"),
    ("target_passes_per_token", "target passes/token", "{:.3f}"),
    ("cloud_s_per_token", "cloud ms/token", "{:.2f}"),
    ("mean_accepted_length", "mean accepted length", "{:.2f}"),
    ("mean_draft_tokens", "draft tokens/frame", "{:.2f}"),
    ("bytes_up_per_token", "bytes up/token", "{:.0f}"),
    ("bytes_down_per_token", "bytes down/token", "{:.0f}"),
    ("messages_per_token", "messages/token", "{:.2f}"),
    ("ttft_ms_p50", "TTFT p50 ms", "{:.1f}"),
    ("ttft_ms_p95", "TTFT p95 ms", "{:.1f}"),
    ("tpot_ms_p50", "TPOT p50 ms", "{:.2f}"),
    ("tpot_ms_p95", "TPOT p95 ms", "{:.2f}"),
    ("tokens_per_s", "tokens/s (1 edge)", "{:.1f}"),
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape the numbers (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, accelerator and the date of the run."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cuda_device": None,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """``results.json``: every figure, the configuration, versions and machine."""
    text = json.dumps(finite(dict(results)), indent=2, default=str, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def _cell(value: Any, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def mode_table(
    figures: Mapping[str, Mapping[str, Mapping[str, Any]]], rtt: str, leave_out: Collection[str] = ()
) -> list[str]:
    """Markdown rows: one column per mode at one RTT (but ``leave_out``), one row per figure."""
    modes = [m for m in figures if rtt in figures[m] and m not in leave_out]
    lines = ["| figure | " + " | ".join(modes) + " |", "| --- |" + " ---: |" * len(modes)]
    for name, label, spec in _TABLE_FIGURES:
        scale = 1000.0 if name == "cloud_s_per_token" else 1.0
        cells = []
        for mode in modes:
            value = figures[mode][rtt][name]
            cells.append(_cell(None if value is None else value * scale, spec))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def headline_table(head: Mapping[str, Any], leave_out: Collection[str] = ()) -> list[str]:
    """Markdown rows of ratios to the cloud-only baseline, per mode (but ``leave_out``) and RTT."""
    lines = [
        "| mode | RTT ms | target passes/token | cloud s/token | bytes/token | TPOT p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, by_rtt in head["vs_cloud"].items():
        if mode in leave_out:
            continue
        for rtt, ratios in by_rtt.items():
            cells = [
                _cell(ratios[k], "{:.3f}")
                for k in ("target_passes_per_token", "cloud_s_per_token", "bytes_per_token", "tpot_ms_p50")
            ]
            lines.append(f"| {mode} | {rtt} | " + " | ".join(cells) + " |")
    return lines


def sorted_points(
    figures: Mapping[str, Mapping[str, Mapping[str, Any]]], points: Sequence[Mapping[str, Any]], rtt: str
) -> list[Mapping[str, Any]]:
    """The gated points measured at ``rtt``, by kind (in run order) then target passes/token."""
    kinds = list(dict.fromkeys(p["kind"] for p in points))
    measured = [p for p in points if rtt in figures.get(p["mode"], {})]
    return sorted(measured, key=lambda p: (kinds.index(p["kind"]), figures[p["mode"]][rtt]["target_passes_per_token"]))


def gated_table(
    figures: Mapping[str, Mapping[str, Mapping[str, Any]]], points: Sequence[Mapping[str, Any]], rtts: Sequence[str]
) -> list[str]:
    """Markdown rows, one per gated operating point: its gate, its figures at ``rtts[0]``, TPOT at every RTT."""
    rtt = rtts[0]
    lines = [
        "| kind | quality floor | threshold | trust rate | target passes/token | quality recovered | exact match | "
        + " | ".join(f"TPOT p50 ms @{r}" for r in rtts)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * len(rtts),
    ]
    for point in sorted_points(figures, points, rtt):
        by_rtt, row = figures[point["mode"]], figures[point["mode"]][rtt]
        cells = [
            point["kind"],
            f"{point['quality']:g}",
            f"{point['threshold']:.4g}",
            _cell(row["trust_rate"], "{:.1%}"),
            _cell(row["target_passes_per_token"], "{:.3f}"),
            _cell(row["quality_recovered"], "{:.3f}"),
            _cell(row["exact_match_rate"], "{:.0%}"),
            *(_cell(by_rtt[r]["tpot_ms_p50"] if r in by_rtt else None, "{:.2f}") for r in rtts),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def gated_aim_line(head: Mapping[str, Any], rtt: str) -> list[str]:
    """One sentence: per gate kind, the cheapest point reaching the quality aim at ``rtt``."""
    best = head.get("gated_at_quality_aim") or {}
    if not best:
        return []
    parts = []
    for kind, by_rtt in best.items():
        point = by_rtt.get(rtt)
        parts.append(
            f"{kind} none"
            if point is None
            else f"{kind} {point['target_passes_per_token']:.3f} (floor {point['quality']:g})"
        )
    aim = head["gated_quality_aim"]
    return [f"Fewest target passes/token with quality recovered ≥ {aim:g} (RTT {rtt} ms): {', '.join(parts)}.", ""]


def load_table(load: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows of the load test."""
    lines = [
        "| mode | edges | generations | tokens | wall s | tokens/s served | mean batch | fell back |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in load:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['num_generations']} | {r['num_tokens']} | {r['wall_s']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {r['mean_batch_rows']:.2f} | {r['num_fell_back']} |"
        )
    return lines


def write_markdown(path: Path, results: Mapping[str, Any]) -> None:
    """``results.md``: the configuration, headline ratios, per-RTT tables, load and the reference."""
    config, machine, head = results["config"], results["machine"], results["headline"]
    points = results.get("gated_points", [])
    gated = {p["mode"] for p in points}  # in their own table: one column each would swamp the others
    lines = [
        "# tandem bench",
        "",
        f"`{results['command']}` — {machine['date']}, {machine['platform']}, {machine['cpu_count']} CPUs"
        + (f", {machine['cuda_device']}" if machine.get("cuda_device") else "")
        + (f"; verifier on {v['device']} in {v['dtype']}" if (v := machine.get("verifier")) else "")
        + f"; {config['num_prompts']} prompts, {config['max_new_tokens']} new tokens, greedy, "
        f"draft length {config['draft_length']}.",
        "",
        f"## Headline: each figure divided by the same figure of `{BASELINE_MODE}` (lower is better)",
        "",
        *headline_table(head, leave_out=gated),
        "",
    ]
    served = head["tokens_per_s"]
    if served:
        parts = [f"{mode} {value:.1f}" for mode, value in served.items()]
        ratio = head["tokens_per_s_vs_cloud"].get("lossless")
        tail = f" (lossless ÷ cloud = {ratio:.2f})" if ratio is not None else ""
        lines += [f"Tokens/s served by one verifier at {head['concurrency']} edges: {', '.join(parts)}{tail}.", ""]
    for rtt in results["rtts_ms"]:
        lines += [f"## RTT {rtt} ms", "", *mode_table(results["figures"], rtt, leave_out=gated), ""]
    if points:
        first = results["rtts_ms"][0]
        lines += [
            f"## Gated operating points (RTT {first} ms; TPOT at every RTT)",
            "",
            "Quality floor: the share of would-be-rejected tokens the gate must catch on held-out logs; "
            "threshold: on the score's own scale (p_accept; top-1 probability; entropy in nats, trusted at or "
            f"below); check every {config['gate_check_every']} tokens at least.",
            "",
            *gated_table(results["figures"], points, results["rtts_ms"]),
            "",
            *gated_aim_line(head, first),
        ]
    lines += hidden_share_lines(results.get("hidden_share", {}))
    lines += [f"## Load: N edges at once, RTT {results['rtts_ms'][0]} ms", "", *load_table(results["load"]), ""]
    lines += assisted_lines(results.get("assisted_reference"))
    for mode, note in results["skipped_modes"].items():
        lines.append(f"- `{mode}` skipped: {note}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def hidden_share_lines(shares: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Markdown lines: the share of the round trip each pipelined mode hides (bench.figures.hidden_share)."""
    if not shares:
        return []
    lines = [
        "## Share of the round trip hidden by pipelining",
        "",
        "1 - (TPOT_pipelined(R) - TPOT_pipelined(0)) / (TPOT_sync(R) - TPOT_sync(0)), mean TPOT over prompts; "
        "[p05, p95] over prompts resampled.",
        "",
        "| mode | RTT ms | hidden share | p05 | p95 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, by_rtt in shares.items():
        for rtt, f in by_rtt.items():
            lines.append(f"| {mode} | {rtt} | {f['share']:.2f} | {f['p05']:.2f} | {f['p95']:.2f} |")
    return [*lines, ""]


def assisted_lines(assisted: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines on the transformers assisted-generation reference."""
    if not assisted:
        return ["Transformers assisted generation: not run.", ""]
    return [
        "## External reference: transformers assisted generation (co-located)",
        "",
        f"{assisted['num_prompts']} prompts, {assisted['num_tokens']} tokens: mean accepted length "
        f"{assisted['mean_accepted_length']:.2f} (tokens per target call, prefill included), "
        f"{assisted['tokens_per_s']:.1f} tokens/s, exact match vs target greedy {assisted['exact_match_rate']:.0%}. "
        "Transformers picks its own draft length (num_assistant_tokens schedule) and its tokens/s includes "
        "`generate`'s per-step overhead: compare its accepted length, not its speed.",
        "",
    ]


def mode_color(mode: str) -> str:
    """The same matplotlib colour for a mode in every plot."""
    names = [m.name for m in MODES]
    return f"C{names.index(mode) if mode in names else len(names) + len(GATE_KINDS)}"


def kind_color(kind: str) -> str:
    """The colour of a gate kind's gated points, after the fixed modes' colours."""
    return f"C{len(MODES) + (GATE_KINDS.index(kind) if kind in GATE_KINDS else len(GATE_KINDS))}"


def plot_tpot(
    path: Path, figures: Mapping[str, Mapping[str, Mapping[str, Any]]], points: Sequence[Mapping[str, Any]] = ()
) -> None:
    """TPOT p50 (bars to p95) against RTT, one line per mode; gated points as thin lines, one colour per kind."""
    import matplotlib.pyplot as plt

    kind_of = {p["mode"]: p["kind"] for p in points}
    fig, ax = plt.subplots(figsize=(6, 4))
    labelled: set[str] = set()
    for mode, by_rtt in figures.items():
        rtts = sorted(by_rtt, key=float)
        xs = [float(r) for r in rtts]
        p50 = [by_rtt[r]["tpot_ms_p50"] for r in rtts]
        if mode in kind_of:  # many points: no error bars, one legend entry per kind
            kind = kind_of[mode]
            label = f"gated ({kind})" if kind not in labelled else None
            labelled.add(kind)
            ax.plot(xs, p50, marker=".", lw=0.8, alpha=0.6, color=kind_color(kind), label=label)
            continue
        p95 = [by_rtt[r]["tpot_ms_p95"] for r in rtts]
        upper = [max(b - a, 0.0) for a, b in zip(p50, p95, strict=True)]
        ax.errorbar(xs, p50, yerr=[[0.0] * len(p50), upper], marker="o", capsize=3, label=mode, color=mode_color(mode))
    ax.set_xlabel("round-trip time (ms)")
    ax.set_ylabel("time per output token (ms), p50 (bar to p95)")
    ax.set_title("TPOT vs RTT by mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality(
    path: Path,
    figures: Mapping[str, Mapping[str, Mapping[str, Any]]],
    rtt: str,
    points: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Quality recovered against target passes per token: a point per fixed mode, a curve per gate kind."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    gated = {p["mode"] for p in points}
    qualities = [0.0, 1.0]
    for mode, by_rtt in figures.items():
        row = by_rtt.get(rtt)
        if mode in gated or row is None or row["quality_recovered"] is None:
            continue
        x, y = row["target_passes_per_token"], row["quality_recovered"]
        qualities.append(y)
        ax.scatter([x], [y], s=60, label=mode, color=mode_color(mode), zorder=3)
    for kind in dict.fromkeys(p["kind"] for p in points):
        rows = [figures[p["mode"]][rtt] for p in sorted_points(figures, points, rtt) if p["kind"] == kind]
        rows = [r for r in rows if r["quality_recovered"] is not None]
        if rows:
            xs = [r["target_passes_per_token"] for r in rows]
            ys = [r["quality_recovered"] for r in rows]
            qualities += ys
            ax.plot(xs, ys, marker="o", ms=4, lw=1.2, color=kind_color(kind), label=f"gated ({kind})", zorder=2)
    ax.scatter([0.15], [0.9], s=80, marker="*", color="gray", alpha=0.35, zorder=1)
    ax.annotate("aim", (0.15, 0.9), xytext=(0, -14), textcoords="offset points", ha="center", color="gray", alpha=0.6)
    ax.set_xlabel("target passes per token")
    ax.set_ylabel("quality recovered (1 = target, 0 = drafter)")
    ax.set_title(f"Quality vs cloud compute (RTT {rtt} ms)")
    ax.set_xlim(left=-0.05)
    ax.set_ylim(min(qualities) - 0.1, max(qualities) + 0.15)  # gated points may fall outside [0, 1]
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(path: Path, load: Sequence[Mapping[str, Any]]) -> None:
    """Tokens/s served by one verifier against the number of concurrent edges, per mode."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in load):
        rows = sorted((r for r in load if r["mode"] == mode), key=lambda r: r["concurrency"])
        xs, ys = [r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows]
        ax.plot(xs, ys, marker="o", label=mode, color=mode_color(mode))
    levels = sorted({r["concurrency"] for r in load})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent edges")
    ax.set_ylabel("tokens/s served per verifier")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: Path, results: Mapping[str, Any]) -> list[Path]:
    """The three PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [out / name for name in PLOT_NAMES]
    points = results.get("gated_points", [])
    plot_tpot(paths[0], results["figures"], points)
    plot_quality(paths[1], results["figures"], results["rtts_ms"][0], points)
    plot_throughput(paths[2], results["load"])
    return paths

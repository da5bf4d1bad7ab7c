"""The figures of docs/benchmark.md, computed from the runs of one bench.

Per mode and RTT: exact-match rate against the cloud-only greedy output, quality
recovered, target passes and cloud seconds per token, mean accepted length, wire cost per
token, TTFT and TPOT percentiles, single-edge tokens/s, and for gated operating points the
trust rate (share of tokens emitted on the gate's trust; None for the other modes). Token-weighted ratios pool all
prompts (total cost / total tokens), so long and short completions count by their size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tandemspec.bench.runner import BASELINE_MODE, DRAFTER_MODE, PromptRun
from tandemspec.bench.scoring import TokenNll

Continuation = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, generated ids)
FIGURE_NAMES = (
    "num_prompts",
    "num_tokens",
    "exact_match_rate",
    "nll",
    "quality_recovered",
    "target_passes_per_token",
    "server_passes_per_token",
    "cloud_s_per_token",
    "mean_accepted_length",
    "mean_draft_tokens",
    "bytes_up_per_token",
    "bytes_down_per_token",
    "messages_per_token",
    "ttft_ms_p50",
    "ttft_ms_p95",
    "tpot_ms_p50",
    "tpot_ms_p95",
    "tokens_per_s",
    "num_fell_back",
    "trust_rate",
)
QUALITY_AIM = 0.9  # the headline's gated figure: cheapest point recovering at least this much quality


def percentile_ms(values_s: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values_s``, in milliseconds (0 for no values)."""
    return float(np.percentile(np.asarray(values_s) * 1000.0, q)) if len(values_s) else 0.0


def mean_nll(runs: Sequence[PromptRun], nll: Mapping[Continuation, TokenNll]) -> float:
    """Token-weighted mean NLL (nats/token) of the runs' continuations under the target."""
    scores = [nll[(r.prompt_ids, r.token_ids)] for r in runs]
    num_tokens = sum(s.num_tokens for s in scores)
    return sum(s.total_nll for s in scores) / num_tokens if num_tokens else float("nan")


def quality_recovered(nll_mode: float, nll_drafter: float, nll_target: float) -> float | None:
    """(NLL_drafter − NLL_mode) / (NLL_drafter − NLL_target); None when the two agree."""
    gap = nll_drafter - nll_target
    if not np.isfinite(gap) or abs(gap) < 1e-9:
        return None
    return (nll_drafter - nll_mode) / gap


def exact_match_rate(runs: Sequence[PromptRun], baseline: Mapping[int, tuple[int, ...]]) -> float | None:
    """Share of prompts whose output equals the cloud-only greedy output (None without a baseline)."""
    judged = [r for r in runs if r.prompt_index in baseline]
    if not judged:
        return None
    return sum(r.token_ids == baseline[r.prompt_index] for r in judged) / len(judged)


def cost_figures(runs: Sequence[PromptRun]) -> dict[str, float | None]:
    """Per-token cost and latency figures of one mode at one RTT (accepted length: None without rounds)."""
    stats = [r.stats for r in runs]
    tokens = max(sum(s["num_generated"] for s in stats), 1)
    gated = any(s["mode_requested"] == "gated" for s in stats)
    rounds = sum(s["num_rounds"] for s in stats)
    verified = sum(s["mean_accepted_length"] * s["num_rounds"] for s in stats)
    wall_s = sum(s["wall_s"] for s in stats)
    return {
        "num_prompts": len(runs),
        "num_tokens": sum(s["num_generated"] for s in stats),
        "target_passes_per_token": sum(s["num_target_passes"] for s in stats) / tokens,
        "server_passes_per_token": sum(r.server_step_passes + r.server_prefill_passes for r in runs) / tokens,
        "cloud_s_per_token": sum(s["verify_compute_s"] for s in stats) / tokens,
        "mean_accepted_length": verified / rounds if rounds else None,
        # draft tokens per verified frame: a chain's length, a tree's budget (what --auto-draft chose)
        "mean_draft_tokens": sum(s["num_drafted"] for s in stats) / rounds if rounds else None,
        "bytes_up_per_token": sum(s["bytes_up"] for s in stats) / tokens,
        "bytes_down_per_token": sum(s["bytes_down"] for s in stats) / tokens,
        "messages_per_token": sum(r.messages_up + r.messages_down for r in runs) / tokens,
        "ttft_ms_p50": percentile_ms([r.ttft_s for r in runs], 50),
        "ttft_ms_p95": percentile_ms([r.ttft_s for r in runs], 95),
        "tpot_ms_p50": percentile_ms([r.tpot_s for r in runs], 50),
        "tpot_ms_p95": percentile_ms([r.tpot_s for r in runs], 95),
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "num_fell_back": sum(bool(s["fell_back_to_local"]) for s in stats),
        "trust_rate": sum(s["num_trusted"] for s in stats) / tokens if gated else None,
    }


def mode_figures(runs: Sequence[PromptRun], nll: Mapping[Continuation, TokenNll]) -> dict[str, dict[str, Any]]:
    """``{mode: {rtt_ms (str): {figure: value}}}`` for every mode and RTT in ``runs``."""
    figures: dict[str, dict[str, Any]] = {}
    for rtt_ms in sorted({r.rtt_ms for r in runs}):
        at_rtt = [r for r in runs if r.rtt_ms == rtt_ms]
        by_mode: dict[str, list[PromptRun]] = {}
        for run in at_rtt:
            by_mode.setdefault(run.mode, []).append(run)
        baseline = {r.prompt_index: r.token_ids for r in by_mode.get(BASELINE_MODE, [])}
        nll_target = mean_nll(by_mode[BASELINE_MODE], nll) if BASELINE_MODE in by_mode else float("nan")
        nll_drafter = mean_nll(by_mode[DRAFTER_MODE], nll) if DRAFTER_MODE in by_mode else float("nan")
        for mode, mode_runs in by_mode.items():
            nll_mode = mean_nll(mode_runs, nll)
            row: dict[str, Any] = cost_figures(mode_runs)
            row["exact_match_rate"] = exact_match_rate(mode_runs, baseline)
            row["nll"] = nll_mode
            row["quality_recovered"] = quality_recovered(nll_mode, nll_drafter, nll_target)
            figures.setdefault(mode, {})[f"{rtt_ms:g}"] = {name: row[name] for name in FIGURE_NAMES}
    return figures


def continuations(runs: Sequence[PromptRun]) -> list[Continuation]:
    """The distinct (prompt, continuation) pairs to score (identical outputs are scored once)."""
    return sorted({(r.prompt_ids, r.token_ids) for r in runs})


def headline(
    figures: Mapping[str, Mapping[str, Mapping[str, Any]]],
    load: Sequence[Mapping[str, Any]],
    gated_points: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Ratios against the cloud-only baseline at each RTT, throughput at the highest concurrency,
    and per gate kind the cheapest operating point that recovers ``QUALITY_AIM`` of the quality."""
    ratios: dict[str, Any] = {}
    baseline = figures.get(BASELINE_MODE, {})
    for mode, by_rtt in figures.items():
        if mode == BASELINE_MODE:
            continue
        for rtt, row in by_rtt.items():
            base = baseline.get(rtt)
            if base is None:
                continue
            ratios.setdefault(mode, {})[rtt] = {
                name: _ratio(row[name], base[name])
                for name in ("target_passes_per_token", "cloud_s_per_token", "tpot_ms_p50")
            } | {"bytes_per_token": _ratio(_bytes(row), _bytes(base))}
    top = max((r["concurrency"] for r in load), default=0)
    served = {r["mode"]: r["tokens_per_s"] for r in load if r["concurrency"] == top}
    throughput = (
        {mode: _ratio(value, served[BASELINE_MODE]) for mode, value in served.items()}
        if served.get(BASELINE_MODE)
        else {}
    )
    return {
        "vs_cloud": ratios,
        "concurrency": top,
        "tokens_per_s": served,
        "tokens_per_s_vs_cloud": throughput,
        "gated_quality_aim": QUALITY_AIM,
        "gated_at_quality_aim": cheapest_at_quality(figures, gated_points, QUALITY_AIM),
    }


def cheapest_at_quality(
    figures: Mapping[str, Mapping[str, Mapping[str, Any]]], gated_points: Sequence[Mapping[str, Any]], aim: float
) -> dict[str, dict[str, dict[str, Any] | None]]:
    """``{kind: {rtt: point or None}}``: per gate kind and RTT, the operating point with the fewest
    target passes/token among those whose quality recovered is at least ``aim`` (None if none is)."""
    best: dict[str, dict[str, dict[str, Any] | None]] = {}
    for point in gated_points:
        by_rtt = best.setdefault(point["kind"], {})
        for rtt, row in figures.get(point["mode"], {}).items():
            current = by_rtt.setdefault(rtt, None)
            quality = row["quality_recovered"]
            if quality is None or quality < aim:
                continue
            if current is None or row["target_passes_per_token"] < current["target_passes_per_token"]:
                by_rtt[rtt] = {
                    "mode": point["mode"],
                    "quality": point["quality"],
                    "target_passes_per_token": row["target_passes_per_token"],
                    "quality_recovered": quality,
                }
    return best


def _bytes(row: Mapping[str, Any]) -> float:
    return float(row["bytes_up_per_token"] + row["bytes_down_per_token"])


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return float(value) / float(base)


# (pipelined mode, its synchronous counterpart): the pairs whose hidden share of the round trip is reported
PIPELINE_PAIRS = (
    ("lossless", "lossless-sync"),
    ("lossless-defer", "lossless-sync"),
    ("lossless-nobranch", "lossless-sync"),
    ("lossless-auto", "lossless-sync-auto"),
    ("tree-auto", "tree-sync-auto"),
)


def hidden_share(
    runs: Sequence[PromptRun], pipelined: str, sync: str, rtt_ms: float, num_resamples: int = 2000
) -> dict[str, float] | None:
    """The share of the round trip that ``pipelined`` hides, against ``sync``, at ``rtt_ms`` (docs/trees.md).

    ``1 - (T_p(R) - T_p(0)) / (T_s(R) - T_s(0))``, T the mean TPOT over the prompts that all four
    runs share (paired by prompt); 1 = the round trip costs the pipelined mode nothing, 0 = as much
    as synchronously. ``p05``/``p95``: the 5th and 95th percentiles of the same share over
    prompts resampled with replacement (a seeded bootstrap). None without those runs or with
    no round-trip cost to share (``T_s(R) <= T_s(0)``).
    """
    tpot: dict[tuple[str, float], dict[int, float]] = {}
    for run in runs:
        tpot.setdefault((run.mode, run.rtt_ms), {})[run.prompt_index] = run.tpot_s
    keys = [(pipelined, rtt_ms), (pipelined, 0.0), (sync, rtt_ms), (sync, 0.0)]
    if rtt_ms <= 0 or any(key not in tpot for key in keys):
        return None
    prompts = sorted(set.intersection(*(set(tpot[key]) for key in keys)))
    if not prompts:
        return None
    table = np.array([[tpot[key][p] for key in keys] for p in prompts])  # [prompts, 4]

    def share(rows: np.ndarray) -> float:
        p_rtt, p_zero, s_rtt, s_zero = rows.mean(axis=0)
        return float(1.0 - (p_rtt - p_zero) / (s_rtt - s_zero)) if s_rtt > s_zero else float("nan")

    value = share(table)
    if not np.isfinite(value):
        return None
    rng = np.random.default_rng(0)
    resampled = np.array([share(table[rng.integers(0, len(prompts), len(prompts))]) for _ in range(num_resamples)])
    resampled = resampled[np.isfinite(resampled)]
    return {
        "share": value,
        "p05": float(np.percentile(resampled, 5)),
        "p95": float(np.percentile(resampled, 95)),
        "num_prompts": float(len(prompts)),
    }


def hidden_shares(runs: Sequence[PromptRun]) -> dict[str, dict[str, dict[str, float]]]:
    """``{pipelined mode: {rtt_ms (str): hidden_share}}`` for every pair of :data:`PIPELINE_PAIRS` that ran."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for pipelined, sync in PIPELINE_PAIRS:
        for rtt_ms in sorted({r.rtt_ms for r in runs if r.rtt_ms > 0}):
            figure = hidden_share(runs, pipelined, sync, rtt_ms)
            if figure is not None:
                out.setdefault(pipelined, {})[f"{rtt_ms:g}"] = figure
    return out


def run_rows(runs: Sequence[PromptRun]) -> list[dict[str, Any]]:
    """One compact row per generation (per-prompt figures for noise estimates, pipelining counts)."""
    keys = (
        "num_generated",
        "num_target_passes",
        "num_rounds",
        "num_stale_frames",
        "num_merged_frames",
        "num_bonus_kept",
        "num_branch_frames",
        "num_branch_hits",
    )
    return [
        {"mode": r.mode, "rtt_ms": r.rtt_ms, "prompt_index": r.prompt_index, "tpot_ms": r.tpot_s * 1e3}
        | {"ttft_ms": r.ttft_s * 1e3}
        | {key: r.stats.get(key) for key in keys}
        for r in runs
    ]
